"""Importing diffmas_jax sets its CPU XLA defaults (fresh processes: XLA_FLAGS is read
when the backend starts), and leaves a user's own value or opt-out alone."""
import os
import subprocess
import sys

PROBE = """
import os, sys
import diffmas_jax
import jax, jax.numpy as jnp
hlo = jax.jit(lambda a, b: jax.nn.softmax(a @ b)).lower(jnp.ones((8, 64)), jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""), "|", "ynn_fusion" in hlo)
"""


def run_probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DIFFMAS_JAX_KEEP_XLA_FLAGS")}
    full.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags, fused = out.stdout.strip().rsplit("|", 1)
    return flags.strip(), fused.strip() == "True"


def test_import_turns_off_ynn_fusions_on_cpu():
    flags, fused = run_probe(XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert not fused


def test_user_value_and_opt_out_win():
    flags, _ = run_probe(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=dot"
    flags, _ = run_probe(DIFFMAS_JAX_KEEP_XLA_FLAGS="1")
    assert flags == ""
