"""Evaluate on the embedded SmolLM2-135M (CPU-friendly) with the local benchmark copies.

    python -m diffmas_jax.evaluate --config configs/embedded_eval.py --workdir runs/eval \
        --config.method=single --config.task=arc_easy --config.limit=20
"""
from pathlib import Path

from diffmas_jax.config_utils import eval_config

# The benchmark copies beside the clone (../shared/data from the repository root), found
# from this file so the config means the same from any working directory.
SHARED_DATA = str((Path(__file__).resolve().parents[2] / "shared" / "data"))


def get_config():
    return eval_config(
        model="embedded", dtype="float32",
        method="latent_mas", task="gsm8k", split="test", data_dir=SHARED_DATA,
        limit=100, batch_size=4, max_new_tokens=256, text_max_new_tokens=128,
        latent_steps=10, realign="ridge", temperature=0.0)
