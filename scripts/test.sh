#!/usr/bin/env bash
# Run the test suite from nothing: installs what is missing, then pytest (GPU tests skip without CUDA).
#   bash scripts/test.sh                 # everything CI runs
#   bash scripts/test.sh -m "not slow"   # fast unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec ${PYTHON:-python3} -m pytest "$@"
