"""Ministral-8B rows of the paper (mistralai/Ministral-8B-Instruct-2410).

Same sampling as the Qwen3 rows (temperature 0.6, top-p 0.95); the chat template has
no thinking switch, so enable_thinking stays unset. Memory: about 15 GiB of bfloat16
weights; pick a mesh with --config.mesh_preset (v5e-8, v4-8, v5p-8, gpu-8, ...), the
estimate printed at startup says whether the batch and trace fit.
"""
from diffmas_jax.config_utils import eval_config


def get_config():
    return eval_config(
        model="mistralai/Ministral-8B-Instruct-2410", dtype="bfloat16",
        method="latent_mas", task="aime24", split="test", data_dir=None,
        batch_size=4, max_new_tokens=16384, text_max_new_tokens=4096,
        latent_steps=10, realign="ridge", temperature=0.6, top_p=0.95, top_k=0)
