#!/usr/bin/env python
"""4-agent LatentMAS pipeline latency: diffmas_jax (JAX) vs an HF-forward LatentMAS loop (PyTorch).

The pipeline: 3 upstream agents (planner, critic, refiner) each prefill their chat
prompt onto one shared KV cache and run m = 10 latent steps (last-layer final-normed
hidden state -> ridge realignment W_a -> next input embedding); the solver prefills
its prompt on top and decodes greedily. Questions are the project's `arith` task,
the prompts are diffmas_jax's agent prompts on both sides.

  * diffmas_jax: `methods.run_batch(model, questions, instruction,
    MethodConfig(method='latent_mas', latent_steps=10, max_new_tokens=N))`. It stops at
    EOS, so the "forced" rows run the same library pieces run_batch uses
    (tokenize, W_a solved once per model, jit_agent_stage x3, jit_solver_prefill, start_decode +
    jit_decode_steps) with no EOS, so every row decodes exactly N tokens.
  * transformers: a LatentMAS-style loop of HF forward calls over a DynamicCache:
    prefill each agent's prompt and its m latent steps (`inputs_embeds`) through the
    decoder stack alone (`model.model`: the hidden state is what a latent step needs, no
    vocabulary head), solver prefill with `logits_to_keep=1`, then an N-token greedy loop
    `model(input_ids=next, past_key_values=cache)`. Prompts are left-padded to the longest
    row only (not at all at B=1), with an attention mask and explicit position ids;
    diffmas_jax pads to a multiple of 32, which an eager loop need not do. W_a is computed
    once at start-up (as LatentMAS does). (Before 2026-12-08 the loop called the full model
    for latent steps and padded to diffmas_jax's bucket: about 5% (B=1) and 7% (B=8) more
    time on its side.)

Every configuration (side x batch) runs in a fresh subprocess, so its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own; RSS after loading the
model is reported too. The two sides' processes of a configuration are both loaded and
warmed up, one after the other, and then take turns over the timed repeats (jax, torch,
torch, jax, ...; one runs while the other waits), so drift in the machine's speed falls
on both sides alike. The first call (diffmas_jax: jit compile) is reported
separately from the steady-state median.

    python benchmarks/bench_pipeline.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_pipeline.py --quick    # smoke test
    python benchmarks/bench_pipeline.py --batches 1 --new-tokens 128,512   # memory vs trace length

Writes ``<out>/pipeline_<date>.json`` and ``.md`` (out defaults to benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_model import (fmt, log, median_time, ratio, ratio_spread, report_header, spread_cells, timed_first,  # noqa: E402
                         timed_first_split)
from machine_load import busy_cores, cpu_model  # noqa: E402

ROLES = ("planner", "critic", "refiner", "solver")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (smoke test)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--model", default=None, help="model dir / .gguf / Hub id (default: the embedded model)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; quick 1,2)")
    ap.add_argument("--latent-steps", type=int, default=None, help="latent steps per upstream agent (default 10; quick 2)")
    ap.add_argument("--new-tokens", default=None,
                    help="solver tokens to decode; a comma list adds rows for memory vs trace length "
                         "(default 128; quick 8)")
    ap.add_argument("--memory-new-tokens", default=None,
                    help="extra solver lengths run once each for (d), peak memory against trace length: not "
                         "timing rows (default 512; quick 16; '' for none)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of the forced pipeline, the sides taking turns (default 4; quick 1)")
    ap.add_argument("--eos-repeats", type=int, default=None,
                    help="timed repeats of the EOS-stopping pipeline (default 1; 0 skips it)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--skip-torch", action="store_true", help="only time diffmas_jax")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    return ap.parse_args(argv)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Turns:
    """A child's end of the turn-taking: after its first call it reports ``ready``, then runs one
    timed repeat for each ``rep`` line the parent sends and answers with its seconds, until
    ``end``. The parent gives the two sides turns (``ChildRun``), so a machine that drifts
    over the minutes of a run (this VM does, by tens of percent) falls on both sides alike."""

    def __init__(self, spec):
        self._cmd = os.fdopen(spec["cmd_fd"], "r")
        self._reply = os.fdopen(spec["reply_fd"], "w")

    def _send(self, **msg):
        self._reply.write(json.dumps(msg) + "\n")
        self._reply.flush()

    def serve(self, fn):
        """Repeats of ``fn(phases)`` (it fills a dict of per-phase seconds, syncing between
        phases) on the parent's word; returns (median s, samples, last result, per-phase medians)."""
        self._send(event="ready")
        samples, per_phase, out = [], {}, None
        for line in self._cmd:
            if line.strip() == "end":
                break
            if line.strip() != "rep":
                raise SystemExit(f"error: unknown turn command {line.strip()!r}")
            ph = {}
            t0 = time.perf_counter()
            out = fn(ph)
            samples.append(time.perf_counter() - t0)
            for k, v in ph.items():
                per_phase.setdefault(k, []).append(v)
            self._send(event="rep", s=samples[-1])
        else:  # the parent went away without 'end': no result, no EOS rows run as an orphan
            raise SystemExit("error: the parent closed the turn pipe before 'end'")
        return (statistics.median(samples), samples, out,
                {k: statistics.median(v) for k, v in per_phase.items()})


def build_messages(questions, instruction):
    """Chat messages per agent (list over agents of list over rows), from diffmas_jax.agents (no jax import)."""
    from diffmas_jax.agents import agent_messages, build_agents
    agents = build_agents("sequential", ROLES, 0)
    out = []
    for j, a in enumerate(agents):
        solver = j == len(agents) - 1
        out.append([agent_messages(a, q, answer_instruction=instruction if solver else "", is_solver=solver)
                    for q in questions])
    return out


# --------------------------------------------------------------------------- children
def child_jax(spec):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffmas_jax import methods
    from diffmas_jax.generation import GREEDY, eos_ids_of, jit_decode_steps, start_decode
    from diffmas_jax.methods import MethodConfig, run_batch, solver_visibility, upstream_visibility
    from diffmas_jax.model.loading import load_model
    from diffmas_jax.stages import jit_agent_stage, jit_solver_prefill
    from diffmas_jax.trace import KVTrace

    res = {"rss_start_mb": rss_mb()}
    t0 = time.perf_counter()
    m = load_model(spec["model"])
    res["load_s"] = time.perf_counter() - t0
    jax.block_until_ready(m.params)
    res["rss_loaded_mb"] = rss_mb()
    questions, instruction, n_new = spec["questions"], spec["instruction"], spec["new_tokens"]
    mc = MethodConfig(method="latent_mas", roles=ROLES, latent_steps=spec["latent_steps"], max_new_tokens=n_new)
    b = len(questions)
    pad = int(m.tokenizer.pad_token_id or 0)

    def forced(phases=None):
        """run_batch's _trace_method, step for step, but decoding exactly n_new tokens (no EOS)."""
        def mark(name, x):
            if phases is not None:
                jax.block_until_ready(x)
                phases[name] = time.perf_counter() - phases.pop("_t")
                phases["_t"] = time.perf_counter()
        if phases is not None:
            phases["_t"] = time.perf_counter()
        agents = mc.agents()
        upstream, solver = agents[:-1], agents[-1]
        k = len(upstream)
        encoded = [methods._encode(m, a, questions, mc) for a in upstream]
        s_tokens, s_valid, _ = methods._encode(m, solver, questions, mc, answer_instruction=instruction,
                                               is_solver=True, has_team=True)
        capacity = sum(t.shape[1] + a.latent_steps for (t, _, _), a in zip(encoded, upstream)) \
            + s_tokens.shape[1] + n_new
        trace = KVTrace.create(m.cfg, b, capacity)
        mark("tokenize + trace alloc", trace.k)
        realign = methods._realign_for(m, mc.realign, mc.realign_lambda)  # solved once per model, as run_batch does
        mark("make_realign (ridge W_a)", realign.matrix)
        for j, (agent, (tokens, valid, _)) in enumerate(zip(upstream, encoded)):
            trace = jit_agent_stage(m.params, m.cfg, trace, tokens, valid, realign, steps=agent.latent_steps,
                                    segment=j, visible=upstream_visibility(mc, j), lora=None, lora_scale=1.0,
                                    compute_dtype=jnp.float32)
        mark("upstream agents (prefill + latent)", trace.k)
        vis = solver_visibility(mc, k, sum(a.latent_steps for a in upstream))
        trace, logits = jit_solver_prefill(m.params, m.cfg, trace, s_tokens, s_valid, segment=k, visible=vis,
                                           lora=None, lora_scale=1.0, compute_dtype=jnp.float32)
        mark("solver prefill", logits)
        state = start_decode(trace, logits, n_new, jax.random.PRNGKey(0))
        state = jit_decode_steps(m.params, m.cfg, state, num_steps=n_new, eos_ids=(), sampling=GREEDY, pad_id=pad,
                                 segment=k, visible=vis, lora=None, lora_scale=1.0, compute_dtype=jnp.float32)
        toks = np.asarray(state.tokens)
        mark("decode", toks)
        if phases is not None:
            phases.pop("_t")
        return {"generated": int(np.asarray(state.count).sum()), "tokens": toks.tolist(),
                "slots_per_row": int(capacity), "prompt_slots": [int(t.shape[1]) for t, _, _ in encoded]
                + [int(s_tokens.shape[1])]}

    log(f"  jax B={b} N={n_new}: first call (compiles)")
    first, out, split = timed_first_split(forced)
    res["rss_after_first_mb"] = rss_mb()
    log(f"  jax B={b} N={n_new}: first call {first:.1f}s (compile {split['compile_s']:.1f}s); "
        f"{spec['repeats']} timed repeat(s), taking turns with the other side")
    med, samples, out, phases = Turns(spec).serve(forced)
    res["forced"] = {"first_call_s": first, "first_call_split": split, "median_s": med, "samples_s": samples, "generated": out["generated"],
                     "phases_s": phases, "tokens": out["tokens"]}
    res["slots_per_row"], res["prompt_slots"] = out["slots_per_row"], out["prompt_slots"]
    res["rss_after_forced_mb"] = rss_mb()
    if spec["eos_repeats"]:
        log(f"  jax B={b} N={n_new}: run_batch (EOS stop), first call")
        efirst, r = timed_first(lambda: run_batch(m, questions, instruction, mc))
        emed, esamples, r = median_time(lambda: run_batch(m, questions, instruction, mc), spec["eos_repeats"])
        gen = [rec["generated_tokens"] for rec in r.records]
        res["eos"] = {"first_call_s": efirst, "median_s": emed, "samples_s": esamples, "generated": int(sum(gen)),
                      "generated_per_row": gen, "decode_steps": int(max(gen)),
                      "eos_ids": list(eos_ids_of(m.tokenizer, m.cfg))}
    res["rss_peak_mb"] = rss_mb()
    return res


def child_torch(spec):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    res = {"rss_start_mb": rss_mb()}
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    path = spec["model"]  # the HF directory the parent resolved (no jax import in this process)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    body = model.model  # the decoder stack without the LM head
    # LatentMAS realignment, computed once: W_a = (W_out^T W_out + lam I)^-1 W_out^T W_in, float32.
    with torch.no_grad():
        w_in = model.get_input_embeddings().weight.float()
        w_out = model.get_output_embeddings().weight.float()
        gram = w_out.T @ w_out + 1e-5 * torch.eye(w_in.shape[1])
        w_a = torch.linalg.solve(gram, w_out.T @ w_in)
        target_norm = w_in.norm(dim=-1).mean()
    res["load_s"] = time.perf_counter() - t0
    res["rss_loaded_mb"] = rss_mb()
    msgs, n_new, m_steps = spec["messages"], spec["new_tokens"], spec["latent_steps"]
    b = len(msgs[0])
    pad = tok.pad_token_id
    eos = set([tok.eos_token_id] + list(spec.get("eos_ids") or []))

    def encode(rows):
        """Chat ids, left-padded to the longest row (none at B=1) -> (ids, mask). diffmas_jax
        pads to a 32-token bucket so new lengths reuse its compiled programs; an eager loop
        needs no bucket, so it is not made to pay for one."""
        seqs = []
        for r in rows:
            ids = tok.apply_chat_template(r, add_generation_prompt=True, tokenize=True)
            seqs.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        t = max(len(s) for s in seqs)
        ids = torch.full((b, t), pad, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
        return ids, mask

    def realign(h):
        e = h @ w_a
        return e * (target_norm / e.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def run(stop_at_eos=False, phases=None):
        def mark(name):
            if phases is not None:
                now = time.perf_counter()
                phases[name] = now - phases.get("_t", now)
                phases["_t"] = now
        if phases is not None:
            phases["_t"] = time.perf_counter()
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            mask = torch.zeros((b, 0), dtype=torch.long)
            next_pos = torch.zeros((b,), dtype=torch.long)
            for rows in msgs[:-1]:
                ids, am = encode(rows)
                pos = next_pos[:, None] + (am.cumsum(1) - 1).clamp_min(0)
                mask = torch.cat([mask, am], 1)
                # the decoder stack alone (model.model): latent steps need the final-normed hidden
                # state, not the vocabulary head (as diffmas_jax, which computes no logits there)
                out = body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True)
                next_pos = next_pos + am.sum(1)
                h = out.last_hidden_state[:, -1]
                for _ in range(m_steps):
                    mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], 1)
                    out = body(inputs_embeds=realign(h)[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               past_key_values=cache, use_cache=True)
                    next_pos = next_pos + 1
                    h = out.last_hidden_state[:, -1]
            mark("upstream agents (prefill + latent)")
            ids, am = encode(msgs[-1])
            pos = next_pos[:, None] + (am.cumsum(1) - 1).clamp_min(0)
            mask = torch.cat([mask, am], 1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            next_pos = next_pos + am.sum(1)
            logits = out.logits[:, -1]
            mark("solver prefill")
            done = torch.zeros((b,), dtype=torch.bool)
            toks, count = [], 0
            for step in range(n_new):
                nxt = logits.argmax(-1)
                if stop_at_eos:
                    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                    count += int((~done).sum())
                    done = done | torch.isin(nxt, torch.tensor(sorted(eos)))
                else:
                    count += b
                toks.append(nxt)
                if step == n_new - 1 or (stop_at_eos and bool(done.all())):
                    break
                mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], 1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                            past_key_values=cache, use_cache=True)
                next_pos = next_pos + 1
                logits = out.logits[:, -1]
            mark("decode")
        if phases is not None:
            phases.pop("_t")
        return {"generated": count, "tokens": torch.stack(toks, 1).tolist(), "steps": len(toks)}

    log(f"  torch B={b} N={n_new}: first call")
    first, out = timed_first(run)
    res["rss_after_first_mb"] = rss_mb()
    log(f"  torch B={b} N={n_new}: first call {first:.1f}s; {spec['repeats']} timed repeat(s), "
        "taking turns with the other side")
    med, samples, out, phases = Turns(spec).serve(lambda phases: run(phases=phases))
    res["forced"] = {"first_call_s": first, "median_s": med, "samples_s": samples, "generated": out["generated"],
                     "phases_s": phases, "tokens": out["tokens"]}
    res["rss_after_forced_mb"] = rss_mb()
    if spec["eos_repeats"]:
        # No separate warm-up: nothing to compile, and the forced runs above already warmed every call.
        log(f"  torch B={b} N={n_new}: loop with EOS stop")
        emed, esamples, r = median_time(lambda: run(stop_at_eos=True), spec["eos_repeats"])
        efirst = esamples[0]
        res["eos"] = {"first_call_s": efirst, "median_s": emed, "samples_s": esamples, "generated": r["generated"],
                      "decode_steps": r["steps"]}
    res["rss_peak_mb"] = rss_mb()
    return res


class ChildRun:
    """One configuration in a fresh interpreter (its peak RSS is its own), driven through two
    pipes: ``ready`` once loaded and warmed up, one timed repeat per ``rep()``, and its result
    dict from ``finish()`` (after its EOS rows, which it runs alone)."""

    def __init__(self, spec, tag):
        self.tag, self._td = tag, tempfile.TemporaryDirectory()
        td = Path(self._td.name)
        self._result, self._err = td / "result.json", td / "stderr.txt"
        self.proc = self._cmd = self._reply = None
        cmd_r, cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self._cmd, self._reply = os.fdopen(cmd_w, "w"), os.fdopen(reply_r, "r")
        try:
            sp = td / "spec.json"
            sp.write_text(json.dumps(dict(spec, result=str(self._result), cmd_fd=cmd_r, reply_fd=reply_w)))
            self._t0 = time.perf_counter()
            with open(self._err, "w") as err:
                self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(sp)],
                                             stdout=None, stderr=err, pass_fds=(cmd_r, reply_w))
        except BaseException:
            self.close()
            raise
        finally:  # the child's ends: only the child holds them, so its exit closes the pipes
            os.close(cmd_r)
            os.close(reply_w)

    def _failed(self) -> RuntimeError:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        tail = "\n".join(self._err.read_text().strip().splitlines()[-15:])
        return RuntimeError(f"{self.tag} failed (exit {self.proc.returncode}):\n{tail}")

    def _send(self, line: str, close: bool = False):
        try:
            self._cmd.write(line)
            self._cmd.close() if close else self._cmd.flush()
        except OSError:  # the child is gone (a crash, the OOM killer): say why, from its stderr
            raise self._failed() from None

    def expect(self, event: str) -> dict:
        line = self._reply.readline()
        if not line:
            raise self._failed()
        msg = json.loads(line)
        assert msg["event"] == event, f"{self.tag}: expected {event!r}, got {msg}"
        return msg

    def rep(self) -> float:
        self._send("rep\n")
        return self.expect("rep")["s"]

    def finish(self) -> dict:
        self._send("end\n", close=True)
        if self.proc.wait() != 0 or not self._result.exists():
            raise self._failed()
        res = json.loads(self._result.read_text())
        res["subprocess_wall_s"] = time.perf_counter() - self._t0  # turns included: the other side's runs too
        self.close()
        return res

    def close(self):
        """Kill the child if it still runs, then let go of the pipes and the folder; never raises
        for a pipe the child already closed, so every other child is still closed after it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self._cmd, self._reply):
            try:
                if f is not None and not f.closed:
                    f.close()
            except OSError:
                pass
        self._td.cleanup()


def run_config(specs: dict, repeats: int, tag: str) -> tuple[dict, list]:
    """Start each side's child in turn (each loads and compiles alone), then give the sides
    turns for ``repeats`` timed repeats, A B, B A, ...; returns ({side: result}, the turn order).
    A child that fails kills the others before the error goes up."""
    children, turns = {}, []
    try:
        for side, spec in specs.items():
            log(f"{tag} {side}: fresh subprocess")
            children[side] = ChildRun(spec, f"{tag} {side}")
            children[side].expect("ready")
        sides = list(children)
        for rep in range(repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                children[side].rep()
                turns.append(side)
        return {side: c.finish() for side, c in children.items()}, turns
    finally:
        for c in children.values():
            c.close()


# --------------------------------------------------------------------------- main
def kv_mb(cfg: dict, slots: int, batch: int) -> float:
    """float32 K+V bytes of a cache holding ``slots`` positions per row."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * 4 * slots * batch / 2 ** 20


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        res = child_jax(spec) if spec["side"] == "jax" else child_torch(spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0

    q = args.quick
    batches = [int(x) for x in (args.batches or ("1,2" if q else "1,8")).split(",") if x.strip()]
    new_tokens = [int(x) for x in (args.new_tokens or ("8" if q else "128")).split(",") if x.strip()]
    mem_arg = args.memory_new_tokens if args.memory_new_tokens is not None else ("16" if q else "512")
    memory_tokens = [n for n in (int(x) for x in mem_arg.split(",") if x.strip()) if n not in new_tokens]
    m_steps = args.latent_steps if args.latent_steps is not None else (2 if q else 10)
    reps = args.repeats or (1 if q else 4)
    eos_reps = args.eos_repeats if args.eos_repeats is not None else 1
    threads = args.threads or os.cpu_count() or 1
    t_start = time.perf_counter()
    log(f"settings: batches={batches} new_tokens={new_tokens} memory_new_tokens={memory_tokens} "
        f"latent_steps={m_steps} repeats={reps} "
        f"eos_repeats={eos_reps} torch_threads={threads}")

    from diffmas_jax.host_malloc import hugetlb_setting
    from diffmas_jax.model.loading import resolve_model_dir
    from diffmas_jax.tasks import get_task
    model_dir = resolve_model_dir(args.model)
    hf_cfg = json.loads((Path(model_dir) / "config.json").read_text())
    task = get_task("arith", size=64)
    items = task.load("test", limit=max(batches))
    instruction = task.answer_instruction
    busy = busy_cores(1.0)  # other work only: this process sleeps while it samples
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
        "load_avg_start": list(os.getloadavg()), "cpu_busy_start": busy, "glibc_malloc_hugetlb": hugetlb_setting(), "quick": q,
        "torch_threads": threads, "model": str(model_dir),
        "dtype": "float32"}
    vers = subprocess.run([sys.executable, "-c", "import jax, torch, transformers; "
                           "print(jax.__version__, jax.default_backend(), torch.__version__, transformers.__version__)"],
                          capture_output=True, text=True).stdout.split()
    if len(vers) == 4:
        info.update(jax=vers[0], jax_backend=vers[1], torch=vers[2], transformers=vers[3])

    plan = [(b, n) for n in new_tokens + memory_tokens for b in batches]
    sides = ("jax",) if args.skip_torch else ("jax", "torch")
    results, turn_order = {}, {}
    for i, (b, n) in enumerate(plan, 1):
        memory_only = n in memory_tokens  # one timed run: its peak RSS is the point; no timing row
        tag = f"[{i}/{len(plan)}] B={b} N={n}"
        qs = [it.question for it in items[:b]]
        spec = {"model": str(model_dir), "questions": qs, "instruction": instruction,
                "messages": build_messages(qs, instruction), "latent_steps": m_steps, "new_tokens": n,
                "repeats": 1 if memory_only else reps, "eos_repeats": eos_reps if n == new_tokens[0] else 0,
                "threads": threads,
                "eos_ids": hf_cfg.get("eos_token_id") if isinstance(hf_cfg.get("eos_token_id"), list)
                else [hf_cfg.get("eos_token_id")]}
        done, turns = run_config({side: dict(spec, side=side) for side in sides}, spec["repeats"], tag)
        turn_order[f"B{b}_N{n}"] = turns
        for side, r in done.items():
            r["memory_only"] = memory_only
            results[(side, b, n)] = r
            f = r["forced"]
            log(f"{tag} {side}: {f['median_s']:.2f}s median ({f['generated']} tokens; first call "
                f"{f['first_call_s']:.1f}s), peak RSS {r['rss_peak_mb']:.0f} MB"
                + (f"; EOS-stop {r['eos']['median_s']:.2f}s for {r['eos']['generated']} tokens" if "eos" in r else ""))

    # ---------------------------------------------------------------- rows
    rows, checks = [], {}
    for n in new_tokens + memory_tokens:
        for b in batches:
            j, t = results.get(("jax", b, n)), results.get(("torch", b, n))
            for kind in ("forced", "eos"):
                if kind not in j or n in memory_tokens:
                    continue
                jr, tr = j[kind], (t or {}).get(kind)
                name = (f"latent_mas, {n} tokens forced (B={b})" if kind == "forced"
                        else f"latent_mas, EOS stop, max {n} (B={b})")
                row = {"measurement": name, "batch": b, "new_tokens": n, "kind": kind,
                       "diffmas_jax": {k: v for k, v in jr.items() if k != "tokens"},
                       "transformers": {k: v for k, v in tr.items() if k != "tokens"} if tr else None}
                for side in ("diffmas_jax", "transformers"):
                    if row[side]:
                        row[side]["tok_s"] = row[side]["generated"] / row[side]["median_s"]
                row["ratio_jax_over_torch"] = ratio(row["diffmas_jax"]["tok_s"],
                                                    (row["transformers"] or {}).get("tok_s"))
                if tr and kind == "forced":  # the same tokens on both sides: their times' ratio is tok/s's
                    row.update(ratio_spread(jr["samples_s"], tr["samples_s"]))
                rows.append(row)
            if t:
                import numpy as np
                a, c = np.asarray(j["forced"]["tokens"]), np.asarray(t["forced"]["tokens"])
                same = a == c
                checks[f"B{b}_N{n}_greedy_token_agreement"] = float(same.mean())
                checks[f"B{b}_N{n}_identical_prefix_per_row"] = [int(np.argmin(r_)) if not r_.all() else n
                                                                 for r_ in same]
    info["load_avg_end"] = list(os.getloadavg())
    info["total_wall_s"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- report
    md = report_header("4-agent LatentMAS pipeline: diffmas_jax vs transformers forward loop "
                       f"(float32{', quick' if q else ''})", info, threads)
    md += [f"Model: `{Path(model_dir).name}`. Agents {', '.join(ROLES)}; m={m_steps} latent steps per upstream "
           f"agent; `arith` test questions; greedy. Latency = wall time from questions to token ids "
           f"(tokenization included), median of {reps} run(s) after a first call, the two sides' "
           f"processes taking turns (A B, B A, ...; both loaded, one running at a time) (EOS rows: {eos_reps} run(s), "
           "after a first call on the diffmas_jax side only, where the EOS decode loop compiles anew). "
           "tok/s = generated solver tokens / latency. Ratio = diffmas_jax / transformers tok/s "
           "(>1: diffmas_jax faster), of the medians; then of each side's best run and the range over the "
           "repeats' pairs. Forced rows decode exactly N tokens per row on both sides; EOS rows stop "
           "each row at EOS (diffmas_jax: `run_batch` as is; transformers: the loop stops when every row hit EOS) "
           "and are normalised per generated token.", "",
           "| measurement | diffmas_jax s | diffmas_jax tokens | diffmas_jax tok/s | transformers s "
           "| transformers tokens | transformers tok/s | ratio | best vs best | pairs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        j, t = r["diffmas_jax"], r["transformers"]
        rt = r["ratio_jax_over_torch"]
        md.append(f"| {r['measurement']} | {fmt(j['median_s'])} | {j['generated']} | {fmt(j['tok_s'])} | "
                  f"{fmt(t['median_s']) if t else 'n/a'} | {t['generated'] if t else 'n/a'} | "
                  f"{fmt(t['tok_s']) if t else 'n/a'} | {fmt(rt) + 'x' if rt else 'n/a'} | {spread_cells(r)} |")
    md += ["", "First call (diffmas_jax: includes jit compiles of 3 agent stages, solver prefill and the decode "
           "loop) vs steady-state median, seconds:", "",
           "| configuration | diffmas_jax first | diffmas_jax median | diffmas_jax compile overhead "
           "| transformers first | transformers median |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        j, t = r["diffmas_jax"], r["transformers"]
        md.append(f"| {r['measurement']} | {fmt(j['first_call_s'])} | {fmt(j['median_s'])} | "
                  f"{fmt(j['first_call_s'] - j['median_s'])} | {fmt(t['first_call_s']) if t else 'n/a'} | "
                  f"{fmt(t['median_s']) if t else 'n/a'} |")
    once = (f"; N = {', '.join(map(str, memory_tokens))} ran once, for this table only" if memory_tokens else "")
    md += ["", "Peak memory against trace length (each configuration in a fresh subprocess; RSS in MB; "
           "trace slots per row = padded agent prompts + latent steps + padded solver prompt + N; "
           f"KV = float32 K+V of that many slots x B{once}):", "",
           "| configuration | trace slots/row | KV MB | diffmas_jax RSS after load | diffmas_jax peak RSS "
           "| transformers RSS after load | transformers peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(new_tokens + memory_tokens):
        for b in batches:
            j, t = results[("jax", b, n)], results.get(("torch", b, n))
            slots = j["slots_per_row"]
            t_load = f"{t['rss_loaded_mb']:.0f}" if t else "n/a"
            t_peak = f"{t['rss_peak_mb']:.0f}" if t else "n/a"
            md.append(f"| B={b}, N={n} | {slots} | {fmt(kv_mb(hf_cfg, slots, b))} | {j['rss_loaded_mb']:.0f} | "
                      f"{j['rss_peak_mb']:.0f} | {t_load} | {t_peak} |")
    md += ["", "Where the time goes (forced runs sync after each phase; per-phase medians, seconds):", "",
           "| configuration | side | " + " | ".join(["tokenize + alloc", "make_realign", "upstream agents",
                                                    "solver prefill", "decode"]) + " |",
           "|---|---|---:|---:|---:|---:|---:|"]
    keys = ["tokenize + trace alloc", "make_realign (ridge W_a)", "upstream agents (prefill + latent)",
            "solver prefill", "decode"]
    for n in new_tokens + memory_tokens:
        for b in batches:
            for side in ("jax", "torch"):
                r = results.get((side, b, n))
                if r:
                    ph = r["forced"]["phases_s"]
                    md.append(f"| B={b}, N={n} | {'diffmas_jax' if side == 'jax' else 'transformers'} | "
                              + " | ".join(fmt(ph[k]) if k in ph else "-" for k in keys) + " |")
    md += ["", "transformers' upstream phase includes its tokenization; its W_a is computed once at start-up "
           "(not in the latency). diffmas_jax solves W_a once per model (in the first call), as `run_batch` does."]
    if checks:
        md += ["", "Checks (forced greedy tokens, diffmas_jax vs transformers): " + "; ".join(
            f"{k} = {v if not isinstance(v, float) else f'{v:.3g}'}" for k, v in checks.items())]
    md += ["", f"Total wall time {info['total_wall_s']:.0f}s (model loads in each subprocess included)."]
    table = "\n".join(md)
    print("\n" + table + "\n", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    base = out_dir / f"pipeline_{stamp}{'_quick' if q else ''}"
    settings = {"batches": batches, "new_tokens": new_tokens, "memory_new_tokens": memory_tokens,
                "latent_steps": m_steps, "roles": list(ROLES),
                "repeats": reps, "eos_repeats": eos_reps, "realign": "ridge", "task": "arith/test",
                "turn_order": turn_order}
    raw = {f"{s}_B{b}_N{n}": {k: v for k, v in r.items()} for (s, b, n), r in results.items()}
    base.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": rows, "checks": checks, "subprocesses": raw},
        indent=2) + "\n")
    base.with_suffix(".md").write_text(table + "\n")
    from plots import memory_plot
    png = memory_plot(raw, base.parent / f"{base.name}_memory.png",
                      title=f"4-agent LatentMAS pipeline, m={m_steps}: peak RSS against trace length")
    log(f"wrote {base}.json, {base}.md and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
