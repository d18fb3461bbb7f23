#!/usr/bin/env bash
# The baseline table in README.md: Single, TextMAS and LatentMAS on the embedded
# SmolLM2-135M with the local benchmark copies (../shared/data), greedy decoding,
# m = 10 latent steps, sequential planner -> critic -> refiner -> solver.
# Re-running resumes: finished items are skipped (limits can be raised later).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/baselines}
run() {  # task method limit max_new_tokens
  $PY -m diffmas_jax.evaluate --config configs/embedded_eval.py --workdir "$OUT/$1_$2" \
    --config.task=$1 --config.method=$2 --config.limit=$3 --config.batch_size=10 \
    --config.max_new_tokens=$4 --config.text_max_new_tokens=64 --config.latent_steps=10
}
run gsm8k single 40 160
run gsm8k latent_mas 40 160
run arc_easy single 100 48
run arc_easy latent_mas 100 48
run arc_easy text_mas 50 48
run gsm8k text_mas 20 160
$PY -m diffmas_jax.tables --workdirs "$OUT"/* --out "$OUT" --methods single,text_mas,latent_mas
