#!/usr/bin/env bash
# The optional extras' tests: for each extra a venv layered on this Python (--system-site-packages: torch and the rest
# of `pip install -c constraints.txt -e ".[dev]"`, which must come first, as in .ci/run), the extra installed there with
# constraints.txt (its own pins swapped in: the "#   EXTRA: pkg==version" lines), then its tests. One timed step each.
#
#   bash scripts/test_extras.sh              # lmeval, lmms, demo
#   bash scripts/test_extras.sh demo         # some of them
#
# The venvs stay in $EXTRAS_VENVS (default /tmp/visualrwkv-extras): a second run only checks the installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS="${EXTRAS_VENVS:-/tmp/visualrwkv-extras}"
declare -A TESTS=([lmeval]=tests/test_lm_eval_adapter.py [lmms]=tests/test_lmms_eval_adapter.py [demo]=tests/test_demo.py)
declare -A IMPORTS=([lmeval]=visualrwkv_integrations.lm_eval_visualrwkv [lmms]=visualrwkv_integrations.lmms_eval_visualrwkv
                    [demo]=gradio_client)      # must import, or the tests would skip and the step pass with nothing run
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TRITON_INTERPRET="${TRITON_INTERPRET:-1}"

constraints_for() {
  # constraints.txt for one extra ($1): its own pins replace the shared pins of the same packages; written to $2
  local own names
  own=$(sed -n "s/^#   $1: \([^ ]*\).*/\1/p" constraints.txt)
  names=$(printf '%s\n' $own | sed 's/==.*//' | paste -sd '|' -)
  if [ -z "$names" ]; then cp constraints.txt "$2"; return; fi
  { grep -v -i -E "^($names)==" constraints.txt; printf '%s\n' $own; } > "$2"
}

extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(lmeval lmms demo)
for extra in "${extras[@]}"; do
  [ -n "${TESTS[$extra]:-}" ] || { echo "unknown extra '$extra': expected one of ${!TESTS[*]}" >&2; exit 2; }
  venv="$VENVS/$extra"
  start=$SECONDS
  echo "== [$extra] install into $venv"
  mkdir -p "$VENVS"
  [ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
  constraints_for "$extra" "$venv/constraints.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation -c "$venv/constraints.txt" -e ".[$extra]"
  "$venv/bin/python" -c "import ${IMPORTS[$extra]}"
  installed=$((SECONDS - start))
  echo "== [$extra] pytest ${TESTS[$extra]}"
  "$venv/bin/python" -m pytest "${TESTS[$extra]}" -q -p no:cacheprovider
  echo "== [$extra] install ${installed}s, tests $((SECONDS - start - installed))s"
done
