"""Orbax checkpoints of the training state (LoRA, optimizer state, step, data position).

Saves are synchronous and atomic (Orbax writes to a temporary directory and
renames it), keep-N is Orbax's ``max_to_keep``. A latest checkpoint that does not
restore makes the run fall back to the previous one with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest checkpoint that restores, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return step, out["state"], dict(out["meta"])
            except Exception as e:  # corrupted or partial: fall back to an older one
                logging.warning("checkpoint %d in %s does not restore (%s: %s); trying an older one",
                                step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        return None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.close()


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
