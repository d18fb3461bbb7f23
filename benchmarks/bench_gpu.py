#!/usr/bin/env python
"""Accelerator benchmark: train-step MFU and decode bandwidth, diffmas_jax vs transformers (+ peft).

Random-init models of a given shape (no download needed), bfloat16 on both sides:

  * ``qwen3-1.7b``: Qwen3-1.7B's shape (28 layers, d=2048, GQA 16/8, head_dim 128, vocab 151936).
  * ``smollm2-135m``: the embedded model's shape.

Per shape it measures
  1. the DiffMAS LoRA train step (K upstream agents x (prompt + m latent steps), solver
     prompt + target teacher-forced; trace_grad stop and full) and a plain LoRA SFT step
     (one long sequence, the LM-standard MFU setting): tokens/s and model-FLOP utilisation;
  2. greedy decode: s/step and achieved memory bandwidth (weights + KV cache bytes read per
     step) at several batch sizes;
  3. the same on transformers (+ peft) on the same device, and the ratio.

Peaks: the device's measured bf16 matmul (8192^3 ``jnp.dot``) and device-to-device copy
bandwidth, plus the vendor spec when the device is a known one.

    python benchmarks/bench_gpu.py --out DIR            # on a GPU/TPU host
    python benchmarks/bench_gpu.py --quick --shape tiny # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_model import fmt, log, median_time, ratio  # noqa: E402
from flops import FORMULA, IMPLEMENTATION, dot_flops, linear_params, step_flops  # noqa: E402

SHAPES = {
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                       tie_embeddings=True, qk_norm=True, max_position_embeddings=40960),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                         tie_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True, qk_norm=True,
                 max_position_embeddings=4096),
}
# Train cases: (batch, K upstream agents, prompt, m latent steps, solver, target); K = 0 is plain SFT.
TRAIN_CASES = {"diffmas4": (4, 3, 128, 10, 192, 64), "diffmas8": (8, 3, 256, 10, 512, 128),
               "diffmas32": (32, 3, 256, 10, 512, 128), "sft8": (8, 0, 0, 0, 1024, 512)}
QUICK_CASES = {"diffmas4": (2, 2, 32, 2, 64, 16), "diffmas8": (2, 2, 32, 2, 64, 16),
               "diffmas32": (4, 2, 32, 2, 64, 16), "sft8": (2, 0, 0, 0, 128, 64)}
# Vendor peaks (dense bf16 FLOP/s, HBM bytes/s), keyed by a substring of the device name.
SPEC = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12),
        "TPU v5 lite": (197e12, 0.82e12), "TPU v4": (275e12, 1.2e12), "TPU v5p": (459e12, 2.76e12)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-1.7b,smollm2-135m", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--remat", default="auto",
                    help="comma list of none/full/dots (dots: keep matmul outputs); auto: full where "
                         "a full-gradient step would not fit otherwise")
    ap.add_argument("--attention", default="auto", help="comma list of auto/xla/cudnn: one row per choice")
    ap.add_argument("--cases", default=",".join(TRAIN_CASES), help="train cases: " + ", ".join(TRAIN_CASES))
    ap.add_argument("--modes", default="stop,full", help="trace_grad modes for the DiffMAS cases")
    ap.add_argument("--profile", help="trace two steps of each train row into DIR/<row> and print where the time goes")
    ap.add_argument("--decode-batches", default="1,8,32", help="comma list; empty: no decode rows")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--label", default="", help="a name for this run's variant (e.g. the XLA flags it tests): "
                    "added to the file names and the report; letters, digits, '.', '_', '-'")
    args = ap.parse_args(argv)
    if args.label and not re.fullmatch(r"[A-Za-z0-9._-]+", args.label):
        ap.error(f"--label {args.label!r}: use letters, digits, '.', '_' and '-' only (it becomes part of file names)")
    return args


def sync_torch():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_peaks(q):
    """Measured bf16 matmul FLOP/s and copy bandwidth of JAX's default device, plus vendor spec."""
    import jax
    import jax.numpy as jnp
    n = 1024 if q else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    jax.block_until_ready(f(a, a))
    mm, _, _ = median_time(lambda: jax.block_until_ready(f(a, a)), 10)
    nbytes = (2 ** 24 if q else 2 ** 30)  # bf16 elements x 2 bytes
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    g = jax.jit(lambda v: v + 1)
    jax.block_until_ready(g(x))
    cp, _, _ = median_time(lambda: jax.block_until_ready(g(x)), 10)
    name = jax.devices()[0].device_kind
    spec = next((v for k, v in SPEC.items() if k in name), (None, None))
    return {"device": name, "matmul_n": n, "matmul_flop_s": 2 * n ** 3 / mm,
            "copy_bytes_s": 2 * nbytes / cp, "spec_flop_s": spec[0], "spec_bytes_s": spec[1]}


# --------------------------------------------------------------------------- JAX side
def jax_train(cfg, params, b, k, t_up, m, t_sol, n_tgt, mode, reps, remat, profile_dir=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.stages import make_realign
    from diffmas_jax.training import StepConfig, make_optimizer, make_train_step
    rng = np.random.default_rng(0)
    up = [rng.integers(10, cfg.vocab_size, (b, t_up), dtype=np.int32) for _ in range(k)]
    sol = rng.integers(10, cfg.vocab_size, (b, t_sol), dtype=np.int32)
    tgt = np.zeros((b, t_sol), bool)
    tgt[:, -n_tgt:] = True
    batch = {"up_tokens": [jnp.asarray(u) for u in up], "up_valid": [jnp.ones(u.shape, bool) for u in up],
             "tokens": jnp.asarray(sol), "valid": jnp.ones(sol.shape, bool), "target_mask": jnp.asarray(tgt)}
    lcfg = LoraConfig(rank=8, alpha=16.0)
    roles = ("planner", "critic", "refiner")[:k] + ("solver",)
    sc = StepConfig(method="diffmas", trace_grad=mode, roles=roles, latent_steps=(m,) * k,
                    up_lengths=(t_up,) * k, solver_length=t_sol, capacity=k * (t_up + m) + t_sol,
                    lora_scale=lcfg.scale, remat=remat, compute_dtype="bfloat16", max_target=n_tgt)
    opt = make_optimizer(5e-5, 1, 0, 0.0, 1.0, 1)
    step = make_train_step(cfg, sc, opt)
    realign = make_realign(params, cfg, "norm")
    st = {"lora": init_lora(cfg, lcfg, jax.random.PRNGKey(0))}
    st["opt"] = opt.init(st["lora"])

    def run():
        st["lora"], st["opt"], met = step(st["lora"], st["opt"], params, realign, batch)
        return float(jax.block_until_ready(met["loss"]))
    t0 = time.perf_counter()
    loss0 = run()
    first = time.perf_counter() - t0
    med, samples, _ = median_time(run, reps)
    # FLOPs run (HFU's numerator): the model's plus recomputation (remat, attention scores) and LoRA.
    # Traced after the first call, whose time must include tracing.
    run_flops = dot_flops(step, st["lora"], st["opt"], params, realign, batch)
    out = {"median_s": med, "samples_s": samples, "first_call_s": first, "first_loss": loss0,
           "implementation_flops": run_flops}
    if profile_dir:
        from profile_summary import render, summarize
        with jax.profiler.trace(profile_dir):
            run()
            run()
        out["profile"] = summarize(profile_dir, steps=2)
        log("profile:\n" + render(out["profile"]))
    return out, (up, sol)


def jax_decode(cfg, params, b, prompt, new, reps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffmas_jax.generation import jit_decode_steps, jit_prefill, start_decode
    from diffmas_jax.trace import KVTrace
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(10, cfg.vocab_size, (b, prompt), dtype=np.int32))
    tr = KVTrace.create(cfg, b, prompt + new, dtype=jnp.bfloat16)
    tr, logits, _ = jit_prefill(params, cfg, tr, toks, jnp.ones((b, prompt), bool), compute_dtype="bfloat16")
    state0 = start_decode(tr, logits, new, jax.random.PRNGKey(0))

    def run():
        s = jit_decode_steps(params, cfg, state0, num_steps=new, eos_ids=(), compute_dtype="bfloat16")
        return jax.block_until_ready(s.tokens)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    med, samples, out = median_time(run, reps)
    kv_bytes = cfg.num_layers * 2 * b * (prompt + new) * cfg.num_kv_heads * cfg.head_dim * 2
    return {"median_s": med, "samples_s": samples, "first_call_s": first, "s_per_step": med / new,
            "tok_s": b * new / med, "kv_bytes_per_step": kv_bytes}, np.asarray(out)


# --------------------------------------------------------------------------- PyTorch side
def hf_config(shape):
    import transformers
    s = SHAPES[shape]
    cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[s["model_type"]]
    return cls(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
               num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
               num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"], rope_theta=s.get("rope_theta", 10000.0),
               tie_word_embeddings=True, max_position_embeddings=s["max_position_embeddings"],
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def torch_model(shape, device):
    import torch
    import transformers
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
    return model.eval()


def torch_decode(model, b, prompt, new, reps, device):
    import numpy as np
    import torch
    rng = np.random.default_rng(1)
    ids = torch.tensor(rng.integers(10, model.config.vocab_size, (b, prompt)), device=device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def gen(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)
        sync_torch()
        return out
    gen(new)
    med, samples, _ = median_time(lambda: gen(new), reps)
    med1, _, _ = median_time(lambda: gen(1), reps)
    loop = (med - med1) / max(new - 1, 1)
    return {"median_s": med, "samples_s": samples, "tok_s": b * new / med, "s_per_step_loop": loop}


def torch_train(model, up, sol, n_tgt, m, mode, reps, device):
    from bench_train import TorchTrain
    import torch
    import gc
    th = TorchTrain(None, 8, 5e-5, os.cpu_count() or 1, base=model, device=device)
    try:
        fn, st = th.step_fn([u.tolist() for u in up], sol.tolist(), n_tgt, m, mode)

        def run():
            fn()
            sync_torch()
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        med, samples, _ = median_time(run, reps)
        return {"median_s": med, "samples_s": samples, "first_call_s": first, "first_loss": st["losses"][0]}, model
    finally:
        # Also after an out-of-memory error: take the adapter off the shared base model (PEFT
        # edits it in place) and hand the cached blocks back, or every later torch row (and
        # JAX's cuDNN calls) would start short of memory.
        th.model.unload()
        del th
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- main
def split(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def remat_value(mode, b, t_sol, trace_grad):
    """The train step's ``remat`` for a --remat choice. auto: full remat for the large
    full-gradient cases, whose activations exceed 80 GB otherwise."""
    if mode == "auto":
        return trace_grad == "full" and b * t_sol >= 4096
    return {"none": False, "full": True, "dots": "dots"}[mode]


def main(argv=None):
    args = parse_args(argv)
    q = args.quick
    reps = args.repeats or (1 if q else 5)
    import jax
    import jax.numpy as jnp
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import init_params
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = out_dir / f"gpu_{stamp}{'_quick' if q else ''}{'_' + args.label if args.label else ''}"
    # XLA_FLAGS as in force (diffmas_jax's import may add its defaults): A/B runs differ only here.
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "label": args.label, "xla_flags": os.environ.get("XLA_FLAGS", ""), "shapes": {}}
    device = "cpu"
    if not args.skip_torch:
        import torch
        import transformers
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report.update(torch=torch.__version__, transformers=transformers.__version__, torch_device=device)
    log("measuring device peaks")
    peaks = device_peaks(q)
    report["peaks"] = peaks
    log(f"peaks: {peaks}")
    flop_peak = peaks["spec_flop_s"] or peaks["matmul_flop_s"]
    bw_peak = peaks["spec_bytes_s"] or peaks["copy_bytes_s"]

    def save():  # atomic: a run killed mid-write keeps the last complete file
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, path.with_suffix(".json"))

    for shape in [s.strip() for s in args.shape.split(",") if s.strip()]:
        cfg = ModelConfig(**SHAPES[shape])
        params = init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
        res = report["shapes"].setdefault(shape, {"train": [], "decode": []})
        res["params"] = cfg.num_params()
        tm = None
        if not args.skip_torch:
            tm = torch_model(shape, device)
        cases = QUICK_CASES if q else TRAIN_CASES
        variants = [(a, r) for a in split(args.attention) for r in split(args.remat)]
        runs = [(c, mode, a, r) for c in split(args.cases) for mode in (split(args.modes) if cases[c][1] else ["full"])
                for a, r in variants]
        torch_rows = {}
        for (case, mode, attn, remat_mode) in runs:
            (b, k, t_up, m, t_sol, n_tgt) = cases[case]
            name = f"B={b} K={k} prompt={t_up} m={m} solver={t_sol} target={n_tgt} trace_grad={mode}"
            remat = remat_value(remat_mode, b, t_sol, mode)
            if len(variants) > 1:
                name += f" attention={attn} remat={remat}"
            row = {"case": name, "batch": b, "tokens": b * (k * (t_up + m) + t_sol), "attention": attn}
            res["train"].append(row)  # filled in place; saved after each side, so a run cut short keeps it
            chunks = [t_up, m] * k + [t_sol]
            # trace_grad=full: everything is back-propagated; stop: the solver's chunk only.
            row["flops"] = step_flops(cfg, b, chunks, n_tgt, 0 if mode == "full" else len(chunks) - 1)
            try:
                log(f"[{shape}] train {name}: jax")
                row["remat"] = remat
                j, (up, sol) = jax_train(dataclasses.replace(cfg, attention=attn), params, b, k, t_up, m, t_sol,
                                         n_tgt, mode, reps, remat,
                                         args.profile and f"{args.profile}/{shape}_{len(res['train'])}")
                j.update(tok_s=row["tokens"] / j["median_s"], mfu=row["flops"] / j["median_s"] / flop_peak,
                         hfu=j["implementation_flops"] / j["median_s"] / flop_peak)
                row["jax"] = j
                save()
                if tm is not None and (case, mode) not in torch_rows:  # once per case, not per variant
                    log(f"[{shape}] train {name}: torch")
                    t, tm = torch_train(tm, up, sol, n_tgt, m, mode, reps, device)
                    t.update(tok_s=row["tokens"] / t["median_s"], mfu=row["flops"] / t["median_s"] / flop_peak)
                    torch_rows[(case, mode)] = t
                if (case, mode) in torch_rows:
                    row["torch"] = t = torch_rows[(case, mode)]
                    row["ratio"] = ratio(j["tok_s"], t["tok_s"])
            except Exception as e:  # keep the other rows: one case running out of memory is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            log(f"[{shape}] {json.dumps({k_: v for k_, v in row.items() if k_ in ('jax', 'torch', 'ratio', 'error')}, default=str)[:400]}")
            save()
        prompt, new = (32, 16) if q else (1024, 128)
        for b in [int(x) for x in split(args.decode_batches)]:
            row = {"batch": b, "prompt": prompt, "new_tokens": new}
            try:
                log(f"[{shape}] decode B={b}: jax")
                j, _ = jax_decode(cfg, params, b, prompt, new, reps)
                wbytes = 2 * (linear_params(cfg) + cfg.hidden_size * cfg.vocab_size)
                j["weight_bytes_per_step"] = wbytes
                j["bytes_s"] = (wbytes + j["kv_bytes_per_step"]) / j["s_per_step"]
                j["bw_util"] = j["bytes_s"] / bw_peak
                row["jax"] = j
                if tm is not None:
                    log(f"[{shape}] decode B={b}: torch")
                    row["torch"] = torch_decode(tm, b, prompt, new, reps, device)
                    row["ratio"] = ratio(j["tok_s"], row["torch"]["tok_s"])
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            res["decode"].append(row)
            log(f"[{shape}] {json.dumps(row, default=str)[:400]}")
            save()
        del params, tm

    md = render(report, flop_peak, bw_peak)
    print("\n" + md, flush=True)
    path.with_suffix(".md").write_text(md + "\n")
    save()
    log(f"wrote {path}.json and .md")
    return 0


def render(report, flop_peak, bw_peak):
    p = report["peaks"]
    label = f", {report['label']}" if report.get("label") else ""
    lines = [f"## Accelerator benchmark ({p['device']}, {report['date'][:10]}{label})", "",
             f"XLA_FLAGS: `{report['xla_flags']}`" if report.get("xla_flags") else "XLA_FLAGS: none", "",
             f"jax {report['jax']} ({report['backend']}); torch {report.get('torch', 'n/a')}, transformers "
             f"{report.get('transformers', 'n/a')}. bf16 both sides, random init. Measured: bf16 matmul "
             f"{p['matmul_flop_s'] / 1e12:.0f} TFLOP/s ({p['matmul_n']}^3), copy {p['copy_bytes_s'] / 1e12:.2f} TB/s. "
             f"MFU and bandwidth use {'the vendor spec' if p['spec_flop_s'] else 'the measured peaks'}: "
             f"{flop_peak / 1e12:.0f} TFLOP/s, {bw_peak / 1e12:.2f} TB/s.", ""]
    for shape, res in report["shapes"].items():
        lines += [f"### {shape} ({res['params'] / 1e9:.2f} B params)", "",
                  "| train step | tokens | jax s/step | jax tok/s | jax MFU | jax HFU | torch s/step | torch tok/s "
                  "| torch MFU | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["train"]:
            j, t = r.get("jax") or {}, r.get("torch") or {}
            lines.append(f"| {r['case']} | {r['tokens']} | {fmt(j.get('median_s'))} | {fmt(j.get('tok_s'))} | "
                         f"{fmt(100 * j['mfu']) + '%' if 'mfu' in j else r.get('error', 'n/a')[:60]} | "
                         f"{fmt(100 * j['hfu']) + '%' if 'hfu' in j else 'n/a'} | "
                         f"{fmt(t.get('median_s'))} | {fmt(t.get('tok_s'))} | "
                         f"{fmt(100 * t['mfu']) + '%' if 'mfu' in t else 'n/a'} | "
                         f"{fmt(r['ratio']) + 'x' if r.get('ratio') else 'n/a'} |")
        lines += ["", "| greedy decode | jax ms/step | jax tok/s | jax GB/s (weights + KV) | % of HBM peak "
                  "| torch tok/s | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["decode"]:
            j, t = r.get("jax") or {}, r.get("torch") or {}
            lines.append(f"| B={r['batch']}, prompt {r['prompt']}, {r['new_tokens']} new | "
                         f"{fmt(1e3 * j['s_per_step']) if 's_per_step' in j else r.get('error', 'n/a')[:60]} | "
                         f"{fmt(j.get('tok_s'))} | {fmt(j['bytes_s'] / 1e9) if 'bytes_s' in j else 'n/a'} | "
                         f"{fmt(100 * j['bw_util']) + '%' if 'bw_util' in j else 'n/a'} | {fmt(t.get('tok_s'))} | "
                         f"{fmt(r['ratio']) + 'x' if r.get('ratio') else 'n/a'} |")
        lines.append("")
    lines.append(f"MFU counts the {FORMULA} HFU counts {IMPLEMENTATION} Decode bytes per step: bf16 weights (incl. the LM head) + the "
                 "whole K/V cache capacity.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
