"""DiffMAS training on mistralai/Ministral-8B-Instruct-2410 with the paper's hyperparameters (see qwen3_8b_train.py).

    python -m diffmas_jax.train --config configs/ministral_8b_train.py --workdir runs/ministral_8b \
        --config.mesh_preset=v5e-8 --config.trace_grad=full
"""
from diffmas_jax.config_utils import sibling_config


def get_config():
    c = sibling_config(__file__, "qwen3_8b_train.py")
    c.model = "mistralai/Ministral-8B-Instruct-2410"
    c.enable_thinking = None  # no thinking switch in this chat template
    return c
