"""How busy the CPUs are right now, for labelling and pacing benchmark runs.

The 1-minute load average lags: right after one benchmark script ends it still reads about
2 on this 2-core machine, and the next script used to flag itself "busy" while nothing else
ran (2026-12-06: the train script started at load 2.06 a second after the pipeline script's
last child exited). ``busy_cores`` instead samples ``/proc/stat`` over a short window while the
caller sleeps: the cores that *other* work keeps busy now. ``bench_all.py`` waits for that to
drop before starting each script, and the scripts flag a busy machine by it (by the load
average only where ``/proc/stat`` is missing).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

PROC_STAT = Path("/proc/stat")
PROC_CPUINFO = Path("/proc/cpuinfo")
BUSY_CORES = 0.5      # others using half a core or more: the run's figures are flagged
QUIET_CORES = 0.25    # bench_all starts the next script once others use less than this


# Matmul instruction sets worth naming, widest first: which kernels each library can use.
# PyTorch's oneDNN runs bfloat16 GEMMs on AMX (2.2 TFLOP/s on 2 cores of the AMX Xeon of
# 2026-12-07 against 0.37 in float32); jaxlib 0.10.2's CPU dots do not (docs/performance.md).
MATMUL_ISA = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_model(cpuinfo: Path = PROC_CPUINFO) -> Optional[str]:
    """The CPU's name with its family and model numbers and its matmul instruction sets:
    "AMD EPYC (Zen 5: family 26, model 2; AVX512-BF16, AVX-512)".

    The hosts behind this VM change: "model name" alone read "AMD EPYC" both for the Zen 4
    hosts of 2026-12-03..07 and for the Zen 5 host of 2026-12-07 14:40, whose float32 matmul
    peak was 340 against 115-217 GFLOP/s; a Xeon with AMX followed at 16:30. Runs are
    comparable only on the same hardware."""
    fields: dict = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block says it all
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    name = fields.get("model name")
    if name is None:
        return None
    family, model = fields.get("cpu family"), fields.get("model")
    if not (family and model and family.isdigit() and model.isdigit()):
        return name
    fam, mod = int(family), int(model)
    zen = None
    if fields.get("vendor_id") == "AuthenticAMD":  # AMD's family numbers name the core generation
        zen = {23: "Zen/Zen 2", 25: "Zen 3" if mod < 0x10 or 0x20 <= mod < 0x60 else "Zen 4", 26: "Zen 5"}.get(fam)
    flags = set(fields.get("flags", "").split())
    isa = [label for flag, label in MATMUL_ISA if flag in flags]
    if "AVX-512" in isa:
        isa = [label for label in isa if label != "AVX2"]  # implied by AVX-512
    suffix = f"; {', '.join(isa)}" if isa else ""
    return f"{name} ({zen + ': ' if zen else ''}family {fam}, model {mod}{suffix})"


def cpu_jiffies(stat: Path = PROC_STAT) -> Optional[tuple]:
    """(busy, total) jiffies summed over all CPUs, or None where /proc/stat is unreadable."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]      # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_cores(seconds: float = 1.0, stat: Path = PROC_STAT, cpus: Optional[int] = None) -> Optional[float]:
    """Cores kept busy over the next ``seconds`` (this process sleeps meanwhile), or None."""
    first = cpu_jiffies(stat)
    if first is None:
        return None
    time.sleep(seconds)
    second = cpu_jiffies(stat)
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return round(share * (cpus or os.cpu_count() or 1), 3)


def wait_until_quiet(max_wait_s: float = 90.0, threshold: float = QUIET_CORES, window: float = 2.0,
                     log: Callable[[str], None] = print, sample: Callable[[float], Optional[float]] = busy_cores):
    """Sleep until other work uses under ``threshold`` cores (or ``max_wait_s`` passed).

    Returns (the last busy-cores sample or None, seconds waited)."""
    start = time.monotonic()
    busy = sample(window)
    while busy is not None and busy >= threshold and time.monotonic() - start < max_wait_s:
        log(f"waiting for a quiet machine: {busy:.2f} cores busy")
        busy = sample(window)
    return busy, round(time.monotonic() - start, 1)


def busy_note(info: dict) -> Optional[str]:
    """The report's "busy machine" line for a script's ``machine`` info, or None when quiet.

    Judged by ``cpu_busy_start`` (``busy_cores`` at the script's start); runs recorded
    without it, or where it could not be read, fall back to the 1-minute load average."""
    cpus = info.get("cpu_count") or os.cpu_count() or 1
    busy = info.get("cpu_busy_start")
    if busy is not None:
        if busy < BUSY_CORES:
            return None
        what = f"{busy:.2f} of {cpus} cores busy with other work at the start"
    else:
        load = (info.get("load_avg_start") or [None])[0]
        if load is None or load <= 0.8 * cpus:
            return None
        what = f"load {load:.1f} on {cpus} CPUs"
    return (f"**Busy machine** ({what}): figures are noisy; PyTorch's OpenMP threads in particular "
            "slow down badly when cores are oversubscribed.")
