#!/usr/bin/env bash
# The main job on the built-in default: set-up if needed, then the whole chain on CPU on the
# Shakespeare plays: tokenizer -> stage 1 autoencoder -> reconstruction report -> latents ->
# stage 2 (CALM; --baseline adds the token baseline) -> evaluation on the held-out plays -> a generated sample.
# Extra arguments go to jobs/run_all.py (e.g. --corpus FILE, --run DIR, key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1  # its own Ray, with its own token
exec .venv/bin/python jobs/run_all.py "$@"
