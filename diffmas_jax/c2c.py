"""C2C (Cache-to-Cache, Fu et al. 2025): a learned fuser from a sharer's KV cache into a receiver's.

Both models read the same prompt with shared position ids; for every prompt token but
the last, each receiver layer's keys and values become

    K_recv + gate * weight * proj([K_sharer, K_recv])        (the same for V)

with one fuser per receiver layer (separate weights for K and V), reading sharer layer
``clamp(t + S - T, 0, S - 1)`` ("last aligned") or a proportional-depth layer. The
receiver then reads its last prompt token on the fused cache and decodes alone.

The fuser is its own pytree (like the LoRA tree): leaves are stacked over receiver
layers and applied with ``vmap``, so compile time does not grow with the number of
layers. Gates are one logit per layer for K and one for V: in
training ``sigmoid((logit + Gumbel) / tau)`` with tau annealed per optimizer step, at
eval a hard ``logit > 0``. A closed gate leaves the receiver's cache bit for bit.

Multi-agent: C2C is the channel between consecutive agents. Agent 0 reads its prompt
alone; agent j's cache is its own reading of its prompt fused with the previous agent's
reading of the same tokens on top of that agent's cache (the backbone with agent j-1's
context is the sharer; positions continue along the chain, as in the shared trace).
With one agent, the sharer is the sharer model reading the same prompt: plain C2C.
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import default_positions, forward, resolve_dtype, rms_norm
from diffmas_jax.sharding import jit_per_options
from diffmas_jax.trace import PROMPT, KVTrace
from diffmas_jax.xla_cpu import prompt_dot_options

LAYER_MAPS = ("last", "proportional")


class FuserConfigError(ValueError):
    """A fuser that cannot be built or does not fit the given models."""


@dataclasses.dataclass(frozen=True)
class FuserConfig:
    """Shapes of one sharer -> receiver fuser (hashable: a jit static argument)."""
    sharer_layers: int
    sharer_kv_heads: int
    sharer_head_dim: int
    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    hidden: int = 1024          # the reference's size; CPU configs use less
    depth: int = 3              # residual blocks: 1 shared + (depth - 2) projection + 1 weight (>= 3)
    dropout: float = 0.1
    layer_map: str = "last"     # last | proportional

    @classmethod
    def for_models(cls, sharer: ModelConfig, receiver: ModelConfig, **kw) -> "FuserConfig":
        return cls(sharer.num_layers, sharer.num_kv_heads, sharer.head_dim,
                   receiver.num_layers, receiver.num_kv_heads, receiver.head_dim, **kw).validate()

    def validate(self) -> "FuserConfig":
        if self.layer_map not in LAYER_MAPS:
            raise FuserConfigError(f"unknown layer_map {self.layer_map!r}; choose one of {', '.join(LAYER_MAPS)}")
        if int(self.hidden) <= 0:
            raise FuserConfigError(f"fuser hidden size must be positive, got {self.hidden}")
        if int(self.depth) < 3:
            raise FuserConfigError(f"fuser depth must be >= 3 (shared, projection and weight blocks), got {self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise FuserConfigError(f"fuser dropout must be in [0, 1), got {self.dropout}")
        return self

    def check_models(self, sharer: ModelConfig, receiver: ModelConfig) -> None:
        want = (self.sharer_layers, self.sharer_kv_heads, self.sharer_head_dim,
                self.receiver_layers, self.receiver_kv_heads, self.receiver_head_dim)
        got = (sharer.num_layers, sharer.num_kv_heads, sharer.head_dim,
               receiver.num_layers, receiver.num_kv_heads, receiver.head_dim)
        if want != got:
            raise FuserConfigError(
                f"the fuser was built for (layers, kv_heads, head_dim) sharer {want[:3]} -> receiver {want[3:]}, "
                f"but the models are sharer {got[:3]} -> receiver {got[3:]}")

    @property
    def sharer_features(self) -> int:
        return self.sharer_kv_heads * self.sharer_head_dim

    @property
    def receiver_features(self) -> int:
        return self.receiver_kv_heads * self.receiver_head_dim


def layer_alignment(sharer_layers: int, receiver_layers: int, mode: str = "last") -> np.ndarray:
    """Sharer layer read by each receiver layer t.

    ``last``: clamp(t + S - T, 0, S - 1), so the last layers line up (a deeper sharer
    skips its first layers, a shallower one repeats its first layer). ``proportional``:
    round(t (S - 1) / (T - 1)), first to first and last to last.
    """
    s, t = int(sharer_layers), int(receiver_layers)
    idx = np.arange(t)
    if mode == "last":
        return np.clip(idx + s - t, 0, s - 1)
    if mode == "proportional":
        if t == 1:
            return np.array([s - 1])
        return np.rint(idx * (s - 1) / (t - 1)).astype(np.int64)
    raise FuserConfigError(f"unknown layer_map {mode!r}; choose one of {', '.join(LAYER_MAPS)}")


# --------------------------------------------------------------------------- params
# Initialised with numpy: dozens of small threefry draws compile for many seconds on a CPU.
def _fuser_layout(fc: FuserConfig, uniform: Callable, const: Callable) -> dict:
    """The fuser tree with leaves from ``uniform(shape, fan_in)`` (PyTorch's nn.Linear init
    bound) and ``const(shape, value)``; the one place its structure and shapes are written."""
    t, h = (fc.receiver_layers,), fc.hidden

    def linear(lead, din, dout):
        return {"kernel": uniform(lead + (din, dout), din), "bias": uniform(lead + (dout,), din)}

    def block(lead):
        return {"norm": const(lead + (h,), 1.0), "w1": uniform(lead + (h, h), h), "w2": uniform(lead + (h, h), h)}

    def part():
        return {"in": linear(t, fc.sharer_features + fc.receiver_features, h),
                "trunk": block(t),
                "proj_blocks": block(t + (fc.depth - 2,)),
                "proj_out": linear(t, h, fc.receiver_features),
                "weight_block": block(t),
                "weight_out": linear(t, h, fc.receiver_kv_heads),
                "gate": const(t, 0.0)}

    return {"k": part(), "v": part()}


def init_fuser(fc: FuserConfig, key) -> dict:
    """{'k': part, 'v': part}; every leaf has a leading receiver-layer axis. Gate logits start at 0.

    ``key``: a jax PRNG key or an int seed."""
    fc.validate()
    seed = np.asarray(jax.random.key_data(key) if isinstance(key, jax.Array) else key, np.uint32).ravel()
    rng = np.random.default_rng(seed.tolist())
    tree = _fuser_layout(fc, lambda shape, fan_in: rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in),
                                                               shape).astype(np.float32),
                         lambda shape, value: np.full(shape, value, np.float32))
    return jax.tree.map(jnp.asarray, tree)


def fuser_shapes(fc: FuserConfig) -> dict[str, tuple]:
    """'k/in/kernel' -> shape: every tensor a fuser of this config holds, by its file name."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for name, sub in node.items() for k, v in flat(sub, f"{prefix}{name}/").items()}
        return {prefix[:-1]: tuple(node)}
    return flat(_fuser_layout(fc, lambda shape, _: shape, lambda shape, _: shape))


def decays(path) -> bool:
    """Weight decay on matrices only (not norms, biases or gate logits)."""
    return getattr(path[-1], "key", None) in ("kernel", "w1", "w2")


# --------------------------------------------------------------------------- apply
def _dropout(x, keep, rate):
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


def _block(p, h, keep, rate):
    """Residual FFN: h + dropout(W2 gelu(W1 rmsnorm(h)))."""
    x = rms_norm(h, p["norm"], 1e-6)
    x = jax.nn.gelu(x @ p["w1"], approximate=False) @ p["w2"]
    return h + _dropout(x, keep, rate)


def _linear(p, x):
    return x @ p["kernel"] + p["bias"]


def _fuse_layer(p, s, r, noise, temperature, *, rate: float):
    """One receiver layer. s [B, N, Fs] sharer features; r [B, N, KVH, hd] receiver K or V.

    ``noise`` (training): uniforms for the Gumbel gate [B, N, KVH, 1] and dropout keep
    masks [depth, B, N, H] (None without dropout); None at eval (hard gate)."""
    b, n, kvh, hd = r.shape
    keep = (lambda i: None) if noise is None or noise[1] is None else (lambda i: noise[1][i])
    rf = r.astype(jnp.float32)
    h = _linear(p["in"], jnp.concatenate([s.astype(jnp.float32), rf.reshape(b, n, kvh * hd)], axis=-1))
    h = _block(p["trunk"], h, keep(0), rate)
    y = h
    depth = p["proj_blocks"]["w1"].shape[0] + 2
    for i in range(depth - 2):
        y = _block(jax.tree.map(lambda a: a[i], p["proj_blocks"]), y, keep(i + 1), rate)
    proj = _linear(p["proj_out"], y).reshape(b, n, kvh, hd)
    weight = jax.nn.sigmoid(_linear(p["weight_out"], _block(p["weight_block"], h, keep(depth - 1), rate)))[..., None]
    if noise is not None:  # Gumbel-sigmoid, one noise sample per row, token and head (as the reference)
        gate = jax.nn.sigmoid((p["gate"] - jnp.log(-jnp.log(noise[0]))) / temperature)
        return (rf + gate * weight * proj).astype(r.dtype)
    # Hard gate: a closed one returns the receiver's values themselves, not r + 0 * (...).
    return jnp.where(p["gate"] > 0, (rf + weight * proj).astype(r.dtype), r)


def _training_noise(rng, fc: FuserConfig, t, b, n):
    """A step's random numbers in two draws (each threefry call costs seconds of CPU compile):
    uniforms for the Gumbel gates, 16-bit integers for the dropout masks (2 bytes, not 4,
    per activation element)."""
    kg, kd = jax.random.split(rng)
    gumbel_u = jax.random.uniform(kg, (2, t, b, n, fc.receiver_kv_heads, 1), jnp.float32, 1e-20, 1.0)
    keep = None
    if fc.dropout > 0:
        bits = jax.random.bits(kd, (2, t, fc.depth, b, n, fc.hidden), jnp.uint16)
        keep = bits >= jnp.uint16(round(fc.dropout * 65536))
    return [(gumbel_u[i], None if keep is None else keep[i]) for i in range(2)]


def fuse_kv(fuser: dict, fc: FuserConfig, k_s, v_s, k_r, v_r, mask, *, train: bool = False,
            temperature=1.0, rng=None):
    """Fused (K, V) for the receiver.

    k_s/v_s [S, B, N, KVHs, hds] sharer cache, k_r/v_r [T, B, N, KVHr, hdr] receiver
    cache of the same N tokens; mask [B, N] marks the slots to fuse (others stay as
    they are). ``train``: Gumbel-sigmoid gates at ``temperature`` and dropout.
    """
    idx = jnp.asarray(layer_alignment(fc.sharer_layers, fc.receiver_layers, fc.layer_map))
    t, b, n = k_r.shape[:3]
    noise = _training_noise(jax.random.PRNGKey(0) if rng is None else rng, fc, t, b, n) if train else [None, None]
    layer = jax.vmap(partial(_fuse_layer, rate=fc.dropout if train else 0.0), in_axes=(0, 0, 0, 0, None))
    out = []
    for name, xs, xr, nz in (("k", k_s, k_r, noise[0]), ("v", v_s, v_r, noise[1])):
        feats = xs[idx].reshape(t, b, n, -1)
        fused = layer(fuser[name], feats, xr, nz, jnp.asarray(temperature, jnp.float32))
        out.append(jnp.where(mask[None, :, :, None, None], fused, xr))
    return tuple(out)


jit_fuse_kv = jax.jit(fuse_kv, static_argnames=("fc", "train"))


# --------------------------------------------------------------------------- stages
def sharer_reading(params, cfg: ModelConfig, tokens, valid, *, compute_dtype=jnp.float32) -> KVTrace:
    """Plain C2C's sharer side: the sharer's cache of a prompt head, read from position 0 as
    the receiver reads it. The fuser does not change it, so training computes it in a jit
    of its own, outside the gradient (on a mesh, ``params`` laid out by ``cfg``)."""
    dtype = resolve_dtype(compute_dtype)
    trace = KVTrace.create(cfg, tokens.shape[0], tokens.shape[1], dtype=dtype)
    return forward(params, cfg, trace, tokens=tokens, valid=valid, positions=default_positions(trace, valid),
                   segment=0, kind=PROMPT, compute_dtype=dtype, return_logits=False).trace


def prompt_cache(r_params, r_cfg: ModelConfig, head, valid, *, capacity: int, segment=0, next_pos=None,
                 fuser=None, fc: Optional[FuserConfig] = None, s_params=None, s_cfg: Optional[ModelConfig] = None,
                 s_trace: Optional[KVTrace] = None, s_head=None, s_read: Optional[KVTrace] = None,
                 train: bool = False, temperature=1.0, rng=None, compute_dtype=jnp.float32,
                 remat: bool = False) -> KVTrace:
    """The receiver's cache of a prompt head (every token but the last) in a new trace.

    With a sharer (``s_cfg``), the sharer reads ``s_head`` (the same tokens, or the
    receiver's tokens aligned to the sharer's vocabulary) on top of ``s_trace`` (its
    context) at the receiver's positions, or alone from position 0 (``s_trace`` None:
    plain C2C; ``s_read``: that reading already done), and the head slots are fused.
    ``next_pos`` [B]: where the receiver's positions start (default 0).
    """
    dtype = resolve_dtype(compute_dtype)
    b, n = head.shape
    trace = KVTrace.create(r_cfg, b, capacity, dtype=dtype)
    if next_pos is not None:
        trace = trace.replace(next_pos=next_pos)
    pos = default_positions(trace, valid)
    out = forward(r_params, r_cfg, trace, tokens=head, valid=valid, positions=pos, segment=segment, kind=PROMPT,
                  compute_dtype=dtype, return_logits=False, remat=remat).trace
    if s_cfg is None and s_read is None:
        return out
    if s_read is None and s_trace is None:
        s_read = sharer_reading(s_params, s_cfg, head if s_head is None else s_head, valid, compute_dtype=dtype)
    if s_read is not None:
        s_k, s_v = s_read.k[:, :, :n], s_read.v[:, :, :n]
    else:  # the sharer reads on top of its context
        s0 = s_trace.length
        s_out = forward(s_params, s_cfg, s_trace, tokens=head if s_head is None else s_head, valid=valid,
                        positions=pos, segment=segment, kind=PROMPT, compute_dtype=dtype, return_logits=False,
                        remat=remat).trace
        s_k, s_v = s_out.k[:, :, s0:s0 + n], s_out.v[:, :, s0:s0 + n]
    k, v = fuse_kv(fuser, fc, s_k, s_v, out.k[:, :, :n], out.v[:, :, :n], valid, train=train,
                   temperature=temperature, rng=rng)
    return out.replace(k=out.k.at[:, :, :n].set(k), v=out.v.at[:, :, :n].set(v))


def chain_cache(fuser, fc: FuserConfig, r_params, r_cfg: ModelConfig, s_params, s_cfg: ModelConfig,
                heads: Sequence, valids: Sequence, lasts: Sequence, s_head=None, *, extra: int,
                s_read: Optional[KVTrace] = None, train: bool = False, temperature=1.0, rng=None,
                compute_dtype=jnp.float32, remat: bool = False) -> KVTrace:
    """The last agent's fused prompt-head cache, with ``extra`` free slots after it.

    heads/valids: per agent [B, H_j] (receiver tokens, every prompt token but the last);
    lasts: the last prompt token [B] of every agent but the last. One agent: plain C2C
    from the sharer model (``s_head``: its aligned tokens, None when the tokenizers
    match; ``s_read``: its reading already done). Several: agent j-1 (the receiver model
    with its cache) shares into agent j.
    """
    k = len(heads) - 1
    rng = jax.random.PRNGKey(0) if rng is None else rng
    kw = dict(train=train, temperature=temperature, compute_dtype=compute_dtype, remat=remat)
    if k == 0:
        return prompt_cache(r_params, r_cfg, heads[0], valids[0], capacity=heads[0].shape[1] + extra, segment=0,
                            fuser=fuser, fc=fc, s_params=s_params, s_cfg=s_cfg, s_head=s_head, s_read=s_read, rng=rng,
                            **kw)
    trace = None
    for j in range(k + 1):
        cap = heads[j].shape[1] + (1 + heads[j + 1].shape[1] if j < k else extra)
        if j == 0:
            cur = prompt_cache(r_params, r_cfg, heads[0], valids[0], capacity=cap, segment=0, **kw)
        else:
            cur = prompt_cache(r_params, r_cfg, heads[j], valids[j], capacity=cap, segment=j,
                               next_pos=trace.next_pos, fuser=fuser, fc=fc, s_params=r_params, s_cfg=r_cfg,
                               s_trace=trace, rng=jax.random.fold_in(rng, j), **kw)
        if j < k:  # the agent's last prompt token, read on its (fused) cache: its full context
            cur = forward(r_params, r_cfg, cur, tokens=lasts[j][:, None], segment=j, kind=PROMPT,
                          compute_dtype=resolve_dtype(compute_dtype), return_logits=False, remat=remat).trace
        trace = cur
    return trace


# The receiver's prompts: the same dot library as every prompt jit (``xla_cpu.prompt_dot_options``),
# so closed gates give back exactly the cache ``jit_forward`` builds.
_chain_cache_jits = jit_per_options(chain_cache, lambda args, kwargs: prompt_dot_options(),
                                    static_argnames=("fc", "r_cfg", "s_cfg", "extra", "train", "compute_dtype", "remat"))


def jit_chain_cache(*args, **kwargs) -> KVTrace:
    """``chain_cache`` under ``jax.jit`` (the dot library chosen per call, see above)."""
    return _chain_cache_jits(args, kwargs)(*args, **kwargs)


# --------------------------------------------------------------------------- files
def save_fuser(path, fuser: dict, fc: FuserConfig, meta: Optional[dict] = None) -> Path:
    """fuser.json (shapes, options, metadata) + fuser.safetensors (the flattened tree)."""
    from diffmas_jax.lora import save_tree
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tree(path / "fuser.safetensors", fuser)
    (path / "fuser.json").write_text(json.dumps({"fuser": dataclasses.asdict(fc), "meta": meta or {}}, indent=2))
    return path


def load_fuser(path) -> tuple[dict, FuserConfig, dict]:
    from safetensors.numpy import load_file
    path = Path(path)
    if not (path / "fuser.json").exists() or not (path / "fuser.safetensors").exists():
        raise FileNotFoundError(f"no C2C fuser (fuser.json + fuser.safetensors) in {path}")
    saved = json.loads((path / "fuser.json").read_text())
    fc = FuserConfig(**saved["fuser"]).validate()
    tree: dict = {}
    tensors = load_file(str(path / "fuser.safetensors"))
    for name, arr in tensors.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr)
    want = fuser_shapes(fc)
    have = {name: tuple(arr.shape) for name, arr in tensors.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{n} {have[n]} (fuser.json: {want[n]})" for n in sorted(set(want) & set(have)) if have[n] != want[n]]
    if missing or extra or wrong:
        what = "; ".join(f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                         for label, items in (("missing", missing), ("unexpected", extra), ("shape of", wrong))
                         if items)
        raise FuserConfigError(f"{path}: fuser.safetensors does not match fuser.json: {what}")
    return tree, fc, saved.get("meta", {})


# --------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class C2CSystem:
    """What method 'c2c' runs on: receiver and sharer models (the same object in the
    identical setting) and a trained fuser. Passed to ``methods.run_batch`` as the model."""
    receiver: Any
    sharer: Any
    fuser: dict
    fc: FuserConfig
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return self.sharer is self.receiver

    @property
    def tokenizer(self):
        return self.receiver.tokenizer

    @property
    def cfg(self):
        return self.receiver.cfg


def pair_problem(n_agents: int, identical: bool) -> Optional[str]:
    """Why an agent layout cannot run on this sharer/receiver pair (None: it can)."""
    if n_agents > 1 and not identical:
        return ("C2C between consecutive agents needs sharer = receiver (every agent shares into the next "
                "and receives from the one before); use one agent (roles=solver) for a two-model pair")
    return None


def load_system(receiver, receiver_name: str, sharer_name: Optional[str], fuser_path, dtype="float32") -> C2CSystem:
    """Receiver already loaded; loads the sharer (unless it is the receiver) and the fuser.
    A damaged fuser or sharer, or a fuser built for other models, is one UserError line."""
    from diffmas_jax.cli import UserError, load_model_checked
    fuser, fc, meta = load_fuser_checked(fuser_path)
    same = sharer_name in (None, "", receiver_name)
    sharer = receiver if same else load_model_checked(sharer_name, dtype=dtype)  # damaged files: one line
    try:
        fc.check_models(sharer.cfg, receiver.cfg)
    except FuserConfigError as e:
        raise UserError(f"fuser {fuser_path}: {e}") from None
    return C2CSystem(receiver=receiver, sharer=sharer, fuser=fuser, fc=fc, meta=meta)


def load_fuser_checked(path) -> tuple[dict, FuserConfig, dict]:
    """``load_fuser`` where a damaged fuser.json / fuser.safetensors is one UserError line naming
    the file (DIFFMAS_TRACEBACK=1 shows the original exception)."""
    import os
    from diffmas_jax.cli import UserError
    try:
        return load_fuser(path)
    except (UserError, FileNotFoundError):
        raise
    except FuserConfigError as e:
        if os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        raise UserError(str(e) if str(path) in str(e) else f"fuser {path}: {e}") from None
    except Exception as e:
        if os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        what = "fuser.safetensors" if "safetensors" in repr(type(e)) else "fuser.json"
        raise UserError(f"cannot read fuser {path} ({what}): {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from None


def run_batch(system: C2CSystem, questions: Sequence[str], answer_instruction: str, mc, *, seed=0):
    """Method 'c2c' on a batch (``methods.run_batch`` dispatches here; ``seed`` as there)."""
    from diffmas_jax.c2c_training import encode_prompts
    from diffmas_jax.generation import decode_to_text, row_keys
    from diffmas_jax.methods import BatchResult
    from diffmas_jax.stages import jit_solver_prefill
    agents = mc.agents()
    k = len(agents) - 1
    problem = pair_problem(len(agents), system.identical)
    if problem:
        raise ValueError(problem)
    r, s = system.receiver, system.sharer
    enc = encode_prompts(r.tokenizer, agents, questions, answer_instruction, mc.enable_thinking, mc.prompt_bucket,
                         sharer_tokenizer=None if system.identical else s.tokenizer)
    dtype = resolve_dtype(mc.compute_dtype)
    heads = [jnp.asarray(h) for h in enc.heads]
    valids = [jnp.asarray(v) for v in enc.valids]
    lasts = [jnp.asarray(x) for x in enc.lasts]
    s_head = None if enc.sharer_head is None else jnp.asarray(enc.sharer_head)
    trace = jit_chain_cache(system.fuser, system.fc, r.params, r.cfg, s.params, s.cfg, heads, valids, lasts[:-1],
                            s_head, extra=1 + mc.max_new_tokens, compute_dtype=dtype)
    trace, logits = jit_solver_prefill(r.params, r.cfg, trace, lasts[-1][:, None], jnp.ones((len(questions), 1), bool),
                                       segment=k, compute_dtype=dtype)
    gen = decode_to_text(r.params, r.cfg, r.tokenizer, trace, logits, max_new_tokens=mc.max_new_tokens,
                         sampling=mc.sampling, rng=row_keys(seed, len(questions), stream=k), segment=k,
                         compute_dtype=dtype)
    records = []
    for i in range(len(questions)):
        lens = [int(v[i].sum()) + 1 for v in enc.valids]
        shared = sum(lens[1:]) - k if k else lens[0] - 1   # tokens the sharer read
        records.append(dict(
            prompt_tokens=sum(lens) + shared, generated_tokens=len(gen.tokens[i]), latent_slots=0,
            trace_per_agent={f"{j}:{a.role}": n for j, (a, n) in enumerate(zip(agents, lens))},
            generated_logprobs=gen.logprobs[i], generated_entropy=gen.entropies[i], generated_ids=gen.tokens[i]))
    return BatchResult(texts=gen.texts, records=records)


def resolve_config(cfg: dict) -> None:
    """The c2c part of ``config_utils.resolve`` (in place): fuser path, receiver = model, sharer."""
    from diffmas_jax.agents import LAYOUTS
    from diffmas_jax.cli import UserError
    from diffmas_jax.config_utils import resolve_model
    if cfg["method"] != "c2c":
        if cfg.get("fuser"):
            raise UserError(f"fuser is set but method is {cfg['method']!r}; the fuser is for method 'c2c'")
        return
    if not cfg.get("fuser"):
        raise UserError("method 'c2c' needs a trained fuser: set --config.fuser=DIR "
                        "(python -m diffmas_jax.train --config configs/embedded_c2c_train.py)")
    fuser = Path(cfg["fuser"]).expanduser()
    if not fuser.exists():
        raise UserError(f"fuser {cfg['fuser']} not found")
    if cfg.get("lora"):
        raise UserError("method 'c2c' takes a fuser, not a LoRA adapter; unset lora")
    cfg["fuser"] = str(fuser.resolve())
    cfg["model"] = cfg["receiver"] = resolve_model(cfg.get("receiver") or cfg["model"])
    cfg["sharer"] = resolve_model(cfg.get("sharer") or cfg["model"])
    n_agents = len(cfg["roles"]) if cfg.get("roles") else len(LAYOUTS.get(cfg["layout"], ()))
    problem = pair_problem(n_agents, cfg["sharer"] == cfg["model"])
    if problem:
        raise UserError(problem)
