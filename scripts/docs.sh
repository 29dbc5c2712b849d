#!/usr/bin/env bash
# The notebooks as a static HTML site, rendered by nbconvert from their saved outputs (nothing is re-executed):
#
#   bash scripts/docs.sh              # into _docs/ (open _docs/index.html)
#   bash scripts/docs.sh OUT_DIR      # anywhere else
#
# MathJax is served from the site itself, copied from Debian's libjs-mathjax (apt-get install libjs-mathjax).
# `python scripts/check_docs.py [OUT_DIR]` opens every page in headless Chromium and lists what is broken
# (tests/test_docs.py does both).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python "$repo/scripts/build_docs.py" "${1:-$repo/_docs}"
