"""DiffMAS training on deepseek-ai/DeepSeek-R1-Distill-Qwen-32B with the paper's hyperparameters (see qwen3_8b_train.py).

    python -m diffmas_jax.train --config configs/r1_distill_qwen_32b_train.py --workdir runs/r1_distill_qwen_32b \
        --config.mesh_preset=v5e-8 --config.trace_grad=full
"""
import importlib.util
import os


def _base():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_8b_train.py")
    spec = importlib.util.spec_from_file_location("qwen3_8b_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _base()
    c.model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    c.enable_thinking = None  # no thinking switch in this chat template
    return c
