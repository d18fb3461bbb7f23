"""Methods as short compositions of stages over one KV trace.

    single      solver alone
    text_mas    upstream agents write text; later agents read it in their prompts
    latent_mas  upstream agents prefill + think m latent steps onto one shared trace
    stitch_mas  as latent_mas, but each agent builds its segment from an empty cache
                (earlier segments hidden, positions restart); the solver reads all
    diffmas     latent_mas with a trained LoRA adapter
    c2c         a learned cache fuser between consecutive agents (diffmas_jax.c2c)

Communication variants are visibility rules, not separate pipelines: ``overwrite``
lets each agent see only the previous agent's segment, ``latent_only`` lets the
solver see only upstream latent slots.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from diffmas_jax.agents import Agent, agent_messages, build_agents, render_chat
from diffmas_jax.distributed import to_host
from diffmas_jax.generation import SamplingConfig, decode_to_text, pad_batch, generate, row_keys
from diffmas_jax.model.transformer import Visibility, make_visibility, resolve_dtype
from diffmas_jax.stages import jit_agent_stage, jit_solver_prefill, make_realign
from diffmas_jax.trace import LATENT, KVTrace

METHODS = ("single", "text_mas", "latent_mas", "stitch_mas", "diffmas", "c2c")
COMMUNICATIONS = ("concat", "overwrite")
VISIBILITIES = ("full", "latent_only")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    method: str = "latent_mas"
    layout: str = "sequential"
    roles: Optional[tuple] = None          # explicit agent roles; the last is the solver
    latent_steps: object = 10              # int, or one int per upstream agent
    realign: str = "ridge"                 # ridge | norm | none
    realign_lambda: float = 1e-5
    communication: str = "concat"          # concat | overwrite
    visibility: str = "full"               # full | latent_only (solver sees upstream latent slots only)
    solver_reads_trace: bool = True        # with m = 0: does the solver see upstream prompt slots?
    max_new_tokens: int = 256
    text_max_new_tokens: int = 128         # TextMAS: tokens each upstream agent may write
    enable_thinking: Optional[bool] = None
    sampling: SamplingConfig = SamplingConfig()
    compute_dtype: str = "float32"
    prompt_bucket: int = 32                # prompt lengths round up to this (fewer recompiles)

    def validate(self) -> "MethodConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.communication not in COMMUNICATIONS:
            raise ValueError(f"unknown communication {self.communication!r}; known: {', '.join(COMMUNICATIONS)}")
        if self.visibility not in VISIBILITIES:
            raise ValueError(f"unknown visibility {self.visibility!r}; known: {', '.join(VISIBILITIES)}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        resolve_dtype(self.compute_dtype)
        self.agents()
        return self

    def agents(self) -> tuple[Agent, ...]:
        if self.method == "single":  # the layout's final agent, alone
            return build_agents(self.layout, self.roles, 0)[-1:]
        return build_agents(self.layout, self.roles, self.latent_steps)


def select_lora(lora, role: str):
    """One shared adapter, or {'roles': {role: adapter}} for per-role adapters."""
    if lora is None or "roles" not in lora:
        return lora
    return lora["roles"].get(role)


def upstream_visibility(mc: MethodConfig, j: int) -> Optional[Visibility]:
    if mc.method == "stitch_mas":
        return make_visibility(segments=[j])
    if mc.communication == "overwrite":
        return make_visibility(segments=[s for s in (j - 1, j) if s >= 0])
    return None


def solver_visibility(mc: MethodConfig, k: int, total_latent: int) -> Optional[Visibility]:
    """k = solver's segment id; upstream agents are 0..k-1."""
    own = make_visibility(segments=[k])
    if total_latent == 0 and not mc.solver_reads_trace:
        return own
    upstream = list(range(k)) if mc.communication == "concat" else [k - 1][:k]  # k = 0: no upstream agent
    kinds = [LATENT] if mc.visibility == "latent_only" else None
    if not upstream:
        return own
    return own | make_visibility(segments=upstream, kinds=kinds)


@dataclasses.dataclass
class BatchResult:
    texts: list[str]
    records: list[dict]   # per row: token counts, trace length per agent, notes


def run_batch(model, questions: Sequence[str], answer_instruction: str, mc: MethodConfig, *,
              lora=None, lora_scale: float = 1.0, seed=0) -> BatchResult:
    """Run one method on a batch of questions; the answer comes from the last agent.

    ``seed``: an int (question i gets seed + i) or one seed per question; with sampling, a
    question's answer depends on its own seed only, not on the rest of the batch."""
    mc.validate()
    if mc.method == "c2c":  # ``model`` is a c2c.C2CSystem (receiver, sharer, fuser)
        from diffmas_jax import c2c
        return c2c.run_batch(model, questions, answer_instruction, mc, seed=seed)
    if mc.method == "diffmas" and lora is None:
        raise ValueError("method 'diffmas' needs a trained adapter (config.lora=DIR)")
    if mc.method == "text_mas":
        return _text_mas(model, questions, answer_instruction, mc, lora, lora_scale, seed)
    return _trace_method(model, questions, answer_instruction, mc, lora, lora_scale, seed)


_REALIGN_CACHE: dict = {}


def _realign_for(model, mode: str, lam: float):
    """W_a depends only on the weights: solve it once per model, not once per batch."""
    embed = model.params["embed"]
    key = (id(embed), mode, lam)
    if key not in _REALIGN_CACHE:
        _REALIGN_CACHE.clear()  # hold one model's matrix at a time
        # Keeping the embedding referenced keeps its id from being reused by another array.
        _REALIGN_CACHE[key] = (embed, make_realign(model.params, model.cfg, mode, lam))
    return _REALIGN_CACHE[key][1]


def _encode(model, agent, questions, mc, **kw):
    seqs = [render_chat(model.tokenizer, agent_messages(agent, q, **kw), mc.enable_thinking) for q in questions]
    tokens, valid = pad_batch(seqs, model.tokenizer.pad_token_id or 0, multiple=mc.prompt_bucket)
    return jnp.asarray(tokens), jnp.asarray(valid), [len(s) for s in seqs]


def _trace_method(model, questions, answer_instruction, mc, lora, lora_scale, seed) -> BatchResult:
    """single / latent_mas / stitch_mas / diffmas: a fold of agent stages over one trace."""
    agents = mc.agents()
    upstream, solver = agents[:-1], agents[-1]
    k = len(upstream)
    single = mc.method == "single"
    dtype = resolve_dtype(mc.compute_dtype)
    encoded = [_encode(model, a, questions, mc) for a in upstream]
    s_tokens, s_valid, s_lens = _encode(model, solver, questions, mc, answer_instruction=answer_instruction,
                                        is_solver=True, has_team=not single)
    capacity = sum(t.shape[1] + a.latent_steps for (t, _, _), a in zip(encoded, upstream)) \
        + s_tokens.shape[1] + mc.max_new_tokens
    trace = KVTrace.create(model.cfg, len(questions), capacity, dtype=dtype)
    realign = _realign_for(model, mc.realign, mc.realign_lambda)
    stitch_pos = jnp.zeros((len(questions),), jnp.int32)
    for j, (agent, (tokens, valid, _)) in enumerate(zip(upstream, encoded)):
        if mc.method == "stitch_mas":  # an empty cache of its own: positions restart at 0
            trace = trace.replace(next_pos=jnp.zeros_like(trace.next_pos))
        trace = jit_agent_stage(model.params, model.cfg, trace, tokens, valid, realign,
                                steps=agent.latent_steps, segment=j, visible=upstream_visibility(mc, j),
                                lora=select_lora(lora, agent.role), lora_scale=lora_scale, compute_dtype=dtype)
        stitch_pos = jnp.maximum(stitch_pos, trace.next_pos)
    if mc.method == "stitch_mas":
        trace = trace.replace(next_pos=stitch_pos)
    total_latent = sum(a.latent_steps for a in upstream)
    vis = solver_visibility(mc, k, total_latent)
    solver_lora = select_lora(lora, solver.role)
    trace, logits = jit_solver_prefill(model.params, model.cfg, trace, s_tokens, s_valid, segment=k,
                                       visible=vis, lora=solver_lora, lora_scale=lora_scale, compute_dtype=dtype)
    gen = decode_to_text(model.params, model.cfg, model.tokenizer, trace, logits,
                         max_new_tokens=mc.max_new_tokens, sampling=mc.sampling,
                         rng=row_keys(seed, len(questions), stream=k), segment=k, visible=vis, lora=solver_lora,
                         lora_scale=lora_scale, compute_dtype=dtype)
    seg, valid, kind = to_host(gen.trace.segment), to_host(gen.trace.valid), to_host(gen.trace.kind)
    records = []
    for i in range(len(questions)):
        per_agent = {f"{j}:{a.role}": int(((seg[i] == j) & valid[i]).sum()) for j, a in enumerate(agents)}
        latent = int(((kind[i] == LATENT) & valid[i]).sum())
        records.append(dict(
            prompt_tokens=int(sum(int(v[i].sum()) for _, v, _ in encoded) + int(s_valid[i].sum())),
            generated_tokens=len(gen.tokens[i]), latent_slots=latent, trace_per_agent=per_agent,
            generated_logprobs=gen.logprobs[i], generated_entropy=gen.entropies[i], generated_ids=gen.tokens[i]))
    return BatchResult(texts=gen.texts, records=records)


def speak_upstream(model, questions, mc: MethodConfig, lora=None, lora_scale: float = 1.0, seed=0):
    """TextMAS Stage I: each upstream agent writes text after reading the earlier agents' text.

    Returns (notes per question as [(role, text)], prompt tokens per question, written tokens per question).
    """
    agents = mc.agents()
    notes: list[list[tuple[str, str]]] = [[] for _ in questions]
    prompt_tokens = np.zeros(len(questions), int)
    written = np.zeros(len(questions), int)
    for j, agent in enumerate(agents[:-1]):
        chats = [agent_messages(agent, q, notes=notes[i]) for i, q in enumerate(questions)]
        prompt_tokens += [len(render_chat(model.tokenizer, c, mc.enable_thinking)) for c in chats]
        gen = generate(model, chats, max_new_tokens=mc.text_max_new_tokens, sampling=mc.sampling, seed=seed, stream=j,
                       enable_thinking=mc.enable_thinking, compute_dtype=mc.compute_dtype,
                       bucket=mc.prompt_bucket, lora=select_lora(lora, agent.role), lora_scale=lora_scale)
        for i, text in enumerate(gen.texts):
            notes[i].append((agent.role, text))
            written[i] += len(gen.tokens[i])
    return notes, prompt_tokens, written


def _text_mas(model, questions, answer_instruction, mc, lora, lora_scale, seed) -> BatchResult:
    """Upstream agents speak; the solver reads all of their text."""
    solver = mc.agents()[-1]
    # An adapter with text_mas is a TextMAS+SFT adapter: trained on the solver reading notes the
    # base model wrote (train.upstream_notes), so the upstream agents speak without it here too.
    notes, prompt_tokens, written = speak_upstream(model, questions, mc, None, lora_scale, seed)
    chats = [agent_messages(solver, q, answer_instruction=answer_instruction, is_solver=True, notes=notes[i])
             for i, q in enumerate(questions)]
    prompt_tokens = prompt_tokens + [len(render_chat(model.tokenizer, c, mc.enable_thinking)) for c in chats]
    gen = generate(model, chats, max_new_tokens=mc.max_new_tokens, sampling=mc.sampling,
                   seed=seed, stream=len(mc.agents()) - 1, enable_thinking=mc.enable_thinking,
                   compute_dtype=mc.compute_dtype, bucket=mc.prompt_bucket,
                   lora=select_lora(lora, solver.role), lora_scale=lora_scale)
    records = [dict(prompt_tokens=int(prompt_tokens[i]), generated_tokens=len(gen.tokens[i]) + int(written[i]),
                    answer_tokens=len(gen.tokens[i]), latent_slots=0, trace_per_agent={},
                    generated_logprobs=gen.logprobs[i], generated_entropy=gen.entropies[i],
                    generated_ids=gen.tokens[i], notes=[t for _, t in notes[i]])
               for i in range(len(questions))]
    return BatchResult(texts=gen.texts, records=records)
