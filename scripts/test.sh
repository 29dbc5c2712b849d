#!/usr/bin/env bash
# Every test, in order: the package is in sync with the notebooks, the notebooks run on the CPU, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"

echo "== 1/3 nbdev_export leaves visualrwkv/ unchanged"
nbdev_export
if ! git diff --quiet -- visualrwkv || [ -n "$(git ls-files --others --exclude-standard -- visualrwkv)" ]; then
  git status --short -- visualrwkv
  echo "FAIL: visualrwkv/ is out of sync with nbs/: run nbdev_export and commit the result" >&2
  exit 1
fi

echo "== 2/3 nbdev_test (CPU; cells flagged cuda or slow are skipped)"
OMP_NUM_THREADS=1 nbdev_test --n_workers 2 --timing     # two notebooks at a time, one thread each

echo "== 3/3 pytest tests/"
OMP_NUM_THREADS=2 python -m pytest tests/ -q --durations=15      # the slowest tests listed at the end
