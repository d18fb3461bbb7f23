"""Shared CLI plumbing: bad input ends with one clear line and a non-zero exit."""
from __future__ import annotations

import errno
import os
import sys
from typing import Optional

from diffmas_jax.model.config import ModelConfigError
from diffmas_jax.model.loading import ModelNotFoundError
from diffmas_jax.model.weights import WeightLoadError
from diffmas_jax.trace import TraceOverflowError
from diffmas_jax.xla_cpu import XlaOptionsError, prompt_dots_setting


class UserError(ValueError):
    """A problem with what the user asked for (config, flags, data, paths)."""


class WriteError(UserError):
    """An output could not be written because of the machine (disk full, permissions, I/O)."""
    environment = True  # run_cli: quiet the teardown of writers that fail the same way


USER_ERRORS = (UserError, ModelConfigError, ModelNotFoundError, WeightLoadError, TraceOverflowError,
               XlaOptionsError, FileNotFoundError, NotADirectoryError)


def user_error_types():
    types = list(USER_ERRORS)
    try:
        from diffmas_jax.tasks import TaskError
        types.append(TaskError)
    except ImportError:
        pass
    return tuple(types)


# OSErrors that describe the machine, not a bug: reported as one line, like bad input.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.EIO, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EMFILE,
                                errno.ENFILE, errno.EEXIST})


def environment_errno(e: BaseException) -> Optional[int]:
    """The errno of a disk-full / permission style failure, also when a library reports it
    only in its message (safetensors: "(os error 28)", tensorstore: "os_error_code='28'")."""
    import re
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return e.errno
    m = re.search(r"os error (\d+)|os_error_code='(\d+)'", str(e))
    if m:
        n = int(m.group(1) or m.group(2))
        return n if n in ENVIRONMENT_ERRNOS else None
    return None


def environment_cause(e: BaseException) -> Optional[str]:
    """'No space left on device (errno 28)' for such failures, else None."""
    n = environment_errno(e)
    return None if n is None else f"{os.strerror(n)} (errno {n})"


def _quiet_teardown() -> None:
    """After a disk-full style error, writers that flush at exit (TensorBoard's event
    writer, its thread) fail the same way; their reports would bury the one error line."""
    import threading
    hook, thook = sys.unraisablehook, threading.excepthook

    def unraisable(u):
        if not isinstance(u.exc_value, OSError):
            hook(u)

    def thread(a):
        if not issubclass(a.exc_type, OSError):
            thook(a)
    sys.unraisablehook, threading.excepthook = unraisable, thread


def error_line(e: BaseException) -> str:
    """The one line a CLI prints for an error it reports (without the 'error: ' prefix)."""
    if isinstance(e, OSError) and not isinstance(e, user_error_types()) and e.strerror:
        where = f": {e.filename}" if e.filename is not None else ""
        return f"{e.strerror}{where} (errno {e.errno})"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_cli(main, argv=None) -> None:
    """Call ``main(argv)``; user errors (and disk-full / permission OSErrors) print
    'error: ...' on one line and exit 2. A bad ``DIFFMAS_JAX_PROMPT_DOTS`` is refused before
    ``main`` runs, so no model loads and nothing is written."""
    try:
        prompt_dots_setting()  # checked here; the jits read it at their first call
        code = main(argv)
    except user_error_types() as e:
        if os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        if getattr(e, "environment", False):
            _quiet_teardown()
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # disk full, permissions ... (also as reported by Rust / C++ libraries)
        if environment_errno(e) is None or os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        _quiet_teardown()
        line = error_line(e) if isinstance(e, OSError) else f"{environment_cause(e)}: {_short(e)}"
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def check_workdir_path(workdir) -> None:
    """A workdir that is, or lies inside, a file is one UserError line, before anything
    loads (a model can take minutes) or is written."""
    from pathlib import Path
    if not str(workdir).strip():
        raise UserError("--workdir is empty")
    wd = Path(workdir).expanduser()
    for p in (wd, *wd.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"workdir {workdir}: {p} exists and is not a directory")
            return


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] or type(e).__name__)


def config_path_arg(argv) -> Optional[str]:
    """The value of --config in an argv (argv[0] is the program), or None."""
    for i, a in enumerate(argv[1:], 1):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def forget_loaded_config(flag_name: str = "config") -> None:
    """ml_collections loads every config file as the module '<flag>_config' and re-runs a new
    file inside the module already there, so a file without get_config() would silently
    inherit the previous file's (in-process use: tests, notebooks). Start from a clean slate."""
    sys.modules.pop(f"{flag_name}_config", None)


def parse_config_flags(flag_values, config_flag, argv):
    """Parse ``argv`` with absl ``flag_values`` (None: already parsed) and return
    (remaining args, ConfigDict of the ml_collections DEFINE_config_file flag).
    A bad flag, a missing or broken config file, or an unknown --config.FIELD is one
    UserError line."""
    from pathlib import Path
    from absl import flags
    path = config_path_arg(argv)
    if path is not None and not Path(path.split(":", 1)[0]).expanduser().is_file():
        raise UserError(f"config file {path.split(':', 1)[0]} not found")
    rest = list(argv)
    forget_loaded_config()
    try:
        if flag_values is not None:
            rest = flag_values(list(argv))
        config = config_flag.value
        if path is not None:
            _check_config_type(config, path)
        if config is not None:
            config.to_dict()  # config_flags defers some load errors to first use
    except UserError:
        raise
    except flags.Error as e:
        root, msg = _root(e), str(e).strip().splitlines()[0]
        if root is not e and not isinstance(root, flags.Error) and "--config." not in msg:
            raise _config_error(root, path, e, argv) from None  # the config file itself failed to load
        raise UserError(msg) from None
    except Exception as e:  # the config file's own code failed, or an unknown field
        raise _config_error(_root(e), path, e, argv) from None
    return rest, config


def _check_config_type(config, path) -> None:
    """get_config() must give a ConfigDict (a plain dict has no field checks, no overrides)."""
    import ml_collections
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config() in {path} must return an ml_collections ConfigDict, "
                        f"got {type(config).__name__}")


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _config_error(e: BaseException, path, outer: Optional[BaseException] = None, argv=()) -> UserError:
    """The one line for a config file that failed to load. ``e`` is the root of the exception
    chain, ``outer`` the exception caught (ml_collections' suggestions live in between)."""
    if isinstance(e, (AttributeError, KeyError)):
        name = _short(e).strip("\"'")
        if "get_config" in name:
            return UserError(f"config file {path} has no get_config()")
        if "object has no attribute 'to_dict'" in str(e):
            return UserError(f"get_config() in {path} must return an ml_collections ConfigDict")
        if isinstance(e, AttributeError) and "object has no attribute" in str(e):
            # the config file's own code failed (not ConfigDict's unknown-field error)
            return UserError(f"cannot load config file {path}: AttributeError: {_short(e)}")
        name, suggestion = _field_and_suggestion(name, outer)
        prefix = _override_prefix(name, argv)
        hint = f" (did you mean {prefix + suggestion!r}?)" if suggestion else ""
        return UserError(f"unknown config field {prefix + name!r}{hint} in a --config.FIELD=VALUE override "
                         f"(or in {path})")
    return UserError(f"cannot load config file {path}: {type(e).__name__}: {_short(e)}")


def _field_and_suggestion(name: str, outer: Optional[BaseException]) -> tuple:
    """(field, suggested field or None): ml_collections adds 'Did you mean "x" instead of "y"?'
    to a KeyError along the chain; the line shows it without the repr quoting."""
    import re
    e = outer
    while e is not None:
        for arg in getattr(e, "args", ()):
            m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', str(arg))
            if m:
                return m.group(2), m.group(1)
        e = e.__cause__ or e.__context__
    return name, None


def _override_prefix(name: str, argv) -> str:
    """'task_options.' when the unknown field came from --config.task_options.NAME=..."""
    for a in list(argv)[1:]:
        if a.startswith("--config.") and "=" in a:
            dotted = a[len("--config."):].split("=", 1)[0]
            parent, _, last = dotted.rpartition(".")
            if last == name and parent:
                return parent + "."
    return ""


def config_flag_value(config_flag, argv):
    """The ConfigDict of an already parsed DEFINE_config_file flag (see parse_config_flags)."""
    return parse_config_flags(None, config_flag, argv)[1]


def load_model_checked(name_or_path=None, dtype="float32", **kw):
    """``load_model`` where a damaged model directory or file ends as one UserError line
    naming the file (config.json, weights, tokenizer, GGUF) instead of a traceback.
    Errors it cannot attribute to the model files are raised unchanged
    (DIFFMAS_TRACEBACK=1 shows the original exception in every case)."""
    from diffmas_jax.model import loading
    try:
        return loading.load_model(name_or_path, dtype=dtype, **kw)
    except user_error_types():
        raise
    except Exception as e:
        if os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        msg = _diagnose_model(name_or_path, e)
        if msg is None:
            raise
        raise UserError(msg) from None


def _diagnose_model(name_or_path, e: BaseException) -> Optional[str]:
    import json
    import traceback
    from pathlib import Path
    frames = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
    in_frames = lambda *parts: any(any(p in f for p in parts) for f in frames)  # noqa: E731
    p = Path(str(name_or_path or "")).expanduser()
    if p.is_file() and p.suffix == ".gguf" or in_frames("/gguf/"):
        return f"cannot read GGUF file {p}: {_short(e)}"
    if not p.is_dir():  # a Hub id or the embedded model: look into the directory it resolved to
        from diffmas_jax.model import loading
        try:
            p = loading.resolve_model_dir(name_or_path)
        except Exception:
            return None
    cfg_path = p / "config.json"
    try:
        json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as je:
        return f"{cfg_path} is not valid JSON ({je.msg}, line {je.lineno} column {je.colno})"
    except (OSError, UnicodeDecodeError) as oe:
        return f"cannot read {cfg_path}: {_short(oe)}"
    if in_frames("diffmas_jax/model/config.py"):
        if isinstance(e, KeyError):
            return f"{cfg_path} lacks the field {e.args[0]!r}"
        return f"{cfg_path}: {type(e).__name__}: {_short(e)}"
    if "safetensors" in repr(type(e)) or in_frames("/safetensors/", "diffmas_jax/model/weights.py"):
        bad = next((f for f in sorted(p.glob("*.safetensors")) if not _safetensors_ok(f)), None)
        if bad is not None:
            return f"cannot read the weights in {bad}: damaged or truncated safetensors file ({_short(e)})"
        return f"cannot read the weights in {p}: {_short(e)}"
    if in_frames("tokeniz"):
        names = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
        if not any((p / n).exists() for n in names):
            return f"no tokenizer in {p} (none of {', '.join(names)})"
        return f"cannot load the tokenizer from {p}: {_short(e)}"
    return None


def _safetensors_ok(path) -> bool:
    """Whether a .safetensors file's header parses and its tensors fit in the file."""
    import json
    import struct
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end <= size
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


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


def remat_setting(c):
    """``c.remat`` (bool) and ``c.remat_policy`` ("full": keep layer inputs; "dots": also keep the
    projections' outputs, trading memory for no matmul recompute) as the step's ``remat`` value."""
    if not c.remat:
        return False
    policy = c.get("remat_policy", "full")
    if policy not in ("full", "dots"):
        raise UserError(f"config.remat_policy={policy!r}: expected 'full' or 'dots'")
    return True if policy == "full" else "dots"
