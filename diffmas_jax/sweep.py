"""Run exactly the grid a table needs: one workdir per cell, train where needed, then evaluate.

    python -m diffmas_jax.sweep --config configs/sweeps/embedded.py --dry-run     # the plan
    python -m diffmas_jax.sweep --config configs/sweeps/embedded.py [--grids main,sft] [--shard 0/4]
    python -m diffmas_jax.tables --workdirs runs/sweeps/embedded --out results/embedded

A sweep config (``configs/sweeps/*.py``, ml_collections) names axes (models, tasks,
methods, latent steps, seeds, trace_grad, communication, visibility) and one or more
grids; each grid is the product of its axes (a grid's own value of an axis wins over
the sweep's). Axes apply only where they mean something: latent steps, communication
and visibility to latent_mas / stitch_mas / diffmas, trace_grad to diffmas; cells that
coincide across grids run once. Each cell gets

    ROOT/<model>/<task>/<agents>/<method>[_m<m>][_<trace_grad>][_<communication>][_<visibility>]/seed<k>/
        eval/    python -m diffmas_jax.evaluate (its summary.json is what the tables read)
    ROOT/_train/<model>/<train task>/<agents>/<same name>/seed<k>/
                 python -m diffmas_jax.train, for diffmas, single_sft, text_mas_sft and c2c
                 (cells whose training is identical share it; a grid's train.task may differ
                 from the evaluated task, e.g. train on gsm8k, evaluate on aime24)

<agents> is the roles joined by '-' ("planner-solver"), 'layout' (the configs' layout)
or 'solo' (Single and Single+SFT, where the roles do not matter).

Before anything runs (also with --dry-run) the plan checks the methods and tasks, the
eval fields (config_utils.eval_config's) and the train fields (those of the train config
file the sweep names), and every cell's train and eval command is parsed and checked as
its CLI will (values, splits, roles, local model paths): a typo is one error line naming
the cell, never a failure after training.

A cell whose eval/summary.json is complete (for the same config) is skipped; one that is
missing or incomplete runs again (training and evaluation both resume where they
stopped). ``--shard i/n`` takes every n-th cell starting at i (a fixed split of the whole
plan; cells sharing a training stay together), ``--shard auto`` reads the worker index from the environment (TPU_WORKER_ID,
SLURM_PROCID, JAX_PROCESS_ID, RANK with their counts), so every host of a pod can run the
same command on its own share of the cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from diffmas_jax.cli import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    eval_method: str
    latent: bool = False             # latent steps, communication and visibility apply
    train: Optional[str] = None      # the train config's method, when the cell needs training
    artifact: str = "adapter"        # what training leaves in train/ for evaluation
    eval_flag: str = "lora"          # the eval config field that takes it
    train_config: str = "train_config"  # sweep field naming the train config file
    train_settings: str = "train"    # sweep field with the --config.FIELD values for that train config
    train_axes: tuple = ()           # axes the train config takes


METHODS = {
    "single": MethodSpec("single"),
    "text_mas": MethodSpec("text_mas"),
    "latent_mas": MethodSpec("latent_mas", latent=True),
    "stitch_mas": MethodSpec("stitch_mas", latent=True),
    "diffmas": MethodSpec("diffmas", latent=True, train="diffmas",
                          train_axes=("latent_steps", "trace_grad", "communication", "visibility")),
    "single_sft": MethodSpec("single", train="single_sft"),
    "text_mas_sft": MethodSpec("text_mas", train="text_mas_sft"),
    "c2c": MethodSpec("c2c", train="c2c", artifact="fuser", eval_flag="fuser", train_config="c2c_train_config",
                      train_settings="c2c_train"),
}
AXES = ("models", "tasks", "methods", "latent_steps", "seeds", "trace_grads", "communications", "visibilities")
GRID_FIELDS = AXES + ("roles", "eval", "train", "c2c_train")
SOLO = ("single", "single_sft")  # one agent: the roles do not matter


# ------------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class Cell:
    grid: str
    model: str
    task: str
    method: str
    latent_steps: Optional[int]
    trace_grad: Optional[str]
    communication: Optional[str]
    visibility: Optional[str]
    seed: int
    roles: Optional[str] = None      # "planner,solver"; None: the eval/train config's layout
    train_task: Optional[str] = None  # what the adapter trains on (default: the cell's task)
    eval_overrides: tuple = ()       # ((field, value), ...) passed as --config.field=value
    train_overrides: tuple = ()

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def _name(self) -> str:
        name = self.method
        if self.latent_steps is not None:
            name += f"_m{self.latent_steps}"
        for part in (self.trace_grad, self.communication, self.visibility):
            if part is not None:
                name += f"_{part}"
        agents = "solo" if self.method in SOLO else self.roles.replace(",", "-") if self.roles else "layout"
        return f"{agents}/{name}/seed{self.seed}"

    @property
    def id(self) -> str:
        return f"{slug(self.model)}/{self.task}/{self._name()}"

    @property
    def train_id(self) -> Optional[str]:
        """Where the cell's adapter is trained: cells with the same training share it."""
        if not self.spec.train:
            return None
        return f"_train/{slug(self.model)}/{self.train_task or self.task}/{self._name()}"

    def axes(self) -> dict:
        return {k: getattr(self, k) for k in ("grid", "model", "task", "roles", "method", "latent_steps",
                                               "trace_grad", "communication", "visibility", "seed")}


def slug(model: str) -> str:
    if model in ("", "embedded", None):
        return "embedded"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model).rstrip("/")).name.removesuffix(".gguf")) or "model"


def _list(value, name: str, cast=str) -> list:
    if value is None:
        return [None]
    parts = list(value) if isinstance(value, (list, tuple)) else [p.strip() for p in str(value).split(",")]
    parts = [p for p in parts if p not in ("", None)]
    if not parts:
        raise UserError(f"sweep axis {name} is empty")
    try:
        return [cast(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"sweep axis {name} must be a comma list of {cast.__name__}, got {value!r}") from None


def _dict(cfg, name) -> dict:
    v = cfg.get(name) if hasattr(cfg, "get") else None
    if v is None:
        return {}
    return v.to_dict() if hasattr(v, "to_dict") else dict(v)


def _close(word, choices) -> str:
    """' (did you mean 'x'?)' for a near miss, else ''."""
    m = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _unknown(what: str, value, known, where: str = "", of: str = "") -> UserError:
    """One line: where the bad value came from, the value, the close match (or the known values)."""
    known = list(known)
    hint = _close(value, known)
    return UserError(f"{where}unknown {what} {value!r}{of}{hint}" + ("" if hint else f"; known: {', '.join(known)}"))


def config_file(config, field: str) -> str:
    """The absolute path of a config file the sweep config names (relative to the cwd, else the repo)."""
    value = config.get(field) if hasattr(config, "get") else None
    if not value:
        raise UserError(f"the sweep config has no {field}")
    p = Path(value).expanduser()
    if not p.is_file() and (REPO / value).is_file():
        p = REPO / value
    if not p.is_file():
        raise UserError(f"{field} {value} not found")
    return str(p.resolve())


def _load_py_config(path, what: str):
    """``get_config()`` of a config file (a sweep, train or eval config), any failure one UserError line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {path} not found")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        return mod.get_config()
    except Exception as e:
        raise UserError(f"cannot load {what} {path}: {type(e).__name__}: {e}") from None


def _fields(cfg) -> dict:
    """{field: value} of a loaded config (ConfigDict or dict); nested blocks as dicts."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _check_fields(blocks, known: dict, what: str, of: str = "") -> None:
    """Every key of every (where, block) is a field of ``known`` (a nested block's keys: of its block)."""
    for where, block in blocks:
        for key, value in (block or {}).items():
            if key not in known:
                raise _unknown(f"{what} field", key, sorted(known), f"sweep config {where}: ", of)
            if isinstance(value, dict) and isinstance(known[key], dict):
                _check_fields([(f"{where}.{key}", value)], known[key], what, of)


def _task_known(task: str) -> bool:
    from diffmas_jax.tasks import TASK_NAMES
    return str(task).strip().lower().replace("-", "_") in TASK_NAMES


def plan(config, grids: Optional[Sequence[str]] = None) -> list[Cell]:
    """Every cell of the chosen grids (all by default), deduplicated, sorted by id.

    Everything a cell's commands would fail on for a typo is checked here, before any
    cell runs (also for --dry-run): methods, tasks (the evaluated and the train task),
    the eval fields (those of config_utils.eval_config) and the train fields (those of
    the train config file the sweep names for the method)."""
    from diffmas_jax.config_utils import DEFAULTS as EVAL_FIELDS
    from diffmas_jax.tasks import TASK_NAMES
    train_fields: dict[str, dict] = {}  # sweep field naming a train config -> that config's fields

    def known_train_fields(spec: MethodSpec) -> dict:
        if spec.train_config not in train_fields:
            path = config_file(config, spec.train_config)
            train_fields[spec.train_config] = _fields(_load_py_config(path, spec.train_config))
        return train_fields[spec.train_config]

    all_grids = _dict(config, "grids")
    if not all_grids:
        raise UserError("the sweep config has no grids")
    names = list(grids) if grids else list(all_grids)
    unknown = [g for g in names if g not in all_grids]
    if unknown:
        raise UserError(f"unknown grid(s) {unknown}; this sweep has: {', '.join(all_grids)}")
    base_eval = _dict(config, "eval")
    task_eval, task_train = _dict(config, "task_eval"), _dict(config, "task_train")
    for block, per_task in (("task_eval", task_eval), ("task_train", task_train)):
        for t in per_task:
            if not _task_known(t):
                raise _unknown("task", t, TASK_NAMES, f"sweep config {block}: ")
    cells: dict[str, Cell] = {}
    trainings: dict[str, Cell] = {}
    for gname in names:
        g = all_grids[gname] or {}
        bad = sorted(set(g) - set(GRID_FIELDS))
        if bad:
            raise UserError(f"grid {gname!r} has unknown field(s) {bad}; known: {', '.join(GRID_FIELDS)}")
        ax = {a: g.get(a, config.get(a)) for a in AXES}
        roles = g.get("roles", config.get("roles")) or None
        if roles is not None:
            roles = ",".join(_list(roles, "roles"))
        methods = _list(ax["methods"], "methods")
        for m in methods:
            if m not in METHODS:
                raise _unknown("method", m, METHODS, f"grid {gname!r}: ")
        tasks = _list(ax["tasks"], "tasks")
        for t in tasks:
            if not _task_known(t):
                raise _unknown("task", t, TASK_NAMES, f"grid {gname!r}: ")
        _check_fields([("eval", base_eval), *[(f"task_eval.{t}", task_eval.get(t)) for t in tasks],
                       (f"grids.{gname}.eval", dict(g.get("eval") or {}))], EVAL_FIELDS, "eval")
        for spec in {METHODS[m].train_settings: METHODS[m] for m in methods if METHODS[m].train}.values():
            settings = spec.train_settings
            _check_fields([(settings, _dict(config, settings)), *[(f"task_train.{t}", task_train.get(t)) for t in tasks],
                           (f"grids.{gname}.{settings}", dict(g.get(settings) or {}))],
                          known_train_fields(spec), "train", f" of {config.get(spec.train_config)}")
        for model, task, method, seed in itertools.product(_list(ax["models"], "models"), tasks,
                                                           methods, _list(ax["seeds"], "seeds", int)):
            spec = METHODS[method]
            steps = _list(ax["latent_steps"], "latent_steps", int) if spec.latent else [None]
            tgs = _list(ax["trace_grads"], "trace_grads") if method == "diffmas" else [None]
            comms = _list(ax["communications"], "communications") if spec.latent else [None]
            viss = _list(ax["visibilities"], "visibilities") if spec.latent else [None]
            for m, tg, comm, vis in itertools.product(steps, tgs, comms, viss):
                ev = {**base_eval, **task_eval.get(task, {}), **dict(g.get("eval") or {})}
                settings = spec.train_settings  # the C2C trainer has its own config and fields
                tr = {**_dict(config, settings), **task_train.get(task, {}), **dict(g.get(settings) or {})}
                train_task = str(tr.pop("task", task))
                if spec.train and not _task_known(train_task):
                    raise _unknown("train task", train_task, TASK_NAMES, f"grid {gname!r}, task {task!r}: ")
                cell = Cell(gname, str(model), str(task), method, m, tg, comm, vis, int(seed),
                            None if method in SOLO else roles, train_task if spec.train else None,
                            tuple(sorted(ev.items())), tuple(sorted(tr.items())) if spec.train else ())
                prev = cells.get(cell.id)
                if prev is None:
                    cells[cell.id] = cell
                elif (prev.eval_overrides, prev.train_overrides) != (cell.eval_overrides, cell.train_overrides):
                    raise UserError(f"cell {cell.id} is in grids {prev.grid!r} and {gname!r} with different "
                                    "eval/train settings; give one of them other axes")
                if cell.train_id:
                    other = trainings.setdefault(cell.train_id, cell)
                    if other.train_overrides != cell.train_overrides:
                        raise UserError(f"cells {other.id} and {cell.id} share the training {cell.train_id} "
                                        "with different train settings; make them agree (task_train / grid train)")
    return sorted(cells.values(), key=lambda c: c.id)


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """A fixed split of the whole plan; cells that share a training go to the same worker."""
    groups = sorted({c.train_id or c.id for c in cells})
    mine = {g for i, g in enumerate(groups) if i % count == index}
    return [c for c in cells if (c.train_id or c.id) in mine]


def parse_shard(text: str, env=None) -> tuple[int, int]:
    """'i/n' (0-based), or 'auto': the worker index and count from the environment."""
    env = os.environ if env is None else env
    if text == "auto":
        hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
        for idx, cnt in (("DIFFMAS_SHARD_INDEX", "DIFFMAS_SHARD_COUNT"), ("SLURM_PROCID", "SLURM_NTASKS"),
                         ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                         ("RANK", "WORLD_SIZE")):
            if env.get(idx) is not None and env.get(cnt) is not None:
                text = f"{env[idx]}/{env[cnt]}"
                break
        else:
            text = f"{env['TPU_WORKER_ID']}/{len(hosts)}" if "TPU_WORKER_ID" in env and hosts else "0/1"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard must be i/n with 0 <= i < n (or 'auto'), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------- cell state
def _norm(key: str, v):
    if v is None:
        return None
    if key in ("lora", "fuser", "data_dir", "task_path") or (key == "model" and Path(str(v)).expanduser().exists()):
        return str(Path(str(v)).expanduser().resolve())
    if key in ("latent_steps", "roles"):
        parts = list(v) if isinstance(v, (list, tuple)) else [p.strip() for p in str(v).split(",") if p.strip()]
        return ",".join(str(p) for p in parts)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def differences(want: dict, have: dict) -> list[str]:
    """Fields of ``want`` whose recorded value in ``have`` differs."""
    return [k for k, v in want.items() if _norm(k, v) != _norm(k, have.get(k))]


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Sweep:
    """A plan bound to a root directory and config files; runs cells through ``runner``."""

    def __init__(self, config, root=None, python: str = sys.executable,
                 runner: Optional[Callable[[list, Path], int]] = None):
        self.config = config
        self.root = Path(root or config.get("root") or "runs/sweep").expanduser()
        self.python = python
        self.runner = runner or run_logged

    def config_file(self, field: str) -> str:
        return config_file(self.config, field)

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / cell.id

    def train_dir(self, cell: Cell) -> Path:
        return self.root / cell.train_id

    # the commands ------------------------------------------------------------
    def train_fields(self, cell: Cell) -> dict:
        f = dict(cell.train_overrides)
        f.update(method=cell.spec.train, model=cell.model, task=cell.train_task or cell.task, seed=cell.seed,
                 roles=cell.roles)
        for axis in cell.spec.train_axes:
            f[axis] = getattr(cell, axis)
        return f

    def eval_fields(self, cell: Cell) -> dict:
        f = dict(cell.eval_overrides)
        f.update(method=cell.spec.eval_method, model=cell.model, task=cell.task, seed=cell.seed, roles=cell.roles)
        if cell.spec.latent:
            f.update(latent_steps=cell.latent_steps, communication=cell.communication, visibility=cell.visibility)
        if cell.spec.train:
            f[cell.spec.eval_flag] = str(self.train_dir(cell) / cell.spec.artifact)
        return f

    def command(self, module: str, config_file: str, workdir: Path, fields: dict) -> list[str]:
        cmd = [self.python, "-m", module, "--config", config_file, "--workdir", str(workdir)]
        for k, v in fields.items():
            if v is not None:
                cmd.append(f"--config.{k}={v}")
        return cmd

    def train_command(self, cell: Cell) -> list[str]:
        return self.command("diffmas_jax.train", self.config_file(cell.spec.train_config),
                            self.train_dir(cell), self.train_fields(cell))

    def eval_command(self, cell: Cell) -> list[str]:
        return self.command("diffmas_jax.evaluate", self.config_file("eval_config"), self.cell_dir(cell) / "eval",
                            self.eval_fields(cell))

    # state -------------------------------------------------------------------
    def trained(self, cell: Cell) -> bool:
        art = self.train_dir(cell) / cell.spec.artifact
        return (art / ("fuser.json" if cell.spec.artifact == "fuser" else "adapter.json")).is_file()

    def status(self, cell: Cell) -> tuple[str, str]:
        """(state, detail): done | todo | incomplete | extend | conflict."""
        d = self.cell_dir(cell)
        if cell.spec.train and self.trained(cell):
            from diffmas_jax.train import IDENTITY_FIELDS  # what makes a training another experiment
            have = _read(self.train_dir(cell) / "config.json") or {}
            want = {k: v for k, v in self.train_fields(cell).items()
                    if (v is not None or k == "roles") and k in IDENTITY_FIELDS}
            diff = differences(want, have) if have else []
            if diff:
                return "conflict", f"{cell.train_id} was trained with other values of {', '.join(diff)}"
        s = _read(d / "eval" / "summary.json")
        if s is None:
            if (d / "eval" / "summary.json").exists():
                return "incomplete", "summary.json unreadable: evaluation runs again"
            return "todo", ("train + eval" if cell.spec.train and not self.trained(cell) else "eval")
        from diffmas_jax.config_utils import RESUMABLE_FIELDS, SAMPLING_FIELDS
        fields = self.eval_fields(cell)
        free = set(RESUMABLE_FIELDS) - {"limit"}  # evaluate resumes across these (greedy decoding)
        if float(fields.get("temperature") or 0) > 0 or float((s.get("config") or {}).get("temperature") or 0) > 0:
            free -= set(SAMPLING_FIELDS)
        want = {k: v for k, v in fields.items() if (v is not None or k == "roles") and k not in free}
        diff = differences(want, s.get("config") or {})
        if diff and set(diff) <= {"limit"}:
            return "extend", f"limit {s.get('config', {}).get('limit')} -> {want['limit']}"
        if diff:
            return "conflict", f"eval/ was made with other values of {', '.join(diff)}"
        if not s.get("complete"):
            return "incomplete", f"{s.get('n', 0)}/{s.get('n_total', '?')} items"
        return "done", f"{s.get('n')}/{s.get('n_total')} items"

    # running -----------------------------------------------------------------
    def run_cell(self, cell: Cell) -> str:
        state, detail = self.status(cell)
        if state in ("done", "conflict"):
            return state
        d = self.cell_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cell.json").write_text(json.dumps(cell.axes(), indent=2) + "\n")
        if cell.spec.train and not self.trained(cell):
            if self.runner(self.train_command(cell), self.train_dir(cell) / "train.log") != 0 or not self.trained(cell):
                return "failed (train)"
        if self.runner(self.eval_command(cell), d / "eval.log") != 0:
            return "failed (eval)"
        state, _ = self.status(cell)
        return state if state != "done" else "ran"


def _looks_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")


def check_commands(sweep: Sweep, cells: Sequence[Cell]) -> None:
    """Parse and check every training and evaluation command of the plan as its CLI will,
    before any cell runs (also for --dry-run): a value typo (eval.batch_size=0,
    trace_grads=ful, a split, role or model path that does not exist) is one error line
    naming the cell, never a failure after a training. The adapter or fuser a training
    will write does not exist yet; a stand-in directory takes its place here."""
    import tempfile

    from diffmas_jax import evaluate, train
    from diffmas_jax.config_utils import resolve
    from diffmas_jax.tasks import TaskError, get_task

    def check_split(task: str, options: dict, split: str) -> None:
        splits = get_task(task, **options).splits
        if split not in splits:
            raise UserError(f"task {task!r} has no split {split!r} (supported: {', '.join(splits)})")

    seen: set = set()
    for cell in cells:
        jobs = [("eval", sweep.eval_command(cell))]
        if cell.spec.train:
            jobs.insert(0, ("train", sweep.train_command(cell)))
        for kind, cmd in jobs:
            argv = [cmd[2], *cmd[3:]]
            key = (kind, tuple(a for a in argv if a != str(sweep.cell_dir(cell) / "eval")))
            if key in seen:
                continue
            seen.add(key)
            try:
                config, _ = evaluate.parse_flags(argv)
                model = str(config.get("model") or "embedded")
                if _looks_local(model) and not Path(model).expanduser().exists():
                    raise UserError(f"model {model} not found")
                if kind == "train":
                    train.check_config(config)
                    if config.get("split") is not None:
                        check_split(config.task, {"path": config.task_path} if config.get("task_path") else {},
                                    config.split)
                else:
                    if cell.spec.train:
                        config[cell.spec.eval_flag] = tempfile.gettempdir()  # the artifact's stand-in
                    cfg = resolve(config)
                    evaluate.method_config(cfg)
                    check_split(cfg["task"], cfg["task_options"], cfg["split"])
            except (UserError, TaskError) as e:
                raise UserError(f"cell {cell.id} ({kind}): {e}") from None


def run_logged(cmd: list, log: Path) -> int:
    """Run a stage, its output appended to ``log``; the tail is echoed if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join("    | " + line for line in tail), file=sys.stderr)
    return rc


# --------------------------------------------------------------------------- main
def load_config(path: str, overrides: Sequence[str] = ()):
    """The sweep config with --set overrides; the fields of its eval / train blocks, its
    methods and tasks are checked by :func:`plan` (before anything runs)."""
    config = _load_py_config(path, "sweep config")
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise UserError(f"--set takes FIELD=VALUE, got {o!r}")
        *parents, last = key.split(".")
        node = config
        for part in parents:
            if part not in node or not hasattr(node[part], "keys"):
                raise UserError(f"unknown sweep config field {key!r}")
            node = node[part]
        if not parents and last not in node:  # new keys only inside grids / eval / train blocks
            raise UserError(f"unknown sweep config field {key!r}")
        old = node.get(last)
        try:
            node[last] = type(old)(value) if isinstance(old, (int, float)) and not isinstance(old, bool) else \
                (value.lower() in ("1", "true", "yes") if isinstance(old, bool) else value)
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a {type(old).__name__}, got {value!r}") from None
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmas_jax.sweep", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="sweep config file (configs/sweeps/*.py)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a sweep config field, e.g. --set tasks=gsm8k --set grids.main.seeds=0,1")
    ap.add_argument("--root", default=None, help="where the cells go (default: the config's root)")
    ap.add_argument("--grids", default=None, help="comma list of grids to run (default: all)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from i; 'auto': from the environment")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (state and commands) and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining cells after a failure")
    args = ap.parse_args(argv)
    config = load_config(args.config, args.set)
    cells = plan(config, [g for g in args.grids.split(",") if g] if args.grids else None)
    index, count = parse_shard(args.shard)
    mine = shard(cells, index, count)
    sweep = Sweep(config, root=args.root)
    check_commands(sweep, cells)
    if args.shard == "auto" and count > 1:
        os.environ["DIFFMAS_DISTRIBUTED"] = "0"  # each worker runs its own cells: do not join the hosts
    print(f"sweep {args.config}: {len(cells)} cells, shard {index}/{count} runs {len(mine)} -> {sweep.root}")
    if args.dry_run:
        counts: dict = {}
        trainings = set()
        for c in mine:
            state, detail = sweep.status(c)
            counts[state] = counts.get(state, 0) + 1
            print(f"[{state:10s}] {c.id}  ({c.grid}; {detail})")
            if state not in ("done", "conflict"):
                if c.spec.train and not sweep.trained(c):
                    if c.train_id in trainings:
                        print(f"    (trained once for an earlier cell: {c.train_id})")
                    else:
                        print("    " + " ".join(sweep.train_command(c)))
                    trainings.add(c.train_id)
                print("    " + " ".join(sweep.eval_command(c)))
        print("plan: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        return 0
    results, t0 = {}, time.time()
    for i, c in enumerate(mine, 1):
        state, detail = sweep.status(c)
        print(f"[{i}/{len(mine)}] {c.id}: {state} ({detail})", flush=True)
        if state in ("done", "conflict"):
            results[c.id] = "skipped (done)" if state == "done" else f"conflict: {detail}"
            continue
        t = time.time()
        results[c.id] = sweep.run_cell(c)
        print(f"    -> {results[c.id]} in {time.time() - t:.0f} s (logs in {sweep.cell_dir(c)})", flush=True)
        if results[c.id].startswith("failed") and not args.keep_going:
            break
    bad = {k: v for k, v in results.items() if v.startswith(("failed", "conflict", "incomplete"))}
    print(f"sweep finished in {time.time() - t0:.0f} s: {len(results)} cells visited, {len(bad)} not done")
    for k, v in bad.items():
        print(f"  {k}: {v}")
    return 1 if bad else 0


if __name__ == "__main__":
    run_cli(main)
