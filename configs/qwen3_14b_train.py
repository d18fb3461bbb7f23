"""DiffMAS training on Qwen/Qwen3-14B with the paper's hyperparameters (see qwen3_8b_train.py).

    python -m diffmas_jax.train --config configs/qwen3_14b_train.py --workdir runs/qwen3_14b \
        --config.mesh_preset=v5e-8 --config.trace_grad=full
"""
from diffmas_jax.config_utils import sibling_config


def get_config():
    c = sibling_config(__file__, "qwen3_8b_train.py")
    c.model = "Qwen/Qwen3-14B"
    return c
