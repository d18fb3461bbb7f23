"""Orbax checkpoints of the training state (LoRA, optimizer state, step, data position).

What a kill, a full disk or a damaged file can and cannot do to the checkpoint
directory (exercised by ``scripts/reliability_suite.py``):

* Saves are synchronous and atomic: Orbax writes ``<step>.orbax-checkpoint-tmp``
  and renames it. A process killed mid-write leaves only that temporary
  directory, which the next run removes; every ``<step>`` directory is complete.
* Old checkpoints (keep-N is Orbax's ``max_to_keep``) are first renamed into
  ``trash/`` and only then deleted, so a kill during deletion cannot leave a
  half-deleted ``<step>`` directory behind; ``trash/`` is emptied on the next start.
* Every checkpoint records a SHA-256 of the state it holds. On restore, a
  checkpoint that does not load or whose contents do not match is moved to
  ``unreadable/<step>`` (kept for inspection, out of the way of the step that will
  be saved again) and the run falls back to the previous one with a warning.
  A failure that is not the checkpoint's fault leaves every checkpoint in place and
  raises one UserError: a saved tree that differs from the run's (a config change
  that alters the LoRA tree), or a resource or I/O error (out of memory, EIO, EACCES).
* A save that fails (no space left, file too large, permission, I/O error) removes
  its temporary directory and raises :class:`CheckpointWriteError` with one line
  naming the step, the cause and the last checkpoint, which stays intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffmas_jax.cli import UserError, WriteError

TMP_SUFFIX = ".orbax-checkpoint-tmp"
TRASH, UNREADABLE = "trash", "unreadable"
CHECKSUM_KEY = "_state_sha256"

log = logging.getLogger(__name__)


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (disk full, permissions, I/O)."""


def state_digest(state: Any) -> Optional[str]:
    """SHA-256 over the leaves of a pytree in flattening order (dtype, shape and bytes);
    None when some leaf is not fully addressable from this process (multi-host)."""
    leaves = jax.tree_util.tree_leaves(state)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return None
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cause(e: BaseException) -> str:
    """A short, one-line reason for a failed write, errno text first."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    text = " ".join(str(e).split())
    for code, name in ((28, "No space left on device"), (27, "File too large"), (122, "Disk quota exceeded"),
                       (13, "Permission denied"), (30, "Read-only file system"), (5, "Input/output error")):
        if f"os_error_code='{code}'" in text or name in text:
            return f"{name} (errno {code})"
    return f"{type(e).__name__}: {text[:200]}"


class _Quiet(logging.Filter):
    """Swallows Orbax's multi-line error logs while a save runs; we report one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _quiet_orbax_errors():
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    f = _Quiet()
    for lg in loggers:
        lg.addFilter(f)
    handlers = [h for lg in loggers for h in lg.handlers]
    for h in handlers:
        h.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)
        for h in handlers:
            h.removeFilter(f)


class _ThreadStderr:
    """sys.stderr while a save runs: output of background threads is held back, and
    dropped if the save fails. A failed tensorstore write leaves callbacks that later
    print 'Event loop is closed' tracebacks from their threads; the main thread's
    one-line error must not be buried under them."""

    def __init__(self, real):
        self.real, self.held, self.discard = real, [], False
        self.lock = threading.Lock()

    def write(self, text):
        if threading.current_thread() is threading.main_thread():
            return self.real.write(text)
        if not self.discard:
            with self.lock:
                self.held.append(text)
        return len(text)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _drop_failed_io_unraisables() -> None:
    """Keep the failed I/O's coroutines, collected later, from printing "Exception ignored"
    tracebacks after the run's one error line; anything else still reaches the hook
    that was in place (installed once)."""
    prev = sys.unraisablehook
    if getattr(prev, "_diffmas_filter", False):
        return

    def hook(u):
        closed_loop = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        code = getattr(u.object, "cr_code", None)  # a coroutine of Orbax's I/O
        io_coroutine = code is not None and any(k in code.co_filename for k in ("orbax", "asyncio", "tensorstore"))
        if not (closed_loop or io_coroutine):
            prev(u)
    hook._diffmas_filter = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _held_thread_stderr():
    """A :class:`_ThreadStderr` for the block: what it held is written after a success and
    dropped with an error. After an error the guard stays, and the failed I/O's coroutines,
    collected later, report nothing: the run is about to end with one error line."""
    guard = _ThreadStderr(sys.stderr)
    sys.stderr = guard
    try:
        yield guard
    except BaseException:
        guard.discard = True
        guard.held.clear()
        _drop_failed_io_unraisables()
        raise
    if sys.stderr is guard:
        sys.stderr = guard.real
    if guard.held:
        guard.real.write("".join(guard.held))


# Failures that say nothing about a checkpoint's bytes: setting it aside would lose a good one.
_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "out of memory", "Out of memory",
               "Cannot allocate memory", "Input/output error", "Permission denied", "PERMISSION_DENIED",
               "Too many open files",
               "Stale file handle")


def _not_damage(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True  # EIO, EACCES, ETIMEDOUT...: the medium or the mount, not a missing piece
    return any(s in str(e) for s in _NOT_DAMAGE)


def _leaves(tree: Any) -> dict:
    """path ('opt_state/mu/w') -> (shape, dtype) of each array of a state or of its Orbax metadata."""
    def name(k):
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (namedtuple field), SequenceKey
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): (tuple(x.shape), str(np.dtype(x.dtype)))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tree_mismatch(saved: dict, wanted: dict) -> Optional[str]:
    """How a saved tree differs from the expected one, in one line; None if it does not."""
    def first(keys, fmt):
        return fmt(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
    differ = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    parts = [first(differ, lambda k: f"{k} saved {saved[k][0]} {saved[k][1]}, expected {wanted[k][0]} "
                                     f"{wanted[k][1]}")] if differ else []
    for keys, what in ((sorted(wanted.keys() - saved.keys()), "expected but not saved"),
                       (sorted(saved.keys() - wanted.keys()), "saved but not expected")):
        if keys:
            parts.append(first(keys, lambda k: f"{k} {what}"))
    return "; ".join(parts) or None


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False, todelete_subdir=TRASH))

    # ------------------------------------------------------------------ housekeeping
    def _sweep(self) -> None:
        """Remove what interrupted runs left: unfinished saves and half-deleted old steps."""
        for p in self.directory.iterdir():
            if TMP_SUFFIX in p.name:
                log.info("removing unfinished checkpoint %s", p)
                _rmtree(p)
        _rmtree(self.directory / TRASH)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    # -------------------------------------------------------------------------- save
    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write checkpoint `step` atomically; raise CheckpointWriteError if it cannot be written."""
        digest = state_digest(state)
        meta = {**meta, **({CHECKSUM_KEY: digest} if digest else {})}
        with _held_thread_stderr():
            try:
                with _quiet_orbax_errors():
                    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                    meta=ocp.args.JsonSave(meta)), force=True)
                    self.manager.wait_until_finished()
            except Exception as e:  # disk full, EFBIG, EACCES, EIO ...: the previous checkpoint is untouched
                for p in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
                    _rmtree(p)
                try:
                    self.manager.reload()
                    prev = [s for s in self.manager.all_steps() if s != step]
                except Exception:
                    prev = []
                last = f"last checkpoint: step {max(prev)}, intact" if prev else "no earlier checkpoint"
                raise CheckpointWriteError(f"cannot write checkpoint step {step} in {self.directory}: "
                                           f"{_cause(e)}; {last}; free space and rerun to resume") from None
        _rmtree(self.directory / TRASH)

    # ----------------------------------------------------------------------- restore
    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest checkpoint that restores intact, or None.

        A damaged checkpoint (does not load, or its checksum does not match) is moved to
        ``unreadable/`` with a warning, and the previous one is tried. A saved tree that
        differs from ``abstract_state``, or a resource or I/O error, would fail alike for
        every checkpoint: UserError, and nothing is moved.
        """
        # held like a save's: failed reads leave threads that print 'Event loop is closed'
        with _held_thread_stderr() as guard:
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    with _quiet_orbax_errors():
                        out = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                    meta = dict(out["meta"])
                    want = meta.pop(CHECKSUM_KEY, None)
                    got = state_digest(out["state"]) if want is not None else None
                    if got is not None and got != want:
                        raise ValueError("contents do not match the checksum written with it")
                    return step, out["state"], meta
                except Exception as e:
                    self._raise_unless_damaged(step, e, abstract_state)
                    guard.discard = True  # the damaged read's threads print on, during later reads too
                    guard.held.clear()
                    moved = self._set_aside(step)
                    reason = " ".join(str(e).split())[:200]
                    print(f"warning: checkpoint step {step} in {self.directory} does not restore "
                          f"({type(e).__name__}: {reason}); moved to {moved}; falling back to an older one",
                          file=sys.stderr, flush=True)
        return None

    def _raise_unless_damaged(self, step: int, e: Exception, abstract_state: Any) -> None:
        """UserError when a failed restore is not damage of checkpoint ``step`` itself."""
        where = f"checkpoint step {step} in {self.directory}"
        if _not_damage(e):
            raise UserError(f"cannot restore {where}: {_cause(e)}; no checkpoint was moved; "
                            "rerun once that is resolved") from None
        try:  # its own record of what it holds, read apart from the arrays
            with _quiet_orbax_errors():
                md = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            diff = _tree_mismatch(_leaves(getattr(md, "tree", md)), _leaves(abstract_state))
        except Exception:
            diff = None  # no readable record: damaged
        if diff:
            raise UserError(f"{where} holds another state than this run builds ({diff}): the config changed "
                            "what is trained; rerun with the config it was saved with or use a new --workdir; "
                            "no checkpoint was moved") from None

    def _set_aside(self, step: int) -> Path:
        src = self.directory / str(step)
        dst_dir = self.directory / UNREADABLE
        dst_dir.mkdir(exist_ok=True)
        dst = dst_dir / str(step)
        if dst.exists():
            dst = dst_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.replace(src, dst)
        except OSError:
            _rmtree(src)
            dst = Path("(deleted)")
        self.manager.reload()
        return dst

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """Restore targets shaped like ``tree``. A jax array's sharding comes along, so a
    checkpoint saved on one mesh restores straight into the shards of the current one
    (another shape, another device count) instead of the layout it was saved with."""
    def one(x):
        if not hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                    if isinstance(x, jax.Array) else None)
    return jax.tree.map(one, tree)
