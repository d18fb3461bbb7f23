"""Shared CLI plumbing: bad input ends with one clear line and a non-zero exit."""
from __future__ import annotations

import os
import sys
from typing import Optional

from diffmas_jax.model.config import ModelConfigError
from diffmas_jax.model.loading import ModelNotFoundError
from diffmas_jax.model.weights import WeightLoadError
from diffmas_jax.trace import TraceOverflowError


class UserError(ValueError):
    """A problem with what the user asked for (config, flags, data, paths)."""


USER_ERRORS = (UserError, ModelConfigError, ModelNotFoundError, WeightLoadError, TraceOverflowError,
               FileNotFoundError, NotADirectoryError)


def user_error_types():
    types = list(USER_ERRORS)
    try:
        from diffmas_jax.tasks import TaskError
        types.append(TaskError)
    except ImportError:
        pass
    return tuple(types)


def run_cli(main, argv=None) -> None:
    """Call ``main(argv)``; user errors print 'error: ...' on one line and exit 2."""
    try:
        code = main(argv)
    except user_error_types() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def enable_compilation_cache() -> Optional[str]:
    """Keep compiled programs on disk so a resumed or repeated run skips compiling.

    JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself); otherwise the
    cache lives under the diffmas_jax cache root (DIFFMAS_CACHE / ~/.cache/diffmas_jax).
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    try:
        import jax
        from diffmas_jax.model.loading import cache_root
        path = str(cache_root() / "jax_cache")
        jax.config.update("jax_compilation_cache_dir", path)
        return path
    except Exception:  # a cache is an optimisation, never a reason to fail
        return None
