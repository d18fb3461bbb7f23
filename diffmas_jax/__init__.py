"""diffmas_jax: multi-agent LLM systems that talk through a shared KV trace, in JAX."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU's YNNPACK library fusions (on by default in recent jaxlib) make this project's
# CPU decode step 1.5x slower at batch 8 (embedded model, 656-slot trace: ~220 ms against
# ~145 ms with XLA's own codegen), mostly in the softmax reductions and small GEMMs they
# take over; see benchmarks/README.md. Jits dominated by few-row weight matmuls (the train
# step, decode loops over several rows) hand just their dots back to YNNPACK (``xla_cpu``).
# The flags are CPU-only and take effect only if the backend is not yet initialised; a
# value the user already put in XLA_FLAGS wins, and DIFFMAS_JAX_KEEP_XLA_FLAGS=1 leaves
# XLA_FLAGS untouched (either way no jit gets per-jit options). XLA aborts on a flag it
# does not know, so only the jaxlib releases that have this experimental flag get it.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_FLAGS_FOR_JAXLIB = ((0, 10), (0, 11))  # [from, until): the releases it was measured on


def _jaxlib_version() -> tuple:
    from importlib import metadata
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


# The flags this package added to XLA_FLAGS, so that a child process (which inherits them)
# can tell them from a user's own setting: without it every subprocess of a diffmas_jax
# process (bench_all's scripts, the pipeline benchmark's fresh runs) lost its per-jit
# YNNPACK dots.
ADDED_FLAGS_VAR = "DIFFMAS_JAX_ADDED_XLA_FLAGS"


def _apply_cpu_xla_flags() -> bool:
    """Add the CPU defaults to XLA_FLAGS; True when this project's settings are in force
    (not opted out, a measured jaxlib, and each flag added here or by a parent process
    running diffmas_jax, none set by the user)."""
    low, high = _FLAGS_FOR_JAXLIB
    if _os.environ.get("DIFFMAS_JAX_KEEP_XLA_FLAGS") == "1" or not low <= _jaxlib_version() < high:
        return False
    flags = _os.environ.get("XLA_FLAGS", "")
    missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if missing:
        _os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    inherited = set(_os.environ.get(ADDED_FLAGS_VAR, "").split()) & set(flags.split())
    ours = [f for f in CPU_XLA_FLAGS if f in missing or f in inherited]
    _os.environ[ADDED_FLAGS_VAR] = " ".join(ours)
    return len(ours) == len(CPU_XLA_FLAGS)


# Read by ``xla_cpu.ynn_dot_options``: per-jit YNNPACK dots only where our defaults rule.
CPU_DEFAULTS_APPLIED = _apply_cpu_xla_flags()
