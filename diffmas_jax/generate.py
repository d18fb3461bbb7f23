"""Chat completion from the command line.

    python -m diffmas_jax.generate --prompt "What is 2+2?"            # embedded SmolLM2
    python -m diffmas_jax.generate --model Qwen/Qwen3-0.6B --prompt "..." --temperature 0.6
"""
from __future__ import annotations

import argparse
import math
import time

from diffmas_jax.cli import UserError, enable_compilation_cache, run_cli


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m diffmas_jax.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="local HF dir, .gguf file, Hub id, or 'embedded'")
    ap.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--thinking", choices=["on", "off"], default=None, help="Qwen3 thinking switch")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be an integer >= 0 (0 disables), got {args.top_k}")
    from diffmas_jax.cli import load_model_checked
    from diffmas_jax.generation import SamplingConfig, generate
    from diffmas_jax.model.transformer import resolve_dtype

    try:
        resolve_dtype(args.dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    enable_compilation_cache()  # a repeated command then skips most of its compile
    model = load_model_checked(args.model, dtype=args.dtype)  # a damaged model dir: one error line
    chats = [([{"role": "system", "content": args.system}] if args.system else [])
             + [{"role": "user", "content": p}] for p in args.prompt]
    thinking = None if args.thinking is None else args.thinking == "on"
    t0 = time.perf_counter()
    out = generate(model, chats, max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed,
                   sampling=SamplingConfig(args.temperature, args.top_p, args.top_k),
                   enable_thinking=thinking, compute_dtype=args.dtype)
    dt = time.perf_counter() - t0
    for text in out.texts:
        print(text)
    n = sum(len(t) for t in out.tokens)
    print(f"[{n} tokens in {dt:.1f}s including compile]", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
