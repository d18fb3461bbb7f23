"""DiffMAS training on deepseek-ai/DeepSeek-R1-Distill-Qwen-32B with the paper's hyperparameters (see qwen3_8b_train.py).

    python -m diffmas_jax.train --config configs/r1_distill_qwen_32b_train.py --workdir runs/r1_distill_qwen_32b \
        --config.mesh_preset=v5e-8 --config.trace_grad=full
"""
from diffmas_jax.config_utils import sibling_config


def get_config():
    c = sibling_config(__file__, "qwen3_8b_train.py")
    c.model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    c.enable_thinking = None  # no thinking switch in this chat template
    return c
