"""diffmas_jax: multi-agent LLM systems that communicate through a shared KV trace, in JAX."""
from setuptools import find_packages, setup

setup(
    name="diffmas_jax",
    version="0.1.0",
    description="DiffMAS in JAX/Flax: latent multi-agent communication trained end to end with LoRA",
    python_requires=">=3.10",
    packages=find_packages(include=["diffmas_jax", "diffmas_jax.*"]),
    package_data={"diffmas_jax": ["data/*.json"]},  # the paper's reported numbers (tables.py)
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "transformers>=4.51",
        "datasets>=3.0",
        "ml_collections>=1.0",
        "safetensors>=0.4",
        "gguf>=0.10",
        "huggingface_hub>=0.25",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "numpy>=1.26",
        "sympy>=1.12",
        "math-verify>=0.7",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch/peft/accelerate only for parity tests, the PyTorch benchmarks and exports.
        "test": ["pytest>=8", "torch>=2.4", "peft>=0.13", "accelerate>=1.0"],
        "tpu": ["jax[tpu]>=0.4.35"],
        "cuda": ["jax[cuda12]>=0.4.35"],
    },
)
