"""The KV trace: the shared, append-only memory that agents communicate through.

Every agent's prompt, latent thoughts and generated tokens land here as KV slots.
Buffers are preallocated with a static capacity so jitted shapes never change;
``length`` (slots allocated so far, common to all rows) is *static* pytree
metadata, so running out of room is a Python error raised while tracing, before
any compute. Each slot remembers whether it is real (``valid``), which agent
wrote it (``segment``), what kind of slot it is and its rope position, so
attention can never see padding, another row, or a hidden segment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from diffmas_jax.model.config import ModelConfig

# Slot kinds, used by visibility rules (e.g. latent-only communication).
EMPTY, PROMPT, LATENT, TEXT = 0, 1, 2, 3


class TraceOverflowError(ValueError):
    """Appending would exceed the trace's static capacity."""


@struct.dataclass
class KVTrace:
    k: jax.Array          # [layers, batch, capacity, kv_heads, head_dim]
    v: jax.Array          # [layers, batch, capacity, kv_heads, head_dim]
    valid: jax.Array      # [batch, capacity] bool: slot holds a real token of this row
    segment: jax.Array    # [batch, capacity] int32: agent id that wrote the slot, -1 if empty
    kind: jax.Array       # [batch, capacity] int8: EMPTY / PROMPT / LATENT / TEXT
    pos: jax.Array        # [batch, capacity] int32: rope position of the slot
    next_pos: jax.Array   # [batch] int32: position the row's next real token gets
    length: int = struct.field(pytree_node=False, default=0)  # slots allocated (static)

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVTrace":
        if capacity <= 0:
            raise ValueError(f"trace capacity must be positive, got {capacity}")
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, capacity), bool),
            segment=jnp.full((batch, capacity), -1, jnp.int32),
            kind=jnp.zeros((batch, capacity), jnp.int8),
            pos=jnp.zeros((batch, capacity), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32), length=0)

    @property
    def capacity(self) -> int:
        return self.v[0].shape[2] if isinstance(self.v, tuple) else self.v.shape[2]

    @property
    def batch(self) -> int:
        return self.v[0].shape[0] if isinstance(self.v, tuple) else self.v.shape[1]

    def per_layer(self) -> "KVTrace":
        """K/V as tuples of per-layer, head-major arrays (decode loops): K transposed to
        [batch, kv_heads, head_dim, capacity], V as [batch, kv_heads, capacity, head_dim].

        ``forward`` reads and updates them in place without slicing a stack, and one-token
        attention over them is a matrix-vector product per row and head, which XLA:CPU runs
        as a streaming GEMV rather than a small GEMM (``_head_major_one_token_attention``)."""
        if isinstance(self.k, tuple):
            return self
        return self.replace(k=tuple(jnp.transpose(k, (0, 2, 3, 1)) for k in self.k),
                            v=tuple(jnp.transpose(v, (0, 2, 1, 3)) for v in self.v))

    def stacked(self) -> "KVTrace":
        """The inverse of :meth:`per_layer`: [layers, batch, capacity, kv_heads, head_dim] stacks."""
        if not isinstance(self.k, tuple):
            return self
        return self.replace(k=jnp.stack([jnp.transpose(k, (0, 3, 1, 2)) for k in self.k]),
                            v=jnp.stack([jnp.transpose(v, (0, 2, 1, 3)) for v in self.v]))

    def check_room(self, n: int, what: str = "append") -> None:
        if self.length + n > self.capacity:
            raise TraceOverflowError(
                f"KV trace overflow: {what} needs {n} slots but only "
                f"{self.capacity - self.length} of {self.capacity} are free "
                f"(raise the trace capacity)")

    def reserve(self, n: int, what: str = "reserve") -> "KVTrace":
        """Allocate ``n`` slots (still invalid) for a loop that writes at traced offsets."""
        self.check_room(n, what)
        return self.replace(length=self.length + n)

    def append(self, other: "KVTrace") -> "KVTrace":
        """``other``'s first ``other.length`` slots (K/V and metadata) appended after this
        trace's; the row positions continue from ``other.next_pos``."""
        n, at = other.length, self.length
        self.check_room(n, f"appending {n} slots")
        other = other.stacked()
        upd = jax.lax.dynamic_update_slice
        put_kv = lambda a, b: upd(a, b[:, :, :n].astype(a.dtype), (0, 0, at, 0, 0))
        put = lambda a, b: upd(a, b[:, :n], (0, at))
        return self.replace(k=put_kv(self.k, other.k), v=put_kv(self.v, other.v),
                            valid=put(self.valid, other.valid), segment=put(self.segment, other.segment),
                            kind=put(self.kind, other.kind), pos=put(self.pos, other.pos),
                            next_pos=other.next_pos, length=at + n)

    def num_valid(self) -> jax.Array:
        return self.valid.sum(-1)

    def segment_mask(self, segments) -> jax.Array:
        """[batch, capacity] mask of valid slots written by any of ``segments``."""
        m = jnp.zeros_like(self.valid)
        for s in segments:
            m = m | (self.segment == s)
        return m & self.valid

    def write_meta(self, offset, valid, segment, kind, pos, next_pos) -> "KVTrace":
        """Record slot metadata for a chunk written at ``offset`` (static or traced)."""
        b, t = valid.shape
        seg = jnp.where(valid, jnp.asarray(segment, jnp.int32), -1)
        kd = jnp.where(valid, jnp.asarray(kind, jnp.int8), EMPTY).astype(jnp.int8)
        upd = jax.lax.dynamic_update_slice
        return self.replace(
            valid=upd(self.valid, valid, (0, offset)),
            segment=upd(self.segment, jnp.broadcast_to(seg, (b, t)), (0, offset)),
            kind=upd(self.kind, jnp.broadcast_to(kd, (b, t)), (0, offset)),
            pos=upd(self.pos, pos.astype(jnp.int32), (0, offset)),
            next_pos=next_pos)
