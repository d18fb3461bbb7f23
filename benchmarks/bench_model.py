#!/usr/bin/env python
"""Model throughput: diffmas_jax (JAX) vs transformers (PyTorch), side by side.

Same weights (the embedded default model, SmolLM2-135M-Instruct, or --model),
same dtype on both sides, same prompts, same machine:

  * prefill tokens/s: one forward over a B x T prompt (full logits on both sides);
  * greedy decode tokens/s: prompt + exactly N new tokens per row (no EOS stop),
    end to end (prefill included, like HF ``generate``), and decode-only
    (per-step cost with the prompt already in the cache).

Compile time is kept out of throughput (a warm-up call comes first) and reported
separately as the first call's extra time. Figures are medians of repeats.

    python benchmarks/bench_model.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_model.py --quick    # smoke test
    python benchmarks/bench_model.py --dtype bfloat16 --out /tmp/bench

Writes ``<out>/model_<date>.json`` and ``.md`` (out defaults to benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine_load import busy_cores, busy_note, cpu_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and shorter sequences (smoke test, well under a minute of timing)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter and compute dtype on both sides (default float32)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--model", default=None, help="model dir / .gguf / Hub id (default: the embedded model)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--prefill-len", type=int, default=None, help="prefill prompt tokens (default 256; quick 64)")
    ap.add_argument("--decode-prompt-len", type=int, default=None,
                    help="prompt tokens before decoding (default 64; quick 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per row (default 128; quick 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement, the sides taking turns (default 4; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--skip-torch", action="store_true", help="only time diffmas_jax")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- helpers
def median_time(fn, repeats: int):
    """Run ``fn`` ``repeats`` times; return (median seconds, all samples, last result)."""
    samples, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples, out


def alternating_times(fns, repeats: int):
    """Time each of ``fns`` ``repeats`` times, the sides taking turns in the order A B, B A,
    A B, ... so that each repeat's pair runs side by side and a machine speeding up or slowing
    down over the run (this VM drifts by tens of percent over minutes) weighs on both sides:
    with an even number of repeats, drift that is linear in time leaves the ratio of the
    medians exact (an odd number keeps one A-first pair more). Returns one (median s,
    samples, last result) per function."""
    samples, outs = [[] for _ in fns], [None] * len(fns)
    for rep in range(repeats):
        order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            outs[i] = fns[i]()
            samples[i].append(time.perf_counter() - t0)
    return [(statistics.median(s), s, o) for s, o in zip(samples, outs)]


def ratio_spread(ours, theirs) -> dict:
    """The ratio of their time to ours (>1: ours faster) three ways from two sides' samples,
    repeat i of each side taken next to each other (``alternating_times``): of the medians
    (the headline), of each side's best, and the range of the per-repeat pairs."""
    pairs = [t / o for o, t in zip(ours, theirs) if o > 0]
    return {"ratio_median": statistics.median(theirs) / statistics.median(ours),
            "ratio_best": min(theirs) / min(ours),
            "ratio_pairs": pairs}


def pairs_span(pairs) -> str:
    """'1.50–3.00x' for the repeats' pair ratios ('1.50x' for one pair)."""
    return f"{fmt(min(pairs))}–{fmt(max(pairs))}x" if len(pairs) > 1 else f"{fmt(pairs[0])}x"


def spread_cells(row) -> str:
    """'best vs best | pairs' Markdown cells for a row with ``ratio_spread``'s keys ('n/a' without)."""
    if "ratio_best" not in row:
        return "n/a | n/a"
    return f"{fmt(row['ratio_best'])}x | {pairs_span(row['ratio_pairs'])}"


def timed_first(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# JAX's own duration events for the stages a first call compiles through (jax.monitoring).
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "xla_compile_s"}
_compile_seconds = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)
_listening = []


def _on_duration(event, duration, **_):
    key = COMPILE_EVENTS.get(event)
    if key is not None:
        _compile_seconds[key] += duration


def timed_first_split(fn):
    """(seconds, fn(), split) for a first call of JAX code: ``split`` holds the seconds JAX spent
    tracing, lowering and XLA-compiling inside it (``compile_s``, their sum) and the rest
    (``run_s``: the first execution, plus host work). The (e) target is about compile time;
    on this VM a first execution is also slower than later ones (fresh memory), so both show."""
    import jax
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening.append(True)
    before = dict(_compile_seconds)
    total, out = timed_first(fn)
    split = {k: _compile_seconds[k] - before[k] for k in _compile_seconds}
    split["compile_s"] = sum(split.values())
    split["run_s"] = total - split["compile_s"]
    return total, out, split


def make_prompts(tokenizer, batch: int, length: int):
    """``batch`` distinct prompts of exactly ``length`` token ids (no padding on either side)."""
    text = (
        "The history of computing is a story of layered abstractions. Early machines were "
        "programmed by rewiring panels; then came stored programs, assemblers, compilers, "
        "operating systems and networks. Each layer hid the details of the one below it, "
        "so that people could think about larger problems. Today a language model runs on "
        "top of linear algebra libraries, which run on compilers for vector hardware, which "
        "in turn rely on decades of work in numerical analysis and chip design. ")
    ids = tokenizer(text * (length // 40 + 4 + batch), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for i in range(batch):  # shift the window so rows differ
        body = ids[7 * i: 7 * i + length - len(bos)]
        rows.append(bos + body)
    assert all(len(r) == length for r in rows), "prompt text too short"
    return rows


def machine_info(args):
    import jax
    from diffmas_jax.host_malloc import hugetlb_setting
    busy = busy_cores(1.0)  # other work only: this process sleeps while it samples
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_start": busy,
        "glibc_malloc_hugetlb": hugetlb_setting(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "dtype": args.dtype,
        "quick": args.quick,
    }
    try:
        import torch
        import transformers
        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        info["torch"] = info["transformers"] = None
    return info


# --------------------------------------------------------------------------- diffmas_jax side
class JaxSide:
    def __init__(self, model, dtype: str):
        import jax
        import jax.numpy as jnp
        from diffmas_jax.model.transformer import resolve_dtype
        self.jax, self.jnp = jax, jnp
        self.m = model
        self.dt = resolve_dtype(dtype)

    def prefill_fn(self, tokens):
        """Full-logits forward of a B x T prompt on an empty trace of capacity T."""
        from diffmas_jax.model.transformer import jit_forward
        from diffmas_jax.trace import KVTrace
        jax, jnp, m = self.jax, self.jnp, self.m
        b, t = len(tokens), len(tokens[0])
        trace = KVTrace.create(m.cfg, b, t, dtype=self.dt)
        toks = jnp.asarray(tokens, jnp.int32)

        def run():
            out = jit_forward(m.params, m.cfg, trace, tokens=toks, compute_dtype=self.dt)
            return jax.block_until_ready(out.logits)
        return run

    def _prefill_state(self, toks, valid, b, t, n):
        from diffmas_jax.generation import jit_prefill, start_decode
        from diffmas_jax.trace import KVTrace
        m = self.m
        trace = KVTrace.create(m.cfg, b, t + n, dtype=self.dt)
        trace, logits, _ = jit_prefill(m.params, m.cfg, trace, toks, valid, compute_dtype=self.dt)
        return start_decode(trace, logits, n, self.jax.random.PRNGKey(0))

    def _decode(self, state, n):
        from diffmas_jax.generation import jit_decode_steps
        pad = self.m.tokenizer.pad_token_id or 0
        return jit_decode_steps(self.m.params, self.m.cfg, state, num_steps=n, eos_ids=(),
                                pad_id=int(pad), compute_dtype=self.dt)

    def generate_fn(self, tokens, n):
        """Prefill + exactly ``n`` greedy steps (eos_ids=() so no row stops early)."""
        jax, jnp = self.jax, self.jnp
        b, t = len(tokens), len(tokens[0])
        toks = jnp.asarray(tokens, jnp.int32)
        valid = jnp.ones((b, t), bool)

        def run():
            state = self._decode(self._prefill_state(toks, valid, b, t, n), n)
            jax.block_until_ready(state.tokens)
            return state
        return run

    def decode_only_fn(self, tokens, n):
        """Only the ``n``-step decode loop, from a prefilled state made once outside the timing."""
        jax, jnp = self.jax, self.jnp
        b, t = len(tokens), len(tokens[0])
        toks = jnp.asarray(tokens, jnp.int32)
        state0 = jax.block_until_ready(self._prefill_state(toks, jnp.ones((b, t), bool), b, t, n))

        def run():  # jit_decode_steps does not donate, so state0 stays valid across calls
            return jax.block_until_ready(self._decode(state0, n))
        return run

    @staticmethod
    def new_tokens(state):
        import numpy as np
        cnt = np.asarray(state.count)
        return int(cnt.sum()), np.asarray(state.tokens)


# --------------------------------------------------------------------------- transformers side
class TorchSide:
    def __init__(self, path, dtype: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=tdt).eval()
        gc = self.model.generation_config
        # No EOS at all: every row decodes exactly N tokens and greedy picks stay plain argmax
        # (min_new_tokens alone would mask EOS logits, which diffmas_jax does not do).
        gc.eos_token_id = None
        if gc.pad_token_id is None:
            gc.pad_token_id = self.model.config.pad_token_id or 0

    def prefill_fn(self, tokens):
        torch = self.torch
        ids = torch.tensor(tokens, dtype=torch.long)
        mask = torch.ones_like(ids)

        def run():
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask, use_cache=True).logits
        return run

    def generate_fn(self, tokens, n):
        torch = self.torch
        ids = torch.tensor(tokens, dtype=torch.long)
        mask = torch.ones_like(ids)

        def run():
            with torch.no_grad():
                return self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=n, min_new_tokens=n)
        return run


# --------------------------------------------------------------------------- main
def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:,.1f}{unit}" if abs(x) >= 10 else f"{x:.2f}{unit}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report_header(title: str, info: dict, threads: int) -> list:
    """A report's first Markdown lines: title, machine and library versions, load at start and
    end, and the busy-machine warning where it applies (every bench script's report opens so)."""
    la0, la1 = info.get("load_avg_start"), info.get("load_avg_end")
    md = [f"## {title}", "",
          f"{info['date']} · {info['cpu_model'] or platform.processor()} · {info['cpu_count']} CPUs · "
          f"{info['platform']} · jax {info.get('jax')} ({info.get('jax_backend')}) · torch {info.get('torch')} "
          f"({threads} threads) · transformers {info.get('transformers')} · "
          f"load avg start/end {fmt(la0[0]) if la0 else 'n/a'}/{fmt(la1[0]) if la1 else 'n/a'}", ""]
    note = busy_note(info)
    return md + ([note, ""] if note else [])


def main(argv=None):
    import numpy as np
    args = parse_args(argv)
    q = args.quick
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    t_pre = args.prefill_len or (64 if q else 256)
    t_dec = args.decode_prompt_len or (32 if q else 64)
    n_new = args.new_tokens or (16 if q else 128)
    reps = args.repeats or (1 if q else 4)
    threads = args.threads or os.cpu_count() or 1
    t_start = time.perf_counter()

    log(f"settings: dtype={args.dtype} batches={batches} prefill_len={t_pre} "
        f"decode_prompt={t_dec} new_tokens={n_new} repeats={reps} torch_threads={threads}")
    from diffmas_jax.model.loading import load_model
    t0 = time.perf_counter()
    m = load_model(args.model, dtype=args.dtype)
    log(f"loaded diffmas_jax model from {m.path} in {time.perf_counter() - t0:.1f}s")
    info = machine_info(args)
    info["torch_threads"] = threads
    info["model"] = str(m.path)
    jx = JaxSide(m, args.dtype)
    th = None
    if not args.skip_torch:
        t0 = time.perf_counter()
        th = TorchSide(m.path, args.dtype, threads)
        log(f"loaded transformers model in {time.perf_counter() - t0:.1f}s")

    rows, compile_rows, checks = [], [], {}
    plan = [("prefill", b) for b in batches] + [("decode", b) for b in batches]
    for i, (what, b) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}]"
        if what == "prefill":
            prompts = make_prompts(m.tokenizer, b, t_pre)
            ntok = b * t_pre
            name = f"prefill tok/s (B={b}, T={t_pre})"
            log(f"{tag} {name}: diffmas_jax first call")
            fn = jx.prefill_fn(prompts)
            first, jl = timed_first(fn)
            tres = None
            if th:
                log(f"{tag} {name}: transformers first call")
                tfn = th.prefill_fn(prompts)
                tfirst, tl = timed_first(tfn)
                log(f"{tag} {name}: {reps} repeat(s), the sides taking turns")
                (med, samples, jl), (tmed, tsamples, tl) = alternating_times([fn, tfn], reps)
                tres = {"median_s": tmed, "samples_s": tsamples, "first_call_s": tfirst, "tok_s": ntok / tmed}
                diff = float(np.max(np.abs(np.asarray(jl[:, -1], np.float32) - tl[:, -1].float().numpy())))
                checks[f"prefill_B{b}_last_logits_max_abs_diff"] = diff
            else:
                ((med, samples, jl),) = alternating_times([fn], reps)
            j = {"median_s": med, "samples_s": samples, "first_call_s": first, "tok_s": ntok / med}
            rows.append({"measurement": name, "tokens": ntok, "diffmas_jax": j, "transformers": tres})
            compile_rows.append((f"prefill B={b}, T={t_pre}", j, tres))
            log(f"{tag} {name}: jax {j['tok_s']:.1f} tok/s (first call {first:.2f}s)"
                + (f", torch {tres['tok_s']:.1f} tok/s" if tres else ""))
        else:
            prompts = make_prompts(m.tokenizer, b, t_dec)
            ntok = b * n_new
            name = f"greedy decode tok/s, end to end (B={b}, prompt {t_dec}, {n_new} new)"
            log(f"{tag} {name}: diffmas_jax first call")
            fn = jx.generate_fn(prompts, n_new)
            first, st = timed_first(fn)
            # decode-only: the loop alone, prompt already prefilled (compiled above)
            dfn = jx.decode_only_fn(prompts, n_new)
            tres = td = None
            if th:
                log(f"{tag} {name}: transformers first call")
                tfn = th.generate_fn(prompts, n_new)
                tfirst, out = timed_first(tfn)
                # decode-only estimate: generate(N) minus generate(1) (= prefill + first token)
                t1fn = th.generate_fn(prompts, 1)
                t1fn()
                log(f"{tag} {name}: {reps} repeat(s), the sides taking turns")
                (med, samples, st), (tmed, tsamples, out) = alternating_times([fn, tfn], reps)
                (dmed, dsamples, _), (t1, t1s, _) = alternating_times([dfn, t1fn], reps)
                gen = out[:, t_dec:].numpy()
                assert gen.shape == (b, n_new), f"transformers decoded {gen.shape}, expected {(b, n_new)}"
                tres = {"median_s": tmed, "samples_s": tsamples, "first_call_s": tfirst, "tok_s": ntok / tmed}
                dt_ = max(tmed - t1, 1e-9)
                td = {"median_s": dt_, "generate_1_token_s": t1, "tok_s": b * (n_new - 1) / dt_,
                      "ms_per_step": 1000 * dt_ / (n_new - 1) if n_new > 1 else None}
            else:
                ((med, samples, st),) = alternating_times([fn], reps)
                ((dmed, dsamples, _),) = alternating_times([dfn], reps)
            count, jtoks = jx.new_tokens(st)
            assert count == ntok, f"diffmas_jax decoded {count} tokens, expected {ntok}"
            j = {"median_s": med, "samples_s": samples, "first_call_s": first, "tok_s": ntok / med}
            jd = {"median_s": dmed, "samples_s": dsamples, "tok_s": ntok / dmed,
                  "ms_per_step": 1000 * dmed / n_new}
            if th:
                same = jtoks == gen
                first_div = [int(np.argmin(r)) if not r.all() else n_new for r in same]
                checks[f"decode_B{b}_token_agreement"] = float(same.mean())
                checks[f"decode_B{b}_identical_prefix_per_row"] = first_div
            rows.append({"measurement": name, "tokens": ntok, "diffmas_jax": j, "transformers": tres})
            rows.append({"measurement": f"greedy decode tok/s, decode loop only (B={b})", "tokens": ntok,
                         "diffmas_jax": jd, "transformers": td})
            compile_rows.append((f"prefill+decode B={b}, {t_dec}+{n_new}", j, tres))
            log(f"{tag} {name}: jax {j['tok_s']:.1f} tok/s e2e, {jd['tok_s']:.1f} decode-only "
                f"(first call {first:.2f}s)"
                + (f"; torch {tres['tok_s']:.1f} e2e, {td['tok_s']:.1f} decode-only" if tres else ""))

    for r in rows:
        r["ratio_jax_over_torch"] = ratio((r["diffmas_jax"] or {}).get("tok_s"),
                                          (r["transformers"] or {}).get("tok_s"))
        if r["transformers"] and "samples_s" in r["transformers"]:  # not the generate(N) - generate(1) estimate
            r.update(ratio_spread(r["diffmas_jax"]["samples_s"], r["transformers"]["samples_s"]))
    info["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["total_wall_s"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- report
    md = report_header(f"Model throughput: diffmas_jax vs transformers ({args.dtype}{', quick' if q else ''})",
                       info, threads)
    md += [f"Model: `{Path(m.path).name}`. Medians of {reps} run(s) after a warm-up call, the two sides "
          "taking turns (A B, B A, ...). Ratio = diffmas_jax / transformers throughput (>1: diffmas_jax "
          "faster), of the medians; then of each side's best run, and the range over the repeats' pairs.", "",
          "| measurement | diffmas_jax | transformers (PyTorch) | ratio | best vs best | pairs |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        jv = (r["diffmas_jax"] or {}).get("tok_s")
        tv = (r["transformers"] or {}).get("tok_s")
        rt = r["ratio_jax_over_torch"]
        md.append(f"| {r['measurement']} | {fmt(jv)} | {fmt(tv)} | {fmt(rt) + 'x' if rt else 'n/a'} | "
                  f"{spread_cells(r)} |")
    md += ["", "First call (includes diffmas_jax's jit compile) vs steady-state median, seconds:", "",
           "| call | diffmas_jax first | diffmas_jax median | diffmas_jax compile overhead "
           "| transformers first | transformers median |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, j, t in compile_rows:
        md.append(f"| {name} | {fmt(j['first_call_s'])} | {fmt(j['median_s'])} | "
                  f"{fmt(j['first_call_s'] - j['median_s'])} | "
                  f"{fmt(t['first_call_s']) if t else 'n/a'} | {fmt(t['median_s']) if t else 'n/a'} |")
    if checks:
        md += ["", "Checks: " + "; ".join(
            f"{k} = {v if not isinstance(v, float) else f'{v:.3g}'}" for k, v in checks.items())]
    md += ["", "Decode loop only: diffmas_jax times `jit_decode_steps` alone from a prefilled state; "
           "transformers is estimated as generate(N) - generate(1), over N-1 steps.",
           f"Total wall time {info['total_wall_s']:.0f}s."]
    table = "\n".join(md)
    print("\n" + table + "\n", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    suffix = ("" if args.dtype == "float32" else f"_{args.dtype}") + ("_quick" if q else "")
    base = out_dir / f"model_{stamp}{suffix}"
    settings = {"batches": batches, "prefill_len": t_pre, "decode_prompt_len": t_dec,
                "new_tokens": n_new, "repeats": reps}
    base.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": rows, "checks": checks}, indent=2) + "\n")
    base.with_suffix(".md").write_text(table + "\n")
    log(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
