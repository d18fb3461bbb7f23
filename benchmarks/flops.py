"""The model FLOPs a DiffMAS LoRA train step needs: one count for the CPU and GPU benchmarks.

A frozen backbone needs no weight gradients, so a back-propagated token costs its forward
once more (input gradients), not twice; attention's score and value matmuls are counted
over the context each token sees; recomputation (remat, attention scores recomputed in the
backward) is an implementation's choice and is not counted."""
from __future__ import annotations

FORMULA = ("model FLOPs a frozen-backbone LoRA step needs: linear layers 2N per token forward and 2N more "
           "per back-propagated token (input gradients only; N = q,k,v,o,gate,up,down of every layer, LoRA "
           "and norms ignored); attention 4 x L x q_size x (context seen) per token forward, twice that in "
           "the backward; the tied LM head on target tokens only, 2DV forward + 2DV backward. Not counted: "
           "weight gradients of the frozen backbone and any recomputation.")

IMPLEMENTATION = ("the FLOPs of every matmul the jitted step runs (2 x output size x contracted size per "
                  "dot_general in its jaxpr, scan bodies once per iteration): the model FLOPs plus what this "
                  "implementation adds, i.e. the attention scores recomputed in the backward, the masked "
                  "halves of causal attention blocks, one-token attention's block-diagonal query matmuls "
                  "and LoRA's rank-r products.")


def linear_params(cfg) -> int:
    """N: the parameters of every layer's q, k, v, o, gate, up and down projections."""
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return n_layers * (d * cfg.q_size + 2 * d * cfg.kv_size + cfg.q_size * d + 3 * d * f)


def step_flops(cfg, b: int, chunks, n_tgt: int, grad_from: int) -> float:
    """``chunks``: token counts appended in order to one causal trace; chunks with index
    >= ``grad_from`` are back-propagated (trace_grad="full": 0; "stop": the solver's only)."""
    n_lin = linear_params(cfg)
    flops, ctx = 0.0, 0
    for i, t in enumerate(chunks):
        grad = i >= grad_from
        attn = 4 * cfg.num_layers * cfg.q_size * sum(ctx + j + 1 for j in range(t))
        flops += (2 if grad else 1) * b * 2 * n_lin * t + (3 if grad else 1) * b * attn
        ctx += t
    return flops + 2 * 2 * cfg.hidden_size * cfg.vocab_size * b * n_tgt


def conventional_6n(cfg, b: int, k: int, t_up: int, m: int, t_sol: int, n_tgt: int, mode: str) -> float:
    """The conventional count (6N per trained token, 2N per forward-only token, no attention),
    kept in the JSON for comparison with earlier runs: it counts weight gradients a frozen
    backbone never computes."""
    n_lin = linear_params(cfg)
    up = (6 if mode == "full" else 2) * n_lin * b * k * (t_up + m)
    return up + 6 * n_lin * b * t_sol + 6 * cfg.hidden_size * cfg.vocab_size * b * n_tgt


def dot_flops(fn, *args, **kwargs) -> float:
    """The FLOPs of every matmul ``fn`` runs (2 x output size x contracted size per
    ``dot_general``), read from its jaxpr: what the implementation multiplies, recomputation,
    masked attention blocks and LoRA included. Scan bodies count once per iteration, ``cond``
    its costliest branch. ``args`` may be ``jax.ShapeDtypeStruct``s: nothing is compiled or run."""
    import jax
    return _jaxpr_dot_flops(jax.jit(fn).trace(*args, **kwargs).jaxpr.jaxpr)


def _jaxpr_dot_flops(jaxpr) -> float:
    import math

    from jax.extend import core
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "while":
            raise ValueError("a while loop's trip count is not known from its jaxpr; use scan")
        elif name == "cond":
            total += max(_jaxpr_dot_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(_jaxpr_dot_flops(getattr(v, "jaxpr", v)) for v in eqn.params.values()
                        if isinstance(v, (core.Jaxpr, core.ClosedJaxpr)))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total
