"""Qwen3-4B rows of the paper (shared settings: diffmas_jax.config_utils.qwen3_config)."""
from diffmas_jax.config_utils import qwen3_config


def get_config():
    return qwen3_config("Qwen/Qwen3-4B", batch_size=4)
