#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored, repository root) the wheels that scripts/gpu_check.py needs on a fresh GPU machine
# that has no network but already holds torch, triton, numpy, pillow, matplotlib, regex, tqdm, safetensors, timm,
# torchvision, huggingface-hub, einops, msgpack, ninja, packaging, psutil and py-cpuinfo (the device's package list,
# /work/.library/device/KINDS.md). Run it here, where the registry is reachable; the GPU command is in
# scripts/gpu_check.py's docstring. Every wheel is pinned to the version CI tested (constraints.txt) and is fetched
# without its dependencies, so each missing dependency is named below:
#
#   open_clip_torch   the vision tower      needs ftfy (-> wcwidth); torch, torchvision, regex, tqdm, huggingface-hub,
#                                           safetensors, timm are there
#   deepspeed         training, part c      needs hjson, pydantic; einops, msgpack, ninja, numpy, packaging, psutil,
#                                           py-cpuinfo, torch, tqdm are there. PyPI has only its sdist: built here as a
#                                           pure-Python wheel (no ops compiled; ZeRO-2 with torch's AdamW needs none)
#   pydantic          deepspeed's config    needs pydantic-core (compiled: cp312 manylinux), annotated-types,
#                                           typing-inspection, typing-extensions>=4.14.1 (carried: the machine's
#                                           version is not listed, and a newer one only adds names)
#   fla-core          chunk_rwkv6, part b   needs einops (there). The `flash-linear-attention` wheel (fla.layers,
#                                           fla.models on top of transformers) is not needed for fla.ops and is left out
#
# Usage: bash scripts/gpu_wheels.sh      (prints each wheel's size and the total; fails above the 64 MiB that travel)
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
LIMIT=$((64 * 1024 * 1024))
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4
        annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 fla-core==0.6.0)
SOURCE=deepspeed==0.19.8

rm -rf "$WHL"
mkdir -p "$WHL"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$WHL" "${BINARY[@]}"
# deepspeed's setup.py imports torch (any version: with DS_BUILD_OPS=0 nothing is compiled against it)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "$SOURCE"

shopt -s nullglob
wheels=("$WHL"/*.whl)
extra=$(find "$WHL" -type f ! -name '*.whl')
if [ -n "$extra" ]; then echo "gpu_wheels: unexpected files in $WHL (not wheels): $extra" >&2; exit 1; fi
if [ "${#wheels[@]}" -ne $((${#BINARY[@]} + 1)) ]; then
  echo "gpu_wheels: expected $((${#BINARY[@]} + 1)) wheels in $WHL, found ${#wheels[@]}" >&2; exit 1
fi
for w in "${wheels[@]}"; do
  case "$w" in *-none-any.whl|*-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "gpu_wheels: $w is not for CPython 3.12 on x86-64 Linux" >&2; exit 1 ;; esac
done
total=0
for w in "${wheels[@]}"; do
  size=$(stat -c %s "$w"); total=$((total + size))
  printf '%9.2f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "${w#"$WHL"/}"
done
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
printf '%9.2f MiB  total in %s/ (%d wheels); with the working tree (%.2f MiB): %.2f MiB of the 64 MiB that travel\n' \
  "$(echo "$total / 1048576" | bc -l)" "$WHL" "${#wheels[@]}" "$(echo "$tree / 1048576" | bc -l)" \
  "$(echo "($total + $tree) / 1048576" | bc -l)"
if [ $((total + tree)) -gt "$LIMIT" ]; then echo "gpu_wheels: over the 64 MiB limit" >&2; exit 1; fi
