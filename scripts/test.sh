#!/usr/bin/env bash
# Set up and run the whole test suite (the README's test command; .ci/run calls it).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
