"""Per-jit XLA:CPU options: which jits hand their weight matmuls to YNNPACK.

``import diffmas_jax`` turns XLA:CPU's YNNPACK fusions off for the whole process (see the
package ``__init__``): over reductions and prompt-sized GEMMs they are slower here. Limited
to dots (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``: the weight matmuls go to YNNPACK; attention's
batched dots, softmax, norms and elementwise ops stay with XLA) they are faster where the
matmuls have few rows, and slower elsewhere. Measured 2026-12-04 on the 2-core AVX-512 EPYC,
jaxlib 0.10.2, embedded model, one process per figure (docs/performance.md):

- DiffMAS train step, B=4, m=10, three upstream agents, full mode: 13.3-15.5 s against
  15.6-17.3 s per step in two alternating process pairs (12.2-12.7 against 16.3-16.5 s in a
  first pair); stop mode 6.7-7.2 against 6.7-7.8 s. At B=1, full mode: 4.05-4.32 against
  4.38-5.16 s (two alternating pairs). XLA's Eigen path is slowest in the
  backward of the latent steps' one-token layers (the transposed product with each layer's
  weight slice): 30 stacked layers forward and backward at B=4, 28-30 ms against 64-66 ms.
- Greedy decode loop, prompt 64: B=8 49.7-59.1 against 55.0-60.9 ms per step in three
  alternating pairs (52-57 against 62-72 ms in two first probes); B=1 25.0-28.7 against
  23.3-25.8 ms (XLA's own matrix-vector emitter wins at one row).
- Prefill B=8 x 128 tokens over 256 slots: 1.63-1.77 against 1.50-1.52 s; the 4-agent
  pipeline's upstream phase at B=8 7.18 against 6.10 s.

So the train step (any batch) and decode loops over two or more rows compile with YNNPACK
dots; the prompt jits choose by CPU vendor (``prompt_dot_options``); every other jit keeps
XLA's own code. Options are per compilation (``jax.jit(compiler_options=)``),
so they key the persistent compilation cache too.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import jax

import diffmas_jax

YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
PROMPT_DOTS_VAR = "DIFFMAS_JAX_PROMPT_DOTS"  # auto (the measured rule below) | ynn | xla


class XlaOptionsError(ValueError):
    """A setting of this module's environment variables that it does not know (one CLI line)."""


def ynn_dot_options(rows: Optional[int] = None) -> dict:
    """``compiler_options`` handing a jit's dots to YNNPACK on CPU. With ``rows`` (a decode
    loop's batch) only from two rows up; without, always (the train step, whose backward
    gains at any batch).

    Empty on other backends, and when this project's CPU defaults are not in force
    (``DIFFMAS_JAX_KEEP_XLA_FLAGS=1``, the user's own YNN setting, an unmeasured jaxlib)."""
    if (rows is not None and rows < 2) or not diffmas_jax.CPU_DEFAULTS_APPLIED or jax.default_backend() != "cpu":
        return {}
    return dict(YNN_DOTS)


def use_out_in_kernels(rows: int) -> bool:
    """Whether a per-layer decode loop over ``rows`` rows reads its projection kernels laid out
    [out, in] (``transformer.out_in_kernels``): where its dots go to YNNPACK (two rows up).

    Greedy decode loop, embedded model, prompt 64, one process per figure, 2026-12-05:
    B=2 36.4 -> 32.0, B=4 37.2 -> 31.7, B=8 50.1/53.1 -> 42.7/41.9, B=16 69.6 -> 67.8 ms per
    step; at B=1 (XLA's emitter) 22.8/22.3 -> 23.7/23.3, so one row keeps [in, out]. With
    XLA's own dots at 8 rows the [out, in] chain was slower too (31.9 against 29.4 ms). The
    transposed per-layer copy takes 113 against 50 ms, once per call."""
    return bool(ynn_dot_options(rows))


@functools.lru_cache(maxsize=None)
def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[str]:
    """``vendor_id`` of the first CPU ("GenuineIntel", "AuthenticAMD"), or None where unreadable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                return value.strip()
    except OSError:
        pass
    return None


def prompt_dots_setting() -> str:
    """``DIFFMAS_JAX_PROMPT_DOTS`` (auto, ynn or xla; default auto), checked. Touches no JAX
    backend, so a CLI can check it before anything initialises one."""
    raw = os.environ.get(PROMPT_DOTS_VAR, "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "ynn", "xla"):
        raise XlaOptionsError(f"{PROMPT_DOTS_VAR}={raw!r}: expected auto, ynn or xla")
    return choice


def prompt_dot_options() -> dict:
    """``compiler_options`` for the jits that run prompts (prefill, an agent's stage, the
    solver's prefill, ``jit_forward``): YNNPACK's dots on Intel CPUs, XLA's own elsewhere.

    Which library is faster at prompt-sized GEMMs depends on the host, embedded model,
    jaxlib 0.10.2, one process per figure (docs/performance.md):
    - Xeon with AVX-512 and AMX (2026-12-07): a full-logits forward of 256 tokens, B=1 388-397 -> 699
      tok/s, B=8 535-554 -> 638 tok/s with YNNPACK's dots.
    - Zen 4 EPYC (2026-12-04): prefill B=8 x 128 tokens over 256 slots 1.50-1.52 s with XLA's
      against 1.63-1.77 s with YNNPACK's; the pipeline's upstream phase at B=8 6.10 against 7.18 s.
    ``DIFFMAS_JAX_PROMPT_DOTS=ynn`` or ``=xla`` overrides the rule (``auto``, the default).
    Empty on other backends and when this project's CPU defaults are not in force."""
    choice = prompt_dots_setting()
    if not diffmas_jax.CPU_DEFAULTS_APPLIED or jax.default_backend() != "cpu":
        return {}
    if choice == "auto":
        choice = "ynn" if cpu_vendor() == "GenuineIntel" else "xla"
    return dict(YNN_DOTS) if choice == "ynn" else {}
