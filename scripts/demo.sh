#!/usr/bin/env bash
# Set up and run the main job end to end on the default zoo model:
# export -> graph passes -> compile for this machine with TVM -> measured latency table.
# Extra arguments go to `edgec demo`, e.g. scripts/demo.sh --model resnet18
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgec demo "$@"
