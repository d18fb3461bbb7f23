#!/usr/bin/env bash
# Run training or evaluation on a CUDA machine.
#   launch/gpu.sh train    --config configs/qwen3_8b_train.py --workdir runs/q8
#   launch/gpu.sh evaluate --config configs/qwen3_8b.py --workdir runs/q8_eval --config.method=diffmas ...
# Installs the project with CUDA JAX into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?usage: launch/gpu.sh train|evaluate|generate ARGS...}; shift
case "$cmd" in train|evaluate|generate) ;; *) echo "error: unknown command '$cmd' (train, evaluate, generate)" >&2; exit 2;; esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e . && .venv/bin/pip install -q -U "jax[cuda12]"
fi
# Let XLA take most of the GPU memory up front (the KV trace and activations live there).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec .venv/bin/python -m "diffmas_jax.$cmd" "$@"
