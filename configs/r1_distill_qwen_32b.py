"""DeepSeek-R1-Distill-Qwen-32B rows of the paper (HumanEval+ in the paper's table).

A reasoning model: it always thinks (the template opens <think>), so answers are
long. About 61 GiB of bfloat16 weights: it needs a slice, e.g.
--config.mesh_preset=v5e-16, v5p-8 or gpu-8 (the estimate printed at startup says
whether batch_size and max_new_tokens fit; batch_size 2 at 32768 new tokens is
about 10 GiB of v5e-8's 16 GiB per chip).
"""
from diffmas_jax.config_utils import eval_config


def get_config():
    return eval_config(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", dtype="bfloat16",
        method="latent_mas", task="humanevalplus", split="test", data_dir=None,
        batch_size=2, max_new_tokens=32768, text_max_new_tokens=4096,
        latent_steps=10, realign="ridge", temperature=0.6, top_p=0.95, top_k=0)
