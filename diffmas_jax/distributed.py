"""Multi-host runs: initialisation on a pod, who logs, and which host loads which data.

On a TPU pod slice (or a multi-node GPU job) every host runs the same program.
``maybe_initialize()`` connects them with ``jax.distributed.initialize()`` before any
other JAX call; on a single host it does nothing. Whether to initialise is read from
the environment:

  DIFFMAS_DISTRIBUTED=1 / 0   force it on / off
  TPU_WORKER_HOSTNAMES        set by TPU VMs; more than one name means a multi-host slice
  JAX_COORDINATOR_ADDRESS     with JAX_NUM_PROCESSES and JAX_PROCESS_ID (GPU clusters,
                              or any launcher that sets them); passed on explicitly. A set
                              address always initialises (unless JAX_NUM_PROCESSES=1); a
                              missing or malformed companion variable is a one-line error
  SLURM_NTASKS > 1            Slurm jobs (JAX reads the rest from Slurm itself)

Only process 0 logs and writes summaries (``is_main_process``); Orbax checkpoints
are saved by every process (Orbax coordinates them). Each host loads only its share
of a global batch (``local_indices``) and ``global_batch`` assembles the global array
from the per-host pieces.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from diffmas_jax.cli import UserError

_STATE = {"initialized": False}
_SCRATCH: dict = {}


def should_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is one of several hosts that must be connected."""
    env = os.environ if env is None else env
    flag = env.get("DIFFMAS_DISTRIBUTED", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # A coordinator means a multi-host launch: initialise (initialize_kwargs reports a
        # missing or malformed JAX_NUM_PROCESSES) rather than let each host train alone.
        return env.get("JAX_NUM_PROCESSES", "").strip() != "1"
    try:
        return int(env.get("SLURM_NTASKS", "1") or 1) > 1
    except ValueError:
        return False


def initialize_kwargs(env: Optional[Mapping[str, str]] = None) -> dict:
    """Explicit arguments for jax.distributed.initialize from JAX_* variables (empty: auto-detect)."""
    env = os.environ if env is None else env
    kw: dict = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kw["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if env.get(name, "").strip() == "":
                raise UserError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not; set both "
                                "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither variable)")
            kw[key] = _env_int(env, name)
        if kw["num_processes"] < 1:
            raise UserError(f"JAX_NUM_PROCESSES must be at least 1, got {kw['num_processes']}")
        if not 0 <= kw["process_id"] < kw["num_processes"]:
            raise UserError(f"JAX_PROCESS_ID={kw['process_id']} is not in 0..{kw['num_processes'] - 1} "
                            f"(JAX_NUM_PROCESSES={kw['num_processes']})")
        if env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
            try:
                kw["local_device_ids"] = [int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(",") if x.strip()]
            except ValueError:
                raise UserError("JAX_LOCAL_DEVICE_IDS must be comma-separated integers, got "
                                f"{env['JAX_LOCAL_DEVICE_IDS']!r}") from None
    return kw


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name} must be an integer, got {env[name]!r}") from None


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Call ``jax.distributed.initialize()`` once when running on several hosts.

    Returns True when the process is (now) part of a multi-process run. Must run
    before anything touches a JAX device."""
    if _STATE["initialized"]:
        return True
    if not should_initialize(env):
        return False
    import jax
    if jax.distributed.is_initialized():
        _STATE["initialized"] = True
        return True
    kw = initialize_kwargs(env)
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:
        raise UserError(f"jax.distributed.initialize failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); set DIFFMAS_DISTRIBUTED=0 "
                        "to run on this host alone") from None
    _STATE["initialized"] = True
    return True


def process_index() -> int:
    if not _multi():
        return 0
    import jax
    return jax.process_index()


def process_count() -> int:
    if not _multi():
        return 1
    import jax
    return jax.process_count()


def _multi() -> bool:
    """Part of a multi-process run? (Never initialises a backend to find out.)"""
    if _STATE["initialized"]:
        return True
    try:
        import jax
        return bool(jax.distributed.is_initialized())
    except Exception:
        return False


def is_main_process() -> bool:
    """True on process 0 (and on every single-host run)."""
    return process_index() == 0 if _multi() else True


def output_dir(workdir) -> Path:
    """Where this process writes logs and summaries: the workdir on process 0; on the
    other processes a private scratch directory, so only process 0 writes the workdir
    (checkpoints are the exception: every process saves its shards with Orbax)."""
    if is_main_process():
        return Path(workdir)
    key = str(Path(workdir).absolute())
    if key not in _SCRATCH:
        _SCRATCH[key] = Path(tempfile.mkdtemp(prefix=f"diffmas_process{process_index()}_"))
    return _SCRATCH[key]


# ----------------------------------------------------------------------- data
def local_indices(indices: Sequence[int], index: Optional[int] = None, count: Optional[int] = None) -> np.ndarray:
    """This host's contiguous share of a global batch's row indices.

    Host p of P gets rows [p*B/P, (p+1)*B/P); the global batch size B must divide by P."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    idx = np.asarray(indices)
    if len(idx) % count:
        raise UserError(f"global batch of {len(idx)} rows does not split over {count} hosts; "
                        f"use a batch_size divisible by {count}")
    per = len(idx) // count
    return idx[index * per:(index + 1) * per]


def host_shard(seq: Sequence[Any], index: Optional[int] = None, count: Optional[int] = None) -> list:
    """Every ``count``-th element starting at ``index``: a host's share of a list of items."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return list(seq)[index::count]


def batch_split_error(rows: int, mesh, batch_axes=("data", "fsdp"), count: Optional[int] = None) -> Optional[str]:
    """Why a global batch of ``rows`` cannot be loaded host by host on ``mesh`` (None: it can).

    Each host loads only its rows (``local_indices``: host p gets rows [pB/P, (p+1)B/P)),
    so the mesh's batch axes must put exactly those rows on host p's devices. Anything
    else (no batch axis > 1, rows the axes do not divide) would be a replicated batch
    holding different rows on each host: the hosts would silently train apart."""
    count = process_count() if count is None else count
    if count == 1:
        return None
    if mesh is None:
        return "a multi-host run needs a device mesh (--config.mesh_preset or --config.mesh)"
    if rows % count:
        return (f"batch_size={rows} does not split over {count} hosts; use a batch_size divisible by {count} "
                "(grad_accum keeps the effective batch)")
    axes = [a for a in batch_axes if mesh.shape[a] > 1]
    split = math.prod(mesh.shape[a] for a in axes)
    sizes = "x".join(str(v) for v in mesh.shape.values())
    if split == 1:
        return (f"mesh {sizes} has no batch axis (data x fsdp) > 1, so the {count} hosts cannot each hold their "
                f"own rows; use a mesh whose data x fsdp is a multiple of {count}")
    if split % count:
        return (f"mesh {sizes}: its batch axes (data x fsdp = {split}) do not split rows over {count} hosts; "
                f"use a mesh whose data x fsdp is a multiple of {count}")
    if rows % split:
        return (f"on {count} hosts batch_size must be a multiple of the mesh's batch axes "
                f"(data x fsdp = {split}); got batch_size={rows}")
    # Row block of each device (row-major over the batch axes, as P(("data", "fsdp")) lays it out).
    names, grid, block = list(mesh.shape), np.indices(np.shape(mesh.devices)), 0
    for a in axes:
        block = block * mesh.shape[a] + grid[names.index(a)]
    owner = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    if not (owner == block // (split // count)).all():
        return (f"mesh {sizes}: the devices are not grouped by host along the batch axes, so host p would not "
                "hold its contiguous rows; order the devices host by host")
    return None


@functools.lru_cache(maxsize=8)
def _batch_split_error_cached(rows: int, mesh, batch_axes: tuple) -> Optional[str]:
    """``batch_split_error`` once per (rows, mesh): every leaf of every step's batch asks."""
    return batch_split_error(rows, mesh, batch_axes)


def check_batch_layout(batch_size: int, mesh) -> None:
    """At start-up, before the model loads: a UserError if ``batch_size`` rows cannot be
    split over this run's hosts on ``mesh`` (a no-op on one host)."""
    msg = batch_split_error(int(batch_size), mesh)
    if msg:
        raise UserError(msg)


def global_batch(local: Any, mesh=None, batch_axes=("data", "fsdp")):
    """A global batch from this host's rows (a pytree of [rows, ...] host arrays).

    Without a mesh on a single host: the arrays as jax arrays. With a mesh: arrays
    whose leading (batch) axis is sharded over ``batch_axes`` (``jax.make_array_from_
    process_local_data``: each host supplies its own rows, no host holds the rest).
    On several hosts the batch axes must split the rows over the hosts
    (``batch_split_error``); on one host rows they do not divide are replicated."""
    import jax
    import jax.numpy as jnp
    if mesh is None:
        if process_count() > 1:
            raise UserError("a multi-host run needs a device mesh (--config.mesh_preset or --config.mesh)")
        return jax.tree.map(jnp.asarray, local)
    from jax.sharding import NamedSharding, PartitionSpec as P
    axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)

    def put(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * process_count()
        msg = _batch_split_error_cached(global_rows, mesh, tuple(batch_axes))
        if msg:
            raise UserError(msg)
        split = math.prod(mesh.shape[a] for a in axes)
        spec = P(axes if len(axes) > 1 else (axes[0] if axes else None)) if global_rows % split == 0 else P()
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(put, local)


# -------------------------------------------------------------- coordination
def to_host(x) -> np.ndarray:
    """A jax array as one numpy array on every host.

    On a pod a batch-sharded result (generated tokens, the trace's metadata) has rows
    on other hosts' devices, which ``np.asarray`` cannot read; those are gathered."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_from_main(obj: Any) -> Any:
    """A JSON-able object as process 0 has it, on every process (identity on one host).

    Used where hosts must agree on a decision taken from files only process 0 reads
    (which items are already done when resuming)."""
    if process_count() == 1:
        return obj
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buf = np.zeros(n, np.uint8)
    if is_main_process():
        buf[:] = data
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(out.astype(np.uint8).tobytes().decode("utf-8"))


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op on one host)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
