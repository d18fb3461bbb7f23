"""Transparent huge pages for the host allocator's large blocks (glibc's ``hugetlb`` tunable).

XLA:CPU allocates an executable's temporaries afresh on every run and frees them after,
so each run touches gigabytes of freshly mapped memory: the DiffMAS full-mode train step
of the embedded model (B=4, 5.1 GB of temporaries) takes 1.5 M minor page faults per
step. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages
on the blocks it maps (``madvise``): in five alternating process pairs (2026-12-03) the
minor page faults fell from 7.5 M to 0.4 M per benchmark process and the full-mode step
from 23.6 s to 19.3 s (means); see docs/performance.md.

glibc reads its tunables once, when a process starts, so the setting cannot be switched
on from inside a running Python. The CPU entry points set it: the Makefile and
``benchmarks/bench_all.py`` (for the scripts it starts, through ``with_hugetlb``). A value
the user already gave ``glibc.malloc.hugetlb`` wins (``=0`` turns it off). glibc before 2.35
and kernels without transparent huge pages ignore it. Not set by the GPU/TPU launchers:
measured on this project's CPU paths only.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
HUGETLB = f"{TUNABLE}=1"  # 1: madvise(MADV_HUGEPAGE) on malloc's mmap'd blocks and heap


def with_hugetlb(env: Mapping[str, str]) -> dict:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` asks for huge pages, keeping its other tunables."""
    env = dict(env)
    current = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return env
    env["GLIBC_TUNABLES"] = ":".join(t for t in (current, HUGETLB) if t)
    return env


def with_hugetlb_value(env: Mapping[str, str], value: str) -> dict:
    """A copy of ``env`` with ``glibc.malloc.hugetlb`` forced to ``value`` (for A/B measurements)."""
    env = dict(env)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.partition("=")[0] != TUNABLE]
    env["GLIBC_TUNABLES"] = ":".join(kept + [f"{TUNABLE}={value}"])
    return env


def hugetlb_setting(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The ``glibc.malloc.hugetlb`` value this process started with (None when unset)."""
    env = os.environ if env is None else env
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value
    return None
