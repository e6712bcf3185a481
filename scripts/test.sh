#!/usr/bin/env bash
# The test suite: set-up if needed, then pytest (CPU only; real Ray, DeepSpeed, Parquet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu
# a hard ceiling so a hang cannot eat CI; pytest-timeout and faulthandler name the hung test first
exec timeout 2400 .venv/bin/python -m pytest -q --durations=15 tests "$@"  # the 15 slowest: where suite time goes
