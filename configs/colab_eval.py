"""Evaluation settings of the Colab TPU demo (launch/colab_tpu.ipynb): a small model,
greedy decoding, short answers, data from the Hub (or generated: task=arith).

    python -m diffmas_jax.evaluate --config configs/colab_eval.py --workdir runs/colab/latent_mas
"""
from diffmas_jax.config_utils import eval_config


def get_config():
    return eval_config(
        model="Qwen/Qwen3-0.6B", dtype="bfloat16",
        method="latent_mas", task="arith", split="test", data_dir=None,
        roles="planner,solver", limit=32, batch_size=8, max_new_tokens=256,
        latent_steps=10, realign="ridge", temperature=0.0, enable_thinking=False)
