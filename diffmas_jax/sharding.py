"""Mesh sharding: the one place that maps logical axis names to mesh axes.

Parameters carry logical axis names (``model.transformer.param_axes``); the KV
trace and activations use the names below. ``LOGICAL_RULES`` maps each name to
a mesh axis (or None: replicated). A dimension that the mesh axis does not
divide stays replicated rather than failing, so one rule set serves every model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, Optional[object]] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "slots": None,
    "head_dim": None,
}

TRACE_AXES = {"k": ("layers", "batch", "slots", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "slots", "kv_heads", "head_dim"),
              "valid": ("batch", "slots"), "segment": ("batch", "slots"), "kind": ("batch", "slots"),
              "pos": ("batch", "slots"), "next_pos": ("batch",)}


class MeshError(ValueError):
    """A mesh that does not fit the devices."""


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 for 'the rest of the devices'."""
    # Default devices host by host (stable: one host's order is kept), so on a pod the batch
    # axes give each host a contiguous block of rows (distributed.batch_split_error).
    devices = list(devices if devices is not None else sorted(jax.devices(), key=lambda d: d.process_index))
    n = len(devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise MeshError(f"at most one mesh entry may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or n % known:
        raise MeshError(f"mesh {tuple(shape)} does not divide the {n} available devices")
    shape = [n // known if s == -1 else s for s in shape]
    if math.prod(shape) != n:
        raise MeshError(f"mesh {tuple(shape)} uses {math.prod(shape)} devices but {n} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=None,
             units: Optional[dict] = None) -> P:
    """PartitionSpec for a tensor with logical ``axes``; undividable dims stay replicated.

    ``units`` (logical name -> count, see ``head_units``) splits such a dimension only in
    whole units: the q/k/v/o columns are heads x head_dim wide, and a shard boundary
    inside a head would split attention's per-head work across devices."""
    rules = LOGICAL_RULES if rules is None else rules
    units = units or {}
    used, out = set(), []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        if not names or dim % size or units.get(name, dim) % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def head_units(cfg) -> dict:
    """``spec_for`` units of a model's parameters: the tensor axis splits q/o by query
    heads and k/v by KV heads (the trace's kv_heads axis is the head count already)."""
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}


@functools.lru_cache(maxsize=16)
def _param_shardings_cached(cfg, mesh: Mesh) -> dict:
    return param_shardings(cfg, mesh)


def param_shardings(cfg, mesh: Mesh, rules=None) -> dict:
    """NamedSharding for every parameter, as a pytree matching the params."""
    from diffmas_jax.model.transformer import _is_leaf, param_shapes
    units = head_units(cfg)
    return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s[1], s[0], mesh, rules, units)),
                        param_shapes(cfg), is_leaf=_is_leaf)


def param_placer(cfg, mesh: Mesh, rules=None):
    """``place(path, host_array)`` for ``load_model``: each tensor goes straight into its shards."""
    from diffmas_jax.model.weights import expected_param_paths
    shapes = expected_param_paths(cfg)
    from diffmas_jax.model.transformer import param_axes
    axes = {".".join(k.key for k in p): a for p, a in
            jax.tree_util.tree_flatten_with_path(param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]}
    units = head_units(cfg)

    def place(path, arr):
        sharding = NamedSharding(mesh, spec_for(axes[path], shapes[path], mesh, rules, units))
        # make_array_from_callback hands each device only its slice of the host array.
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return place


def shard_trace(trace, mesh: Mesh, rules=None):
    """Put a KVTrace's buffers on the mesh (batch over data/fsdp, kv heads over tensor)."""
    upd = {name: jax.device_put(getattr(trace, name),
                                NamedSharding(mesh, spec_for(axes, getattr(trace, name).shape, mesh, rules)))
           for name, axes in TRACE_AXES.items()}
    return trace.replace(**upd)


def replicate(tree, mesh: Mesh):
    """Every leaf replicated on the mesh (LoRA and its optimizer state: small, read by every shard)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


_ACTIVE_MESH: list = [None]


def set_active_mesh(mesh: Optional[Mesh]) -> Optional[Mesh]:
    """Make ``mesh`` the one every forward pins its output trace to; returns the previous one.

    The CLIs call this once with the config's mesh. Every jitted stage, prefill and
    decode step then returns the trace with the same explicit sharding (batch over
    data x fsdp, kv heads over tensor) instead of whatever XLA propagated, so the next
    stage's input sharding is known and stable."""
    prev, _ACTIVE_MESH[0] = _ACTIVE_MESH[0], mesh
    return prev


@contextlib.contextmanager
def active_mesh(mesh: Optional[Mesh]):
    prev = set_active_mesh(mesh)
    try:
        yield mesh
    finally:
        set_active_mesh(prev)


def current_mesh() -> Optional[Mesh]:
    """The mesh set by ``active_mesh`` / ``set_active_mesh``, or None."""
    return _ACTIVE_MESH[0]


def constrain_trace(trace, rules=None):
    """Inside jit: pin the trace's buffers to the active mesh's sharding (no-op without one)."""
    mesh = _ACTIVE_MESH[0]
    if mesh is None:
        return trace
    upd = {name: jax.lax.with_sharding_constraint(
               getattr(trace, name), NamedSharding(mesh, spec_for(axes, getattr(trace, name).shape, mesh, rules)))
           for name, axes in TRACE_AXES.items()}
    return trace.replace(**upd)


def bytes_per_device(tree) -> int:
    """Largest number of bytes any one device holds for ``tree``."""
    per: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values()) if per else 0


# ----------------------------------------------------------- explicit input shardings
# How each argument of a jitted entry point (forward, the stages, prefill, decode, the
# train step) is laid out on a mesh, by the argument's name: the one table for inputs.
REPLICATED_ARGS = ("lora", "opt_state", "realign", "visible", "dropout", "rng")
BATCH_ARGS = ("batch", "tokens", "valid", "target_mask", "embeds", "seed_hidden", "active")


def trace_shardings(trace, mesh: Mesh, rules=None):
    """The KVTrace (same structure) with a NamedSharding per buffer."""
    return trace.replace(**{name: NamedSharding(mesh, spec_for(axes, getattr(trace, name).shape, mesh, rules))
                            for name, axes in TRACE_AXES.items()})


def _batch_leading(x, mesh: Mesh, rules=None) -> NamedSharding:
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, spec_for(("batch",), shape[:1], mesh, rules) if shape else P())


def input_shardings(name: str, value, mesh: Mesh, cfg=None, rules=None):
    """The sharding pytree (a prefix of ``value``) that argument ``name`` gets on ``mesh``."""
    rep = NamedSharding(mesh, P())
    if name == "params":
        if cfg is None:
            raise ValueError("params need the model config to find their logical axes")
        # params may hold fewer entries than the full layout (e.g. no lm_head when tied);
        # the layout is built once per (model, mesh): this runs on every call on a mesh
        full = _param_shardings_cached(cfg, mesh) if rules is None else param_shardings(cfg, mesh, rules)
        return _prune(full, value)
    if name == "trace":
        return trace_shardings(value, mesh, rules)
    if name == "state":  # a DecodeState: its trace, then per-row buffers over the batch
        inner = trace_shardings(value.trace, mesh, rules)
        rest = jax.tree.map(lambda x: _batch_leading(x, mesh, rules), dataclasses.replace(value, trace=None))
        return dataclasses.replace(rest, trace=inner)
    if name in BATCH_ARGS:
        return jax.tree.map(lambda x: _batch_leading(x, mesh, rules), value)
    return rep  # REPLICATED_ARGS, scalars, and anything small the table does not name


def _prune(full, like):
    """``full`` restricted to the dict keys present in ``like``."""
    if isinstance(like, dict):
        return {k: _prune(full[k], v) for k, v in like.items()}
    return full


def jit_per_options(fn, options: Callable[[tuple, dict], dict], **jit_kwargs):
    """``pick(args, kwargs)`` -> ``jax.jit(fn, **jit_kwargs)`` compiled with the XLA options
    ``options(args, kwargs)`` gives for that call, one jit per distinct set (``pick.jits``:
    sorted option items -> the jits calls used; ``pick.plain``: the one without options). A
    call traced inside another jit or transformation gets ``pick.plain``: a nested jit may
    not take options (it compiles with the outer one)."""
    plain = jax.jit(fn, **jit_kwargs)
    jits: dict = {}

    def pick(args, kwargs):
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        opts = () if nested else tuple(sorted(options(args, kwargs).items()))
        if opts not in jits:
            jits[opts] = jax.jit(fn, **jit_kwargs, compiler_options=dict(opts)) if opts else plain
        return jits[opts]
    pick.jits, pick.plain = jits, plain
    return pick


def mesh_jit(fn, *, static_argnames: Sequence[str] = (), donate_argnames: Sequence[str] = (), mesh=None,
             out_shardings=None, compiler_options: Optional[Callable[[dict], dict]] = None):
    """``jax.jit(fn)``; on a mesh, compiled with explicit ``in_shardings``.

    The mesh is ``mesh`` or, if None, the active one (``set_active_mesh``) at call time;
    with neither this is the plain jit. On a mesh the call binds its arguments by name,
    gives each dynamic one the layout ``input_shardings`` names for it, puts it there
    (a no-op for arrays already placed so, e.g. by ``param_placer``) and runs a jit
    compiled with exactly those input shardings; one such jit per (mesh, static
    arguments, layouts), so the shapes a run uses compile once each. ``out_shardings``
    (on a mesh only) fixes the outputs' layout; otherwise the trace a forward returns is
    pinned by ``constrain_trace`` and the rest follows XLA's propagation.
    ``compiler_options(arguments)`` (the call's arguments by name) gives XLA options for the
    call's compilation (e.g. ``xla_cpu.ynn_dot_options``); each distinct set gets its own jit."""
    static_argnames, donate_argnames = tuple(static_argnames), tuple(donate_argnames)
    signature = inspect.signature(fn)
    compiled: dict = {}

    def options(args, kwargs) -> dict:
        if compiler_options is None:
            return {}
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return compiler_options(bound.arguments)

    plain_jit = jit_per_options(fn, options, static_argnames=static_argnames or None,
                                donate_argnames=donate_argnames or None)
    plain = plain_jit.plain

    def prepare(m, args, kwargs):
        """(the jit for this call, its arguments placed in their shardings)."""
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in static_argnames}
        names = tuple(k for k in bound.arguments if k not in static_argnames)
        values = [bound.arguments[k] for k in names]
        shardings = [input_shardings(n, v, m, static.get("cfg")) for n, v in zip(names, values)]
        leaves, treedef = jax.tree.flatten(shardings)
        opts = tuple(sorted(options(args, kwargs).items()))
        key = (m, tuple(static.items()), names, tuple(leaves), treedef, opts)
        f = compiled.get(key)
        if f is None:
            def positional(*dynamic):
                return fn(**dict(zip(names, dynamic)), **static)
            extra = {} if out_shardings is None else {"out_shardings": out_shardings}
            if opts:
                extra["compiler_options"] = dict(opts)
            f = compiled[key] = jax.jit(positional, in_shardings=tuple(shardings), **extra,
                                        donate_argnums=tuple(i for i, n in enumerate(names) if n in donate_argnames))
        return f, jax.device_put(values, shardings)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        m = mesh if mesh is not None else _ACTIVE_MESH[0]
        if m is None:
            return plain_jit(args, kwargs)(*args, **kwargs)
        f, placed = prepare(m, args, kwargs)
        return f(*placed)

    def lower(*args, **kwargs):
        """Like ``jax.jit(...).lower``: ``.compile().input_shardings`` shows the layouts."""
        m = mesh if mesh is not None else _ACTIVE_MESH[0]
        if m is None:
            return plain_jit(args, kwargs).lower(*args, **kwargs)
        f, placed = prepare(m, args, kwargs)
        return f.lower(*placed)

    call.lower = lower
    call.plain = plain
    call.with_options = plain_jit.jits  # plain-path jits by compiler options; for tests
    call.compiled = compiled  # (mesh, static, names, layouts) -> jit; for tests and inspection
    return call
