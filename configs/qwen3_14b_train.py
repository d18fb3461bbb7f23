"""DiffMAS training on Qwen/Qwen3-14B with the paper's hyperparameters (see qwen3_8b_train.py).

    python -m diffmas_jax.train --config configs/qwen3_14b_train.py --workdir runs/qwen3_14b \
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
    c.model = "Qwen/Qwen3-14B"
    return c
