#!/usr/bin/env bash
# The baseline table in README.md: Single, TextMAS and LatentMAS on the embedded
# SmolLM2-135M with the local benchmark copies (../shared/data). Greedy decoding.
# Re-running resumes: finished items are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/baselines}
for task in arc_easy gsm8k; do
  if [ "$task" = arc_easy ]; then lim=100; new=48; else lim=50; new=160; fi
  for method in single latent_mas text_mas; do
    $PY -m diffmas_jax.evaluate --config configs/embedded_eval.py --workdir "$OUT/${task}_${method}" \
      --config.task=$task --config.method=$method --config.limit=$lim --config.batch_size=10 \
      --config.max_new_tokens=$new --config.text_max_new_tokens=64 --config.latent_steps=10
  done
done
