"""Decoding on top of a KV trace: greedy and sampled, jit-compiled, ragged batches.

The decode loop is a ``lax.while_loop`` over reserved trace slots: every step
writes one slot per row at a traced offset, rows that have finished write
invalid slots, and the loop ends when every row is done. Stop strings need
text, so the host runs the loop in chunks and checks decoded text between them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import (forward, last_valid_index, lm_logits, resolve_dtype, take_rows,
                                           use_per_layer, with_lm_head)
from diffmas_jax.model.transformer import per_layer as as_per_layer
from diffmas_jax.distributed import to_host
from diffmas_jax.sharding import mesh_jit
from diffmas_jax.trace import PROMPT, TEXT, KVTrace
from diffmas_jax.xla_cpu import prompt_dot_options, use_out_in_kernels, ynn_dot_options


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 disables


GREEDY = SamplingConfig()


def row_keys(seed, batch: int, stream: int = 0) -> jax.Array:
    """Per-row PRNG keys [batch, 2] for sampled decoding.

    ``seed`` is an int (row i gets seed + i) or one seed per row. A row's draws depend only
    on its own seed, its ``stream`` (the agent that decodes) and its token index, never on
    the rest of its batch: row i of a batch with seed s samples as a batch of one with
    seed s + i, and a resumed evaluation may decode any subset of a batch again."""
    seeds = [int(seed) + i for i in range(batch)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch} rows")
    keys = jnp.stack([jax.random.PRNGKey(x) for x in seeds]) if seeds else jnp.zeros((0, 2), jnp.uint32)
    return jax.vmap(jax.random.fold_in, (0, None))(keys, stream)


def _raw_keys(rng):
    """uint32 key data ([2] or [B, 2]) for raw and typed (``jax.random.key``) keys alike."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def sample_tokens(logits, rng, sampling: SamplingConfig):
    """logits [B, V] float32 -> token ids [B]. ``rng``: one key for the batch, or per-row
    keys [B, 2] (each row draws from its own)."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k > 0:
        k = min(int(sampling.top_k), logits.shape[-1])  # as transformers: k past the vocabulary keeps all
        kth = jax.lax.top_k(logits, k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cutoff_idx = jnp.maximum(jnp.sum(cum - probs < sampling.top_p, axis=-1, keepdims=True) - 1, 0)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    rng = _raw_keys(rng)
    if rng.ndim == 2:
        return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# The per-layer loop compiles about 5 s longer than the layer scan (embedded model) and saves
# 10-15 ms per step: short one-off generations (tests, probes) keep the scan, while real runs
# (256 tokens by default, the compiled loop reused batch after batch) take the faster loop.
PER_LAYER_MIN_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class DecodeState:
    trace: KVTrace
    logits: jax.Array      # [B, V] next-token logits
    done: jax.Array        # [B] bool
    tokens: jax.Array      # [B, N] generated ids (pad after a row's end)
    logprobs: jax.Array    # [B, N] model log-prob of each generated token
    entropy: jax.Array     # [B, N] entropy (nats) of the model's next-token distribution
    count: jax.Array       # [B] tokens generated per row
    step: jax.Array        # scalar: steps taken
    rng: jax.Array         # [B, 2] per-row keys; step t of row i draws from fold_in(rng[i], t)


jax.tree_util.register_dataclass(
    DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)], meta_fields=[])


def start_decode(trace: KVTrace, last_logits, max_new_tokens: int, rng, done=None) -> DecodeState:
    """``rng``: per-row keys [B, 2] (``row_keys``), or one key that row i folds in i."""
    b = last_logits.shape[0]
    rng = _raw_keys(rng)
    if rng.ndim == 1:
        rng = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b))
    trace = trace.reserve(max_new_tokens, f"decoding {max_new_tokens} new tokens")
    return DecodeState(
        trace=trace, logits=last_logits.astype(jnp.float32),
        done=jnp.zeros((b,), bool) if done is None else done,
        tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        entropy=jnp.zeros((b, max_new_tokens), jnp.float32),
        count=jnp.zeros((b,), jnp.int32), step=jnp.int32(0), rng=rng)


def decode_steps(params, cfg: ModelConfig, state: DecodeState, *, num_steps: int, eos_ids: tuple,
                 sampling: SamplingConfig = GREEDY, pad_id: int = 0, segment=0, visible=None, lora=None,
                 lora_scale: float = 1.0, compute_dtype=jnp.float32,
                 per_layer: Optional[bool] = None) -> DecodeState:
    """Run up to ``num_steps`` decode steps (fewer if every row finishes).

    ``per_layer`` runs the steps' layers from per-layer copies of the weights and K/V, made
    once before the loop. None chooses it where ``use_per_layer`` does, for generations of
    at least ``PER_LAYER_MIN_TOKENS`` tokens."""
    n = state.tokens.shape[1]
    base = state.trace.length - n  # first reserved slot
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    stop_at = jnp.minimum(state.step + num_steps, n)

    def cond(s: DecodeState):
        return (s.step < stop_at) & ~jnp.all(s.done)

    def body(s: DecodeState):
        keys = jax.vmap(jax.random.fold_in, (0, None))(s.rng, s.step)
        tok = sample_tokens(s.logits, keys, sampling)
        live = ~s.done
        tok = jnp.where(live, tok, pad_id)
        logp = jax.nn.log_softmax(s.logits, -1)
        lp = jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        out = forward(params, cfg, s.trace, tokens=tok[:, None], valid=live[:, None],
                      segment=segment, kind=TEXT, offset=base + s.step, visible=visible, lora=lora,
                      lora_scale=lora_scale, compute_dtype=compute_dtype)
        return DecodeState(
            trace=out.trace, logits=out.logits[:, 0],
            done=s.done | jnp.isin(tok, eos),
            tokens=s.tokens.at[:, s.step].set(tok),
            logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, lp, 0.0)),
            entropy=s.entropy.at[:, s.step].set(jnp.where(live, ent, 0.0)),
            count=s.count + live.astype(jnp.int32), step=s.step + 1, rng=s.rng)

    if per_layer is None:
        per_layer = use_per_layer(params) and n >= PER_LAYER_MIN_TOKENS
    params = with_lm_head(params, cfg)
    if per_layer:
        params, lora = as_per_layer(params, lora, cfg, out_in=use_out_in_kernels(state.trace.batch))
        state = dataclasses.replace(state, trace=state.trace.per_layer())
        state = jax.lax.while_loop(cond, body, state)
        return dataclasses.replace(state, trace=state.trace.stacked())
    return jax.lax.while_loop(cond, body, state)


jit_decode_steps = mesh_jit(
    decode_steps, static_argnames=("cfg", "num_steps", "eos_ids", "sampling", "pad_id",
                                   "lora_scale", "compute_dtype", "per_layer"),
    compiler_options=lambda args: ynn_dot_options(args["state"].trace.batch))  # few-row matmuls (xla_cpu)


def prefill(params, cfg, trace, tokens, valid, *, segment=0, kind=PROMPT, visible=None,
            lora=None, lora_scale=1.0, compute_dtype=jnp.float32):
    """Append a (padded) prompt; return the trace, last-real-token logits and hidden."""
    out = forward(params, cfg, trace, tokens=tokens, valid=valid, segment=segment, kind=kind,
                  visible=visible, lora=lora, lora_scale=lora_scale, compute_dtype=compute_dtype,
                  return_logits=False)
    idx = last_valid_index(valid)
    hidden = take_rows(out.hidden, idx)
    return out.trace, lm_logits(params, cfg, hidden), hidden


jit_prefill = mesh_jit(prefill, static_argnames=("cfg", "lora_scale", "compute_dtype"),
                       compiler_options=lambda args: prompt_dot_options())  # prompt GEMMs (xla_cpu)


# --------------------------------------------------------------------------- host side
def bucket_length(n: int, multiple: int = 32) -> int:
    """Round prompt lengths up so new lengths rarely trigger recompiles."""
    return max(multiple, -(-n // multiple) * multiple)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None,
              multiple: int = 32):
    """Right-pad id lists -> (tokens [B, T] int32, valid [B, T] bool) numpy arrays."""
    longest = max((len(s) for s in seqs), default=0)
    t = length or bucket_length(longest, multiple)
    if longest > t:
        raise ValueError(f"prompt of {longest} tokens exceeds the padded length {t}")
    tokens = np.full((len(seqs), t), pad_id, np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        valid[i, :len(s)] = True
    return tokens, valid


def chat_ids(tokenizer, messages: list[dict], enable_thinking: Optional[bool] = None) -> list[int]:
    """Token ids of a chat, ending with the assistant turn's opening; a template that rejects
    a system turn gets it folded into the user turn.

    A tokenizer without a chat template (a base model) gets a plain transcript instead:
    "System: ...", "User: ...", "Assistant: ..." paragraphs ending with "Assistant:"."""
    if getattr(tokenizer, "chat_template", None) is None:
        return plain_chat_ids(tokenizer, messages)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def apply(msgs):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    try:
        return apply(messages)
    except Exception as refused:
        # templates that reject a system turn (Mistral-7B-Instruct's "roles must alternate") get
        # it folded into the first user turn; every method's prompts come through here
        first, second = (messages + [{}, {}])[:2]
        if not (first.get("role") == "system" and second.get("role") == "user"
                and isinstance(first.get("content"), str) and isinstance(second.get("content"), str)):
            raise
        merged = {"role": "user", "content": first["content"] + "\n\n" + second["content"]}
        try:
            return apply([merged] + list(messages[2:]))
        except Exception:
            raise refused from None  # the fold did not help: the template's own complaint


def plain_chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A chat as a plain-text transcript, for base models whose tokenizer has no chat template."""
    text = "".join(f"{m['role'].capitalize()}: {m['content'].strip()}\n\n" for m in messages) + "Assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def eos_ids_of(tokenizer, cfg: ModelConfig) -> tuple:
    ids = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    entropies: list[list[float]]
    trace: KVTrace


def finish_rows(state: DecodeState, with_entropy: bool = False):
    """Per-row generated ids and log-probs (and entropies), trimmed to each row's length."""
    toks, lps, cnt = (to_host(state.tokens), to_host(state.logprobs), to_host(state.count))
    out = ([toks[i, :cnt[i]].tolist() for i in range(len(cnt))],
           [lps[i, :cnt[i]].tolist() for i in range(len(cnt))])
    if with_entropy:
        ent = to_host(state.entropy)
        out += ([ent[i, :cnt[i]].tolist() for i in range(len(cnt))],)
    return out


def decode_to_text(params, cfg, tokenizer, trace, last_logits, *, max_new_tokens: int,
                   sampling: SamplingConfig = GREEDY, stop: Sequence[str] = (), rng=None,
                   chunk: int = 32, segment=0, visible=None, lora=None, lora_scale=1.0,
                   compute_dtype=jnp.float32, skip_special_tokens=True) -> Generation:
    """Decode from ``last_logits``; EOS ends a row inside the jitted loop, stop strings
    between chunks of ``chunk`` steps. ``rng``: per-row keys (``row_keys``) or one key.
    Text is cut before the first stop string; tokens, log-probs and entropies end with the
    token that completed it (the returned trace still holds the rest of that row's last
    chunk)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = eos_ids_of(tokenizer, cfg)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    state = start_decode(trace, last_logits, max_new_tokens, rng)
    steps = chunk if stop else max_new_tokens
    kw = dict(eos_ids=eos, sampling=sampling, pad_id=int(pad), segment=segment, visible=visible, lora=lora,
              lora_scale=lora_scale, compute_dtype=resolve_dtype(compute_dtype))
    while True:
        state = jit_decode_steps(params, cfg, state, num_steps=steps, **kw)
        if bool(jnp.all(state.done)) or int(state.step) >= max_new_tokens:
            break
        if stop:  # mark rows whose text already holds a stop string as done
            toks, _ = finish_rows(state)
            hit = [any(s in tokenizer.decode(t) for s in stop) for t in toks]
            state = dataclasses.replace(state, done=state.done | jnp.asarray(hit))
            if all(to_host(state.done)):
                break
    toks, lps, ents = finish_rows(state, with_entropy=True)
    if stop:  # a row ran on to the end of its chunk: keep its tokens up to the stop
        ends = [_tokens_through_stop(tokenizer, t, stop) for t in toks]
        toks, lps, ents = ([row[:n] for row, n in zip(rows, ends)] for rows in (toks, lps, ents))
    texts = [tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in toks] \
        if tokenizer is not None else [""] * len(toks)
    texts = [cut_at_stop(t, stop) for t in texts]
    return Generation(tokens=toks, logprobs=lps, texts=texts, entropies=ents, trace=state.trace)


def _tokens_through_stop(tokenizer, toks: list[int], stop: Sequence[str]) -> int:
    """Length of the shortest prefix of ``toks`` whose text holds a stop string (all if none);
    a prefix that holds one is followed only by longer ones that do, so bisect."""
    def hit(n):
        text = tokenizer.decode(toks[:n])
        return any(s and s in text for s in stop)
    if not toks or not hit(len(toks)):
        return len(toks)
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def generate(model, prompts: Sequence, *, max_new_tokens: int = 128, sampling: SamplingConfig = GREEDY,
             stop: Sequence[str] = (), seed=0, stream: int = 0, capacity: Optional[int] = None,
             chat: bool = True, enable_thinking: Optional[bool] = None,
             compute_dtype=jnp.float32, bucket: int = 32, lora=None, lora_scale: float = 1.0) -> Generation:
    """Generate for a batch of prompts (strings, or chat message lists when ``chat``).

    ``seed``/``stream``: the rows' sampling keys (``row_keys``): an int, or one seed per prompt."""
    tok = model.tokenizer
    seqs = []
    for p in prompts:
        if chat:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            seqs.append(chat_ids(tok, msgs, enable_thinking))
        else:
            seqs.append(tok(p, add_special_tokens=True)["input_ids"])
    tokens, valid = pad_batch(seqs, tok.pad_token_id or 0, multiple=bucket)
    capacity = capacity or tokens.shape[1] + max_new_tokens
    compute_dtype = resolve_dtype(compute_dtype)
    trace = KVTrace.create(model.cfg, len(seqs), capacity, dtype=compute_dtype)
    if tokens.shape[1] + max_new_tokens > capacity:
        trace.check_room(tokens.shape[1] + max_new_tokens,
                         f"a prompt of {tokens.shape[1]} padded tokens plus {max_new_tokens} new tokens")
    trace, logits, _ = jit_prefill(model.params, model.cfg, trace, jnp.asarray(tokens), jnp.asarray(valid),
                                   lora=lora, lora_scale=lora_scale, compute_dtype=compute_dtype)
    return decode_to_text(model.params, model.cfg, tok, trace, logits, max_new_tokens=max_new_tokens,
                          sampling=sampling, stop=stop, rng=row_keys(seed, len(seqs), stream), lora=lora,
                          lora_scale=lora_scale, compute_dtype=compute_dtype)
