"""diffmas_jax: multi-agent LLM systems that talk through a shared KV trace, in JAX."""
__version__ = "0.1.0"
