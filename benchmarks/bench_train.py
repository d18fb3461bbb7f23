#!/usr/bin/env python
"""DiffMAS LoRA train step: diffmas_jax (JAX) vs transformers + peft (PyTorch), side by side.

One step = K upstream agents (default 3) each prefill a prompt (default 128 tokens)
onto a shared KV cache and run m latent steps (default 10, the final-normed last
hidden state, rescaled to the mean embedding norm, fed back as the next input
embedding), then the solver's prompt + target (default 192 tokens, the last 64 the
target) is teacher-forced on top; loss = mean NLL of the target tokens, backward,
global-norm clip 1.0, AdamW on the LoRA parameters only (r=8, alpha=16, all
linear layers q,k,v,o,gate,up,down; same kaiming-A / zero-B init on both sides).

  * trace_grad=stop: the upstream agents build the cache without gradients;
  * trace_grad=full: gradients flow back through every upstream prefill and latent step.

Both sides see the same token ids (windows of real tokenized text, no padding).
Throughput counts every token the step processes: B x (K x prompt + K x m + solver).
The JAX step's model-FLOP utilisation is measured against the fastest float32 matmul
measured on the same machine: a jitted 2048x2048 ``jnp.dot`` with XLA's dots and with
YNNPACK's (which the train step uses on CPU), and torch.mm when the PyTorch side runs
(formula in the output).

    python benchmarks/bench_train.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_train.py --quick    # smoke test
    python benchmarks/bench_train.py --batch 4,8 --out /tmp/bench

Writes ``<out>/train_<date>.json`` and ``.md`` (out defaults to benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_model import (alternating_times, fmt, log, machine_info, median_time, ratio, ratio_spread,
                         report_header, spread_cells, timed_first,
                         timed_first_split)  # noqa: E402
from flops import FORMULA, IMPLEMENTATION, conventional_6n, dot_flops, linear_params, step_flops  # noqa: E402

ROLES = ("planner", "critic", "refiner", "math", "science", "code")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and 1 repeat (smoke test, about a minute)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--model", default=None, help="model dir / .gguf / Hub id (default: the embedded model)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 4; quick 2)")
    ap.add_argument("--modes", default="stop,full", help="trace_grad modes to time (default stop,full)")
    ap.add_argument("--agents", type=int, default=None, help="upstream agents K (default 3; quick 2)")
    ap.add_argument("--latent-steps", type=int, default=None, help="latent steps m per agent (default 10; quick 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="upstream prompt tokens (default 128; quick 32)")
    ap.add_argument("--solver-len", type=int, default=None,
                    help="solver prompt + target tokens (default 192; quick 48)")
    ap.add_argument("--target-len", type=int, default=None, help="target tokens (default 64; quick 16)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per measurement, the sides taking turns (default 6; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--skip-torch", action="store_true", help="only time diffmas_jax")
    args = ap.parse_args(argv)
    args.dtype = "float32"  # for machine_info; both sides train in float32
    return args


# --------------------------------------------------------------------------- inputs
def token_windows(tokenizer, n: int, length: int, start: int = 0):
    """``n`` distinct rows of exactly ``length`` real token ids (windows into arith question text)."""
    from diffmas_jax.tasks import get_task
    items = get_task("arith", size=400).load("train")
    ids = tokenizer(" ".join(it.question + " " + it.target for it in items), add_special_tokens=False)["input_ids"]
    need = start + 13 * n + length
    while len(ids) < need:
        ids = ids + ids
    return [ids[start + 13 * i: start + 13 * i + length] for i in range(n)]


def make_inputs(tokenizer, b, k, t_up, t_sol):
    """Upstream prompts [K][B][t_up] and solver prompt+target [B][t_sol], all real tokens."""
    up = [token_windows(tokenizer, b, t_up, start=1000 * j) for j in range(k)]
    sol = token_windows(tokenizer, b, t_sol, start=1000 * k)
    return up, sol


# --------------------------------------------------------------------------- FLOPs
def count_flops(cfg, b, k, t_up, m, t_sol, n_tgt, mode):
    """The step's model FLOPs (``flops.FORMULA``): the chunks are K x (prompt, m latent steps) then
    the solver; trace_grad=full back-propagates all of them, stop only the solver's."""
    chunks = [t_up, m] * k + [t_sol]
    return {"non_embedding_params": linear_params(cfg), "upstream_tokens": b * k * (t_up + m),
            "solver_tokens": b * t_sol,
            "flops": step_flops(cfg, b, chunks, n_tgt, 0 if mode == "full" else len(chunks) - 1),
            "lm_head_flops": 4 * cfg.hidden_size * cfg.vocab_size * b * n_tgt,
            "conventional_6n_flops": conventional_6n(cfg, b, k, t_up, m, t_sol, n_tgt, mode)}


def matmul_peak(n: int, repeats: int, compiler_options=None):
    """Median FLOP/s of a jitted n x n float32 jnp.dot (compiled with ``compiler_options``)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    bm = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot, compiler_options=compiler_options)
    jax.block_until_ready(f(a, bm))
    med, samples, _ = median_time(lambda: jax.block_until_ready(f(a, bm)), repeats)
    return 2 * n ** 3 / med, med, samples


def jax_matmul_peaks(n: int, repeats: int) -> dict:
    """The float32 matmul peak of each dot emitter the train step can use: XLA's own and,
    where the train step compiles with them (``xla_cpu.ynn_dot_options``), YNNPACK's dots.
    The train step's GEMMs run on YNNPACK there, and YNNPACK's 2048^3 dot ran 30% faster
    than XLA's here (2026-12-06), so a peak from XLA's alone would overstate "% of peak"."""
    from diffmas_jax.xla_cpu import ynn_dot_options
    ynn = ynn_dot_options()
    emitters = {"xla": None, "ynnpack": ynn} if ynn else {"xla": None}
    out = {}
    for name, opts in emitters.items():
        flop_s, med, samples = matmul_peak(n, repeats, opts)
        out[name] = {"n": n, "flop_s": flop_s, "median_s": med, "samples_s": samples}
    return out


def torch_matmul_peak(n: int, repeats: int, threads: int):
    """Median FLOP/s of an n x n float32 torch.mm (for context: PyTorch's own matmul speed)."""
    import torch
    torch.set_num_threads(threads)
    a, bm = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, bm)
    med, samples, _ = median_time(lambda: torch.mm(a, bm), repeats)
    return 2 * n ** 3 / med, med, samples


# --------------------------------------------------------------------------- diffmas_jax side
class JaxTrain:
    def __init__(self, model, rank, lr):
        import jax
        from diffmas_jax.lora import LoraConfig
        from diffmas_jax.stages import make_realign
        self.jax, self.m = jax, model
        self.lcfg = LoraConfig(rank=rank, alpha=2.0 * rank)
        self.lr = lr
        self.realign = make_realign(model.params, model.cfg, "norm")

    def step_fn(self, up, sol, n_tgt, m_steps, mode):
        """A closure running one jitted train step (LoRA and optimizer state carried across calls)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from diffmas_jax.lora import init_lora
        from diffmas_jax.training import (EncodedData, StepConfig, batch_of, make_optimizer,
                                          make_train_step, step_capacity)
        k, b = len(up), len(sol)
        tokens = np.asarray(sol, np.int32)
        valid = np.ones_like(tokens, bool)
        target = np.zeros_like(valid)
        target[:, -n_tgt:] = True
        up_t = [np.asarray(u, np.int32) for u in up]
        data = EncodedData(up_tokens=up_t, up_valid=[np.ones_like(t, bool) for t in up_t], tokens=tokens,
                           valid=valid, target_mask=target, n_target=target.sum(1))
        latent = (m_steps,) * k
        roles = tuple(ROLES[j % len(ROLES)] for j in range(k)) + ("solver",)
        sc = StepConfig(method="diffmas", trace_grad=mode, roles=roles, latent_steps=latent,
                        up_lengths=tuple(t.shape[1] for t in up_t), solver_length=tokens.shape[1],
                        capacity=step_capacity(data, latent, None), lora_scale=self.lcfg.scale,
                        max_target=n_tgt)
        opt = make_optimizer(self.lr, 1, 0, 0.0, 1.0, 1)  # constant lr, clip 1.0, no weight decay
        step = make_train_step(self.m.cfg, sc, opt)
        batch = jax.tree.map(jnp.asarray, batch_of(data, np.arange(b)))
        lora = init_lora(self.m.cfg, self.lcfg, jax.random.PRNGKey(0))
        st = {"lora": lora, "opt": opt.init(lora), "losses": []}
        # what the compiled step multiplies (recomputation, masked attention blocks, LoRA included)
        st["dot_flops"] = lambda: dot_flops(step, st["lora"], st["opt"], self.m.params, self.realign, batch)

        def run():
            st["lora"], st["opt"], met = step(st["lora"], st["opt"], self.m.params, self.realign, batch)
            st["losses"].append(float(jax.block_until_ready(met["loss"])))
            return met
        return run, st, sc


# --------------------------------------------------------------------------- transformers side
class TorchTrain:
    def __init__(self, path, rank, lr, threads, base=None, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        self.path, self.rank, self.lr, self.device = path, rank, lr, device
        self.base = base if base is not None else AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        emb = self.base.get_input_embeddings().weight.detach()
        self.target_norm = emb.norm(dim=-1).mean()
        self.model = None

    def fresh(self):
        """A new peft LoRA model (B = 0, kaiming A) and AdamW over its LoRA params."""
        import torch
        from peft import LoraConfig, get_peft_model
        if self.model is not None:
            self.base = self.model.unload()  # drop the old adapter, keep the base model
        torch.manual_seed(0)
        cfg = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"], task_type="CAUSAL_LM")
        self.model = get_peft_model(self.base, cfg)
        self.model.train()  # no dropout anywhere in this model, so train() == eval() numerically
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        return sum(p.numel() for p in params)

    def step_fn(self, up, sol, n_tgt, m_steps, mode):
        import contextlib
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache
        self.fresh()
        model, opt = self.model, self.opt
        up_ids = [torch.tensor(u, dtype=torch.long, device=self.device) for u in up]
        sol_ids = torch.tensor(sol, dtype=torch.long, device=self.device)
        labels = sol_ids[:, -n_tgt:]
        tn = self.target_norm
        st = {"losses": []}

        def run():
            opt.zero_grad(set_to_none=True)
            cache = DynamicCache(config=model.config)
            ctx = torch.no_grad() if mode == "stop" else contextlib.nullcontext()
            with ctx:
                # upstream agents through the decoder stack alone (the LoRA layers are in it): they
                # need the final-normed hidden state, not the LM head (as diffmas_jax)
                body = model.get_base_model().model
                for ids in up_ids:
                    h = body(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1:]
                    for _ in range(m_steps):
                        e = h * (tn / h.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                        h = body(inputs_embeds=e, past_key_values=cache, use_cache=True).last_hidden_state[:, -1:]
            out = model(input_ids=sol_ids, past_key_values=cache, use_cache=True, logits_to_keep=n_tgt + 1)
            logits = out.logits[:, :n_tgt]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            st["losses"].append(float(loss.detach()))
            return loss
        return run, st


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    q = args.quick
    batches = [int(x) for x in (args.batch or ("2" if q else "4")).split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    assert all(x in ("stop", "full") for x in modes), f"--modes takes stop and/or full, got {modes}"
    k = args.agents or (2 if q else 3)
    m_steps = args.latent_steps if args.latent_steps is not None else (2 if q else 10)
    t_up = args.prompt_len or (32 if q else 128)
    t_sol = args.solver_len or (48 if q else 192)
    n_tgt = args.target_len or (16 if q else 64)
    assert 0 < n_tgt < t_sol, "--target-len must be below --solver-len"
    reps = args.repeats or (1 if q else 6)
    threads = args.threads or os.cpu_count() or 1
    t_start = time.perf_counter()
    log(f"settings: batches={batches} modes={modes} K={k} m={m_steps} prompt={t_up} solver={t_sol} "
        f"target={n_tgt} rank={args.rank} repeats={reps} torch_threads={threads}")

    from diffmas_jax.model.loading import load_model
    t0 = time.perf_counter()
    mdl = load_model(args.model)
    log(f"loaded diffmas_jax model from {mdl.path} in {time.perf_counter() - t0:.1f}s")
    info = machine_info(args)
    info.update(torch_threads=threads, model=str(mdl.path))

    log("measuring float32 matmul peak (jitted 2048x2048 jnp.dot, each dot emitter)")
    emitters = jax_matmul_peaks(512 if q else 2048, 3 if q else 10)
    best = max(emitters, key=lambda e: emitters[e]["flop_s"])
    info["matmul_peak"] = dict(emitters[best], emitter=best, emitters=emitters)
    peak = info["matmul_peak"]["flop_s"]
    log("matmul peak: " + ", ".join(f"{e} {v['flop_s'] / 1e9:.1f}" for e, v in emitters.items()) + " GFLOP/s")

    jx = JaxTrain(mdl, args.rank, args.lr)
    th = None
    if not args.skip_torch:
        n_pk = info["matmul_peak"]["n"]
        tpeak, tpeak_s, tpeak_samples = torch_matmul_peak(n_pk, 3 if q else 10, threads)
        info["torch_matmul_peak"] = {"n": n_pk, "flop_s": tpeak, "median_s": tpeak_s, "samples_s": tpeak_samples}
        log(f"torch.mm peak: {tpeak / 1e9:.1f} GFLOP/s")
        # the machine's peak is the faster library's: a slower XLA GEMM must not inflate "% of peak"
        peak = max(peak, tpeak)
        t0 = time.perf_counter()
        th = TorchTrain(mdl.path, args.rank, args.lr, threads)
        log(f"loaded transformers model in {time.perf_counter() - t0:.1f}s")
    info["peak_flop_s"] = peak

    rows, checks = [], {}
    plan = [(b, mode) for b in batches for mode in modes]
    for i, (b, mode) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}]"
        up, sol = make_inputs(mdl.tokenizer, b, k, t_up, t_sol)
        ntok = b * (k * (t_up + m_steps) + t_sol)
        fl = count_flops(mdl.cfg, b, k, t_up, m_steps, t_sol, n_tgt, mode)
        name = f"train step, trace_grad={mode} (B={b})"
        log(f"{tag} {name}: diffmas_jax (first call compiles)")
        fn, jst, sc = jx.step_fn(up, sol, n_tgt, m_steps, mode)
        first, _, split = timed_first_split(fn)
        log(f"{tag} {name}: diffmas_jax first call {first:.1f}s (compile {split['compile_s']:.1f}s)")
        tres = None
        if th:
            log(f"{tag} {name}: transformers+peft (warm-up step)")
            tfn, tst = th.step_fn(up, sol, n_tgt, m_steps, mode)
            tfirst, _ = timed_first(tfn)
            log(f"{tag} {name}: transformers first call {tfirst:.1f}s; timing {reps} step(s) each, "
                "the sides taking turns")
            (med, samples, _), (tmed, tsamples, _) = alternating_times([fn, tfn], reps)
        else:
            ((med, samples, _),) = alternating_times([fn], reps)
        # after the timed first call: tracing the step here fills JAX's trace cache, which would
        # hide the trace time from (e)
        fl["implementation_flops"] = jst["dot_flops"]()
        j = {"median_s": med, "samples_s": samples, "first_call_s": first, "first_call_split": split,
             "compile_overhead_s": first - med,
             "tok_s": ntok / med, "flop_s": fl["flops"] / med, "mfu": fl["flops"] / med / peak,
             "mfu_best": fl["flops"] / min(samples) / peak,
             "implementation_share_of_peak": fl["implementation_flops"] / med / peak,
             "losses": jst["losses"]}
        if th:
            tres = {"median_s": tmed, "samples_s": tsamples, "first_call_s": tfirst, "tok_s": ntok / tmed,
                    "flop_s": fl["flops"] / tmed, "mfu": fl["flops"] / tmed / peak, "losses": tst["losses"]}
            # LoRA B starts at zero on both sides, so the first step's loss is the base model's.
            checks[f"B{b}_{mode}_first_loss_jax_vs_torch"] = (jst["losses"][0], tst["losses"][0])
        rows.append({"measurement": name, "batch": b, "trace_grad": mode, "tokens": ntok, **fl,
                     "diffmas_jax": j, "transformers": tres})
        log(f"{tag} {name}: jax {med:.2f}s/step = {j['tok_s']:.0f} tok/s, {100 * j['mfu']:.1f}% of peak"
            + (f"; torch {tmed:.2f}s/step = {tres['tok_s']:.0f} tok/s" if tres else ""))

    for r in rows:
        r["ratio_jax_over_torch"] = ratio((r["diffmas_jax"] or {}).get("tok_s"),
                                          (r["transformers"] or {}).get("tok_s"))
        if r["transformers"]:
            r.update(ratio_spread(r["diffmas_jax"]["samples_s"], r["transformers"]["samples_s"]))
    info["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["total_wall_s"] = time.perf_counter() - t_start
    info["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # ---------------------------------------------------------------- report
    md = report_header(f"DiffMAS LoRA train step: diffmas_jax vs transformers + peft (float32{', quick' if q else ''})",
                       info, threads)
    md += [f"Model: `{Path(mdl.path).name}`. K={k} upstream agents x ({t_up}-token prompt + m={m_steps} latent "
          f"steps), solver {t_sol} tokens of which {n_tgt} target; LoRA r={args.rank}, alpha={2 * args.rank}, "
          f"q,k,v,o,gate,up,down; AdamW + clip 1.0. Tokens/step = B x (K x (prompt + m) + solver). "
          f"Medians of {reps} step(s) after a warm-up step, the two sides taking turns (A B, B A, ...). Ratio = diffmas_jax / transformers throughput "
          f"(>1: diffmas_jax faster). Matmul peak: {peak / 1e9:.1f} GFLOP/s, the fastest of a jitted "
          f"{info['matmul_peak']['n']}x{info['matmul_peak']['n']} f32 jnp.dot ("
          + ", ".join(f"{'XLA' if e == 'xla' else 'YNNPACK'} dots {v['flop_s'] / 1e9:.1f}"
                      for e, v in info["matmul_peak"]["emitters"].items()) + " GFLOP/s, medians)"
          + (f" and torch.mm of the same size ({info['torch_matmul_peak']['flop_s'] / 1e9:.1f} GFLOP/s)"
             if "torch_matmul_peak" in info else "") + "; both '% of peak' columns use it.", "",
          "| measurement | tokens/step | diffmas_jax s/step | diffmas_jax tok/s | transformers s/step "
          "| transformers tok/s | ratio | best vs best | pairs | GFLOP/step | diffmas_jax % of peak | transformers % of peak "
          "| diffmas_jax GFLOP run/step | diffmas_jax % of peak, FLOPs run |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        j, t = r["diffmas_jax"], r["transformers"]
        rt = r["ratio_jax_over_torch"]
        md.append(f"| {r['measurement']} | {r['tokens']} | {fmt(j['median_s'])} | {fmt(j['tok_s'])} | "
                  f"{fmt(t['median_s']) if t else 'n/a'} | {fmt(t['tok_s']) if t else 'n/a'} | "
                  f"{fmt(rt) + 'x' if rt else 'n/a'} | {spread_cells(r)} | {fmt(r['flops'] / 1e9)} | {fmt(100 * j['mfu'])}% | "
                  f"{fmt(100 * t['mfu']) + '%' if t else 'n/a'} | {fmt(r['implementation_flops'] / 1e9)} | "
                  f"{fmt(100 * j['implementation_share_of_peak'])}% |")
    md += ["", "First call (diffmas_jax: trace + lower + XLA compile + the first run of the step) vs steady-state "
           "median, seconds; compile = JAX's trace, lowering and XLA compile durations (jax.monitoring):", "",
           "| measurement | diffmas_jax first call | of which compile | of which first run | diffmas_jax median "
           "| transformers first | transformers median |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        j, t = r["diffmas_jax"], r["transformers"]
        sp = j.get("first_call_split") or {}
        md.append(f"| {r['measurement']} | {fmt(j['first_call_s'])} | {fmt(sp.get('compile_s'))} | "
                  f"{fmt(sp.get('run_s'))} | {fmt(j['median_s'])} | {fmt(t['first_call_s']) if t else 'n/a'} | "
                  f"{fmt(t['median_s']) if t else 'n/a'} |")
    md += ["", f"FLOP count: {FORMULA}", "", f"FLOPs run: {IMPLEMENTATION}"]
    if checks:
        md += ["", "Checks (first-step loss, LoRA B = 0 so both are the base model's NLL; jax, torch): " + "; ".join(
            f"{kk} = ({a:.5f}, {b_:.5f})" for kk, (a, b_) in checks.items())]
    md += ["", f"Total wall time {info['total_wall_s']:.0f}s; peak RSS of this process "
           f"{info['max_rss_mb']:.0f} MB (both sides)."]
    table = "\n".join(md)
    print("\n" + table + "\n", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    base = out_dir / f"train_{stamp}{'_quick' if q else ''}"
    settings = {"batches": batches, "modes": modes, "agents": k, "latent_steps": m_steps, "prompt_len": t_up,
                "solver_len": t_sol, "target_len": n_tgt, "lora_rank": args.rank, "lora_alpha": 2 * args.rank,
                "lr": args.lr, "repeats": reps, "realign": "norm (both sides)", "flop_formula": FORMULA}
    base.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": rows,
         "checks": {kk: list(v) for kk, v in checks.items()}}, indent=2) + "\n")
    base.with_suffix(".md").write_text(table + "\n")
    log(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
