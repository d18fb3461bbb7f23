"""The transformer, its config, weights and loaders."""
from diffmas_jax.model.config import ModelConfig, ModelConfigError
from diffmas_jax.model.loading import LoadedModel, ModelNotFoundError, load_model, resolve_model_dir
from diffmas_jax.model.transformer import ForwardOut, forward, init_params, jit_forward, param_axes
from diffmas_jax.model.weights import WeightLoadError

__all__ = ["ForwardOut", "LoadedModel", "ModelConfig", "ModelConfigError", "ModelNotFoundError", "WeightLoadError",
           "forward", "init_params", "jit_forward", "load_model", "param_axes", "resolve_model_dir"]
