#!/usr/bin/env python
"""Where decode time goes on this machine: the floor set by the matmuls and by memory.

A decode step of a dense LM multiplies B rows by every weight matrix once
(q, k, v, o, gate, up, down in every layer, then the LM head). This script times
exactly that chain of matmuls, with the model's own shapes and weights, in XLA
(jitted, one program) and in PyTorch (eager, no_grad), plus one read of all the
weights (the memory-bandwidth floor), and the cost of writing freshly allocated memory
(the floor under every XLA:CPU run, which maps its temporaries anew). A full decode step in either library cannot
be faster than its chain; comparing the chain with the measured step time
(bench_model.py / bench_pipeline.py) shows how much is left for everything else
(attention over the cache, norms, RoPE, sampling, Python and dispatch overhead).

    python benchmarks/bench_kernels.py                 # embedded SmolLM2-135M, B = 1, 8, 32
    python benchmarks/bench_kernels.py --quick         # B = 1 and 8, fewer repeats, 1 GB touched

Writes ``<out>/kernels_<date>.json`` and ``.md`` (out defaults to benchmarks/results).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine_load import cpu_model  # noqa: E402

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B = 1, 8 and 3 repeats")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--touch-gb", type=float, default=None,
                    help="GB of fresh memory to write per touch (default 5.1, the full-mode train step's XLA "
                         "temporaries; quick 1; 0 skips)")
    ap.add_argument("--touch-child", nargs=2, metavar=("BYTES", "REPEATS"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def touch_fresh_memory(n_bytes: int, repeats: int) -> list[dict]:
    """malloc ``n_bytes``, write one byte per 4 KiB page, free; ``repeats`` times in this process.

    Goes through libc's malloc (not numpy, which asks for huge pages itself), so glibc's
    tunables decide the pages, as they do for XLA:CPU's temporaries."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    out = []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ptr = libc.malloc(n_bytes)
        if not ptr:
            raise MemoryError(f"malloc of {n_bytes} bytes failed")
        np.frombuffer((ctypes.c_uint8 * n_bytes).from_address(ptr), np.uint8)[::4096] = 1
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        libc.free(ptr)
        out.append(dict(wall_s=t1 - t0, sys_s=r1.ru_stime - r0.ru_stime, minor_faults=r1.ru_minflt - r0.ru_minflt))
    return out


def memory_touch_floor(gb: float, repeats: int = 4, order: str = "1010") -> list[dict]:
    """First and later writes of ``gb`` GB of fresh memory, one fresh process per letter of ``order``
    (the glibc.malloc.hugetlb setting it runs with).

    A process's first touch of memory is what the first run of a compiled step pays on top of
    the steady runs; the later touches, what every run pays for temporaries mapped anew. On a VM
    the first touch also depends on how recently the guest used that memory, hence each setting
    twice, alternating."""
    from diffmas_jax.host_malloc import with_hugetlb_value
    n_bytes = int(gb * 1e9)
    rows = []
    for value in order:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--touch-child", str(n_bytes), str(repeats)]
        proc = subprocess.run(cmd, env=with_hugetlb_value(os.environ, value), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory touch child failed: {proc.stderr.strip().splitlines()[-1:]}")
        runs = json.loads(proc.stdout)
        later = runs[1:]
        rows.append(dict(hugetlb=value, gb=n_bytes / 1e9, first_wall_s=runs[0]["wall_s"], first_sys_s=runs[0]["sys_s"],
                         first_faults=runs[0]["minor_faults"],
                         later_wall_s=statistics.median(r["wall_s"] for r in later),
                         later_sys_s=statistics.median(r["sys_s"] for r in later),
                         later_faults=int(statistics.median(r["minor_faults"] for r in later))))
        print(f"fresh memory {n_bytes / 1e9:.1f} GB, hugetlb={value}: first touch {rows[-1]['first_wall_s']:.2f} s, "
              f"later {rows[-1]['later_wall_s']:.2f} s", file=sys.stderr)
    return rows


def weight_chain(params, fused: bool = False) -> list[np.ndarray]:
    """Every [in, out] matrix a decode step multiplies by, in order (LM head last). ``fused``:
    q/k/v and gate/up concatenated as the CPU decode loop runs them (``fuse_projections``)."""
    from diffmas_jax.model.transformer import fuse_projections
    layers = params["layers"]
    names = ("qkv", "o", "gate_up", "down") if fused else LINEARS
    mats = []
    for i in range(layers["q"]["kernel"].shape[0]):
        layer = {name: {"kernel": np.asarray(layers[name]["kernel"][i])} for name in LINEARS}
        if fused:
            layer = fuse_projections(layer)
        mats += [np.asarray(layer[name]["kernel"]) for name in names]
    head = params.get("lm_head")
    mats.append(np.asarray(head) if head is not None else np.ascontiguousarray(np.asarray(params["embed"]).T))  # tied
    return mats


def main(argv=None):
    args = parse_args(argv)
    if args.touch_child:
        print(json.dumps(touch_fresh_memory(int(args.touch_child[0]), int(args.touch_child[1]))))
        return
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    repeats = args.repeats or (3 if args.quick else 10)
    import jax
    import jax.numpy as jnp
    import torch
    torch.set_num_threads(args.threads or os.cpu_count())
    from diffmas_jax.model.loading import load_model

    model = load_model(None, with_tokenizer=False)
    mats = weight_chain(model.params)
    n_bytes = sum(m.nbytes for m in mats)
    n_params = sum(m.size for m in mats)

    jmats = [jnp.asarray(m) for m in mats]
    jfused = [jnp.asarray(m) for m in weight_chain(model.params, fused=True)]
    tmats = [torch.from_numpy(np.ascontiguousarray(m)) for m in mats]
    from diffmas_jax.model.transformer import matmul_out_in
    from diffmas_jax.xla_cpu import use_out_in_kernels, ynn_dot_options
    jfused_out_in = [m.T.copy() for m in jfused[:-1]] + [jfused[-1]]  # layer kernels [out, in]; LM head [D, V]

    def decode_chain(out_in: bool):
        """The fused chain as the decode loop compiles it: layer kernels [out, in] if ``out_in``."""
        def chain(ws, xs):
            acc = jnp.zeros((), jnp.float32)
            for w in ws[:-1]:
                acc = acc + jnp.sum(matmul_out_in(xs[w.shape[1]], w) if out_in else xs[w.shape[0]] @ w)
            return acc + jnp.sum(xs[ws[-1].shape[0]] @ ws[-1])
        return chain

    @jax.jit
    def jax_chain(ws, xs):
        # One input per input width (hidden, heads x head_dim, intermediate); the sum keeps all live.
        acc = jnp.zeros((), jnp.float32)
        for w in ws:
            acc = acc + jnp.sum(xs[w.shape[0]] @ w)
        return acc

    def torch_chain(xs):
        with torch.no_grad():
            acc = torch.zeros(())
            for w in tmats:
                acc = acc + (xs[w.shape[0]] @ w).sum()
            return float(acc)

    widths = sorted({m.shape[0] for m in mats})
    rows = []
    for b in batches:
        xj = {w: jnp.ones((b, w), jnp.float32) for w in widths}
        xt = {w: torch.ones((b, w)) for w in widths}
        tj = median_time(lambda: jax_chain(jmats, xj).block_until_ready(), repeats)
        tf = median_time(lambda: jax_chain(jfused, xj).block_until_ready(), repeats)
        out_in = use_out_in_kernels(b)  # and YNNPACK dots from two rows, as generation.jit_decode_steps
        decode = jax.jit(decode_chain(out_in), compiler_options=ynn_dot_options(b))
        dws = jfused_out_in if out_in else jfused
        td = median_time(lambda: decode(dws, xj).block_until_ready(), repeats)
        tt = median_time(lambda: torch_chain(xt), repeats)
        flops = 2 * b * n_params
        rows.append(dict(batch=b, xla_ms=tj * 1e3, xla_fused_ms=tf * 1e3, xla_decode_ms=td * 1e3,
                         decode_layout="[out, in]" if out_in else "[in, out]", torch_ms=tt * 1e3, xla_gflop_s=flops / tj / 1e9,
                         torch_gflop_s=flops / tt / 1e9, xla_gb_s=n_bytes / tj / 1e9, torch_gb_s=n_bytes / tt / 1e9))
        print(f"B={b}: matmul chain XLA {tj * 1e3:.1f} ms (fused {tf * 1e3:.1f}, decode loop's {td * 1e3:.1f}), "
              f"torch {tt * 1e3:.1f} ms",
              file=sys.stderr)

    touch_gb = args.touch_gb if args.touch_gb is not None else (1.0 if args.quick else 5.1)
    touch = memory_touch_floor(touch_gb) if touch_gb > 0 else []

    from diffmas_jax.host_malloc import hugetlb_setting
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    machine = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), platform=platform.platform(),
                   cpu_model=cpu_model(), cpu_count=os.cpu_count(), load_avg=list(os.getloadavg()), glibc_malloc_hugetlb=hugetlb_setting(),
                   jax=jax.__version__,
                   torch=torch.__version__, torch_threads=torch.get_num_threads(), jax_backend=jax.default_backend())
    result = dict(machine=machine, weights_mib=n_bytes / 2**20, matrices=len(mats), rows=rows, memory_touch=touch)
    md = [f"# Decode-step floors: the model's matmul chain, embedded SmolLM2-135M, float32 ({machine['date']})", "",
          f"{machine['cpu_model'] or platform.processor()}. "
          f"{len(mats)} matrices ({n_bytes / 2**20:.0f} MiB), each multiplied once by B rows. GB/s: the weights "
          f"streamed per second (at B = 1 the chain is a memory-bandwidth test). Load average at start "
          f"{machine['load_avg'][0]:.2f}; torch threads {machine['torch_threads']}. XLA fused: the same "
          f"weights with q/k/v and gate/up concatenated per layer. Decode loop's: the fused chain compiled "
          f"as the CPU decode loop compiles it (from two rows YNNPACK dots and layer kernels laid out "
          f"[out, in], `matmul_out_in`).", "",
          "| batch | XLA chain ms | XLA fused chain ms | decode loop's chain ms (layout) | torch chain ms | XLA GFLOP/s | "
          "torch GFLOP/s | XLA GB/s | torch GB/s |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['batch']} | {r['xla_ms']:.1f} | {r['xla_fused_ms']:.1f} | {r['xla_decode_ms']:.1f} ({r['decode_layout']}) | "
           f"{r['torch_ms']:.1f} | {r['xla_gflop_s']:.1f} | "
           f"{r['torch_gflop_s']:.1f} | {r['xla_gb_s']:.1f} | {r['torch_gb_s']:.1f} |" for r in rows]
    if touch:
        md += ["", "Fresh memory: malloc, write every 4 KiB page, free, four times in one fresh process; one "
               "process per row, in this order, alternating glibc.malloc.hugetlb (1: transparent huge pages). The first touch is what a process's "
               "first run of a step pays; the later ones (median), what each run pays for temporaries mapped anew.", "",
               "| hugetlb | GB | first touch s (system s) | later touches s (system s) | minor faults first / later |",
               "|---|---:|---:|---:|---:|"]
        md += [f"| {t['hugetlb']} | {t['gb']:.1f} | {t['first_wall_s']:.2f} ({t['first_sys_s']:.2f}) | "
               f"{t['later_wall_s']:.2f} ({t['later_sys_s']:.2f}) | {t['first_faults']} / {t['later_faults']} |"
               for t in touch]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{stamp}.json").write_text(json.dumps(result, indent=2))
    (out / f"kernels_{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
