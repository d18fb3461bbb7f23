"""The paper's tables from evaluation summaries: Markdown, LaTeX, JSON and PNG plots.

    python -m diffmas_jax.tables --workdirs runs/sweeps/embedded --out results/tables

Every ``summary.json`` under the given workdirs (searched recursively) is one run;
its ``config.json`` (or the summary's own config) says what it is: model, task,
method, latent steps, communication, visibility, seed, and the adapter (``lora``),
whose metadata gives DiffMAS's ``trace_grad`` and the SFT baselines (single or
text_mas + adapter = Single+SFT / TextMAS+SFT). Runs that differ only in seed form
one cell: the mean over seeds with a two-level (seed, item) bootstrap CI; seeds that
differ in anything else (limit, sampling, max_new_tokens ...) are refused, not averaged.

Tables: main results (Single, TextMAS, LatentMAS, DiffMAS [, C2C] per model and
benchmark, with DiffMAS's gain over Single), the latent-steps sweep, Single+SFT and
TextMAS+SFT vs DiffMAS, StitchMAS vs DiffMAS, trace_grad stop vs full, concat vs
overwrite, the communication benchmark (task ``comm``), and cost per question.
Every cell shows accuracy (%) with its 95% CI and n; gains are differences in points
with a paired bootstrap CI over the items both runs share. A cell without a run reads
``missing`` (never 0); a run that has not finished reads ``incomplete`` with what it
has so far and takes part in no gain. The paper's reported number (a third-party
reading, ``diffmas_jax/data/paper_numbers.json``) stands beside ours wherever it has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from diffmas_jax.cli import UserError, run_cli
from diffmas_jax.metrics import alike_interval

LATENT_METHODS = ("latent_mas", "stitch_mas", "diffmas")
TRAINED = ("diffmas", "single_sft", "text_mas_sft")
SOLO = ("single", "single_sft")   # one agent: the roles do not matter
METHOD_ORDER = ("single", "single_sft", "text_mas", "text_mas_sft", "latent_mas", "stitch_mas", "diffmas", "c2c")
LABELS = {"single": "Single", "single_sft": "Single+SFT", "text_mas": "TextMAS", "text_mas_sft": "TextMAS+SFT",
          "latent_mas": "LatentMAS", "stitch_mas": "StitchMAS", "diffmas": "DiffMAS", "c2c": "C2C"}
COMM_TASKS = ("comm",)
RESAMPLES = 2000
# Every table tables can build; ``--out`` holds <name>.png for those it draws (and no other PNG it made).
TABLE_NAMES = ("main", "latent_steps", "sft", "stitch", "trace_grad", "communication", "comm_benchmark", "cost")
OUTPUT_FILES = ("tables.md", "tables.tex", "tables.json")
BOOT_SEED = 0


# --------------------------------------------------------------------- reading runs
@dataclasses.dataclass
class Run:
    dir: Path
    summary: dict
    config: dict
    model: str
    task: str
    method: str                    # single | single_sft | text_mas | text_mas_sft | latent_mas | stitch_mas | diffmas | c2c ...
    latent_steps: object           # int, "2,5,1", or None (methods without latent steps)
    trace_grad: Optional[str]      # diffmas only; "?" when the adapter does not say
    communication: Optional[str]   # latent methods only
    visibility: Optional[str]      # latent methods only
    seed: int
    agents: Optional[str] = None   # "planner,solver" or the layout; None for Single / Single+SFT

    @property
    def key(self) -> tuple:
        return (self.model, self.task, self.method, self.latent_steps, self.trace_grad, self.communication,
                self.visibility)

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete")) and self.summary.get("accuracy") is not None

    @property
    def n(self) -> int:
        return int(self.summary.get("n") or 0)

    def outcomes(self) -> dict:
        """{item id: 0/1} from items.jsonl (empty when it is missing or unreadable)."""
        if not hasattr(self, "_outcomes"):
            out = {}
            try:
                for line in (self.dir / "items.jsonl").read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        out.setdefault(rec["id"], 1.0 if rec["correct"] else 0.0)
            except (OSError, ValueError, KeyError, TypeError):
                out = {}
            if len(out) != self.n:  # not the items the summary counted: do not pair on them
                out = {}
            self._outcomes = out
        return self._outcomes

    def vector(self) -> np.ndarray:
        o = self.outcomes()
        if o:
            return np.fromiter(o.values(), float)
        c = int(self.summary.get("correct", round((self.summary.get("accuracy") or 0.0) * self.n)))
        return np.array([1.0] * c + [0.0] * (self.n - c))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def model_label(model) -> str:
    if model in (None, "", "embedded"):
        return "embedded (SmolLM2-135M)"
    return Path(str(model).rstrip("/")).name.removesuffix(".gguf") or str(model)


def _norm_model(name: str) -> str:
    return Path(str(name).rstrip("/")).name.lower().removesuffix(".gguf")


def _steps(v):
    if isinstance(v, (list, tuple)):
        v = [int(x) for x in v]
        return v[0] if len(set(v)) == 1 else ",".join(map(str, v))
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        try:
            return _steps([int(p) for p in parts]) if parts else None
        except ValueError:
            return v
    return v


def _adapter_meta(summary: dict, lora: Optional[str]) -> dict:
    meta = dict(((summary.get("adapter") or {}).get("meta")) or {})
    if lora and ("trace_grad" not in meta or "method" not in meta):
        p = Path(lora)
        for f in (p / "adapter.json", p.parent / "config.json"):
            try:
                extra = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(extra, dict):
                for k in ("trace_grad", "method"):
                    meta.setdefault(k, extra.get(k))
    return meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# summary.json fields the tables read: (check, what it must be); absent or null is allowed
_SUMMARY_TYPES = {
    "n": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "n_total": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "correct": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "accuracy": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "accuracy_ci95": (lambda v: isinstance(v, list) and len(v) == 2 and all(x is None or _is_num(x) for x in v),
                      "a list [low, high] of numbers"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "tokens_per_question": (lambda v: isinstance(v, dict), "a JSON object"),
    "adapter": (lambda v: isinstance(v, dict) and isinstance(v.get("meta") or {}, dict),
                "a JSON object (with an object 'meta')"),
}
# the run's config (config.json or the summary's config)
_CONFIG_TYPES = {
    "seed": (lambda v: _is_int(v) or (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v) is not None),
             "an integer"),
    "latent_steps": (lambda v: (_is_int(v) or isinstance(v, str)) or
                     (isinstance(v, list) and bool(v) and all(_is_int(x) for x in v)),
                     "an integer, a comma list or a list of integers"),
    "roles": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
              "a string or a list of strings"),
    "lora": (lambda v: isinstance(v, str), "a path (string)"),
    "communication": (lambda v: isinstance(v, str), "a string"),
    "visibility": (lambda v: isinstance(v, str), "a string"),
    "layout": (lambda v: isinstance(v, str), "a string"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "task": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
}


def _check_types(data: dict, types: dict, where, prefix: str = "") -> None:
    """One line naming the file and the field whose value has the wrong type."""
    for field, (ok, what) in types.items():
        v = data.get(field)
        if v is not None and not ok(v):
            raise UserError(f"{where}: field {prefix + field!r} must be {what}, got {json.dumps(v)[:80]}")


def make_run(summary_path: Path) -> Run:
    summary = _read_json(summary_path, "summary.json")
    cfg_path = summary_path.parent / "config.json"
    cfg = _read_json(cfg_path, "config.json") if cfg_path.exists() else summary.get("config")
    if not isinstance(cfg, dict) or "method" not in cfg or "task" not in cfg:
        raise UserError(f"{summary_path}: not an evaluation summary (no config with method and task)")
    _check_types(summary, _SUMMARY_TYPES, summary_path)
    if cfg_path.exists():
        _check_types(cfg, _CONFIG_TYPES, cfg_path)
    else:
        _check_types(cfg, _CONFIG_TYPES, summary_path, prefix="config.")
    method, lora = str(cfg["method"]), cfg.get("lora")
    meta = _adapter_meta(summary, lora) if lora else {}
    if lora and method in ("single", "text_mas"):
        method += "_sft"
    elif lora and method == "latent_mas":
        method = "diffmas"
    latent = method in LATENT_METHODS
    return Run(dir=summary_path.parent, summary=summary, config=cfg, model=model_label(cfg.get("model")),
               task=str(cfg["task"]), method=method,
               latent_steps=_steps(cfg.get("latent_steps", 10)) if latent else None,
               trace_grad=(meta.get("trace_grad") or "?") if method == "diffmas" else None,
               communication=cfg.get("communication", "concat") if latent else None,
               visibility=cfg.get("visibility", "full") if latent else None,
               seed=int(cfg.get("seed", 0) or 0), agents=None if method in SOLO else _agents(cfg))


def _agents(cfg: dict) -> str:
    roles = cfg.get("roles")
    if roles:
        return ",".join(roles) if isinstance(roles, (list, tuple)) else ",".join(
            r.strip() for r in str(roles).split(",") if r.strip())
    return str(cfg.get("layout") or "sequential")


def agents_label(agents: Optional[str]) -> str:
    return "" if agents is None else agents.replace(",", "→")


def find_summaries(workdirs, skipped: Optional[list] = None) -> list[Path]:
    found = []
    for w in workdirs:
        p = Path(w).expanduser()
        if not p.exists():
            raise UserError(f"workdir {w} does not exist")
        if p.is_file():
            if p.name == "summary.json":
                found.append(p)
            elif skipped is not None:  # e.g. a shell glob that also matched tables.md
                skipped.append(str(w))
        else:
            found.extend(sorted(x for x in p.rglob("summary.json") if x.is_file()))
    seen, out = set(), []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)
    return out


def load_runs(workdirs) -> tuple[list[Run], list[str]]:
    """Every run under the workdirs, one per (cell, seed); duplicates noted."""
    skipped: list = []
    paths = find_summaries(workdirs, skipped)
    if not paths:
        raise UserError(f"no summary.json found under {', '.join(map(str, workdirs))}")
    runs = [make_run(p) for p in paths]
    by = defaultdict(list)
    for r in runs:
        by[(r.key, r.agents, r.seed)].append(r)
    kept, notes = [], ([f"ignored file(s) that are not summary.json: {', '.join(skipped)}"] if skipped else [])
    for (_, _, seed), rs in by.items():
        rs.sort(key=lambda r: (not r.complete, -r.n, str(r.dir)))
        kept.append(rs[0])
        if len(rs) > 1:
            notes.append(f"{len(rs)} runs of the same cell (seed {seed}): used {rs[0].dir}, ignored "
                         + ", ".join(str(r.dir) for r in rs[1:]))
    check_seeds_poolable(kept)
    return kept, notes


# Config fields that may differ between the seeds of one cell: the seed itself, each seed's own
# adapter or fuser, and what changes how a run is computed but not its results.
POOLABLE_FIELDS = {"seed", "lora", "fuser", "batch_size", "prompt_bucket", "bootstrap_resamples", "mesh",
                   "mesh_preset", "device_memory_gib"}


def check_seeds_poolable(runs: list) -> None:
    """The seeds of a cell are averaged, so they must be the same experiment: runs of one
    cell that differ in anything else (limit, sampling, max_new_tokens ...) are refused
    with one line naming the field and two of the runs."""
    from diffmas_jax.config_utils import DEFAULTS
    by = defaultdict(list)
    for r in runs:
        by[(r.key, r.agents)].append(r)
    for rs in by.values():
        first = rs[0]
        for other in rs[1:]:
            for field in sorted((set(first.config) | set(other.config)) - POOLABLE_FIELDS):
                a = first.config.get(field, DEFAULTS.get(field))
                b = other.config.get(field, DEFAULTS.get(field))
                if a != b:
                    raise UserError(f"seeds {first.seed} and {other.seed} of one cell differ in {field} "
                                    f"({json.dumps(a)} vs {json.dumps(b)}: {first.dir}, {other.dir}); "
                                    "their mean would mix two experiments: pass the workdirs of one setting")
            if first.summary.get("n_total") != other.summary.get("n_total"):
                raise UserError(f"seeds {first.seed} and {other.seed} of one cell have different item sets "
                                f"(n_total {first.summary.get('n_total')} vs {other.summary.get('n_total')}: "
                                f"{first.dir}, {other.dir})")


# ------------------------------------------------------------------------ cells
@dataclasses.dataclass
class Cell:
    runs: list

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self.runs)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def n(self) -> int:
        return sum(r.n for r in self.runs)

    @property
    def n_total(self) -> int:
        return sum(int(r.summary.get("n_total") or 0) for r in self.runs)

    @property
    def accuracy(self) -> Optional[float]:
        accs = [r.summary.get("accuracy") for r in self.runs]
        return None if any(a is None for a in accs) else float(np.mean(accs))

    def ci(self) -> tuple:
        if len(self.runs) == 1:
            ci = self.runs[0].summary.get("accuracy_ci95") or [None, None]
            if None not in ci and ci[0] < ci[1]:
                return tuple(ci)
        alike = alike_interval(np.concatenate([r.vector() for r in self.runs]))
        if alike is not None:  # the bootstrap's CI would be a point
            return alike
        return tuple(np.quantile(boot_means(self, np.random.default_rng(BOOT_SEED)), [0.025, 0.975]))


def boot_means(cell: Cell, rng) -> np.ndarray:
    """Bootstrap means of a cell: seeds resampled, then items within each seed."""
    vecs = [r.vector() for r in cell.runs]
    if any(v.size == 0 for v in vecs):
        return np.full(RESAMPLES, np.nan)
    pick = rng.integers(0, len(vecs), size=(RESAMPLES, len(vecs))) if len(vecs) > 1 else \
        np.zeros((RESAMPLES, 1), int)
    per_seed = np.stack([v[rng.integers(0, v.size, size=(RESAMPLES, v.size))].mean(1) for v in vecs], 1)
    return np.take_along_axis(per_seed, pick, 1).mean(1)


def gain(a: Optional[Cell], b: Optional[Cell]) -> dict:
    """a - b in points: paired bootstrap over shared items (one seed each), else unpaired."""
    return dict(_gain(a, b), gain=True)


def _gain(a: Optional[Cell], b: Optional[Cell]) -> dict:
    if a is None or b is None:
        return {"kind": "missing"}
    if not (a.complete and b.complete):
        return {"kind": "incomplete"}
    rng = np.random.default_rng(BOOT_SEED)
    if a.seeds == 1 and b.seeds == 1:
        oa, ob = a.runs[0].outcomes(), b.runs[0].outcomes()
        common = [i for i in oa if i in ob]
        if common:
            d = np.array([oa[i] - ob[i] for i in common])
            means = d[rng.integers(0, d.size, size=(RESAMPLES, d.size))].mean(1)
            lo, hi = np.quantile(means, [0.025, 0.975])
            return {"kind": "gain", "value": 100 * float(d.mean()), "ci": [100 * lo, 100 * hi], "n": len(common),
                    "paired": True}
    diff = boot_means(a, rng) - boot_means(b, rng)
    lo, hi = np.quantile(diff, [0.025, 0.975])
    return {"kind": "gain", "value": 100 * (a.accuracy - b.accuracy), "ci": [100 * lo, 100 * hi],
            "n": min(a.n, b.n), "paired": False}


def acc_entry(cell: Optional[Cell], paper: Optional[float] = None) -> dict:
    if cell is None:
        e = {"kind": "missing"}
    else:
        acc = cell.accuracy
        lo, hi = cell.ci()
        e = {"kind": "acc" if cell.complete else "incomplete",
             "value": None if acc is None else 100 * acc,
             "ci": [None if lo is None or math.isnan(lo) else 100 * lo, None if hi is None or math.isnan(hi) else 100 * hi],
             "n": cell.n, "n_total": cell.n_total, "seeds": cell.seeds, "dirs": [str(r.dir) for r in cell.runs]}
    if paper is not None:
        e["paper"] = paper
    return e


def text_entry(text: str) -> dict:
    return {"kind": "text", "text": text}


# ------------------------------------------------------------------ paper numbers
def load_paper() -> dict:
    return json.loads(resources.files("diffmas_jax").joinpath("data/paper_numbers.json").read_text())


class Paper:
    def __init__(self, data: dict):
        self.data = data
        self.label = data.get("label", "paper")
        self._aliases = {}
        for short, hub in (data.get("models") or {}).items():
            self._aliases[_norm_model(short)] = short
            self._aliases[_norm_model(hub)] = short

    def model(self, label: str) -> Optional[str]:
        return self._aliases.get(_norm_model(label))

    def _rows(self, section: str, model: str, task: str):
        short = self.model(model)
        return [r for r in self.data.get(section, []) if short and r["model"] == short and r["task"] == task]

    def main(self, model, task, method) -> Optional[float]:
        rows = self._rows("main", model, task)
        return rows[0].get(method) if rows else None

    def stitch(self, model, task, method) -> Optional[float]:
        rows = self._rows("stitch_vs_diffmas", model, task)
        return rows[0].get(method) if rows else self.main(model, task, method) if method != "stitch_mas" else None

    def steps(self, model, task, method, m) -> Optional[float]:
        for r in self._rows("latent_steps", model, task):
            if r.get("method") == method and str(m) in r["values"]:
                return r["values"][str(m)]
        if str(m) == "10":
            return self.main(model, task, method)
        return None

    def step_values(self, model, task) -> list:
        return sorted({int(m) for r in self._rows("latent_steps", model, task) for m in r["values"]})

    def tasks_for(self, model) -> list:
        short = self.model(model)
        return sorted({r["task"] for r in self.data.get("main", []) if r["model"] == short})


# ----------------------------------------------------------------------- tables
@dataclasses.dataclass
class Table:
    name: str
    title: str
    header: list
    rows: list                    # [[row labels..., entries...]]; labels are str, entries dicts
    n_labels: int
    notes: list = dataclasses.field(default_factory=list)
    plot: str = "bars"            # bars | lines (columns are latent steps)

    def __post_init__(self):
        # the plot file is <name>.png: a name outside TABLE_NAMES would escape remove_stale_plots
        assert self.name in TABLE_NAMES, f"table {self.name!r} is not in TABLE_NAMES"


class Builder:
    """Tables over runs of one agent configuration per (model, task) (plus Single, which has none)."""

    def __init__(self, runs: list, paper: Paper, main_steps=10, main_trace_grad="stop", comm_tasks=COMM_TASKS,
                 all_paper_rows=False, main_methods=None):
        self.paper = paper
        self.main_methods = main_methods
        self.agents = {}
        for r in runs:
            if r.agents is not None:
                assert self.agents.setdefault((r.model, r.task), r.agents) == r.agents, "one agent set per task"
        self.main_steps, self.main_tg, self.comm_tasks = main_steps, main_trace_grad, tuple(comm_tasks)
        groups = defaultdict(list)
        for r in runs:
            groups[r.key].append(r)
        self.cells = {k: Cell(sorted(v, key=lambda r: r.seed)) for k, v in groups.items()}
        self.all_paper_rows = all_paper_rows

    # cell lookup ------------------------------------------------------------
    def get(self, model, task, method, m=None, tg=None, comm="concat", vis="full") -> Optional[Cell]:
        if method not in LATENT_METHODS:
            m = comm = vis = None
        if method != "diffmas":
            tg = None
        return self.cells.get((model, task, method, m, tg, comm, vis))

    def keys(self, **want):
        fields = ("model", "task", "method", "m", "tg", "comm", "vis")
        for k in self.cells:
            d = dict(zip(fields, k))
            if all(d[f] == v for f, v in want.items()):
                yield d

    def model_tasks(self, comm_benchmark=False):
        pairs = {(k[0], k[1]) for k in self.cells if (k[1] in self.comm_tasks) == comm_benchmark}
        if not comm_benchmark:
            models = {m for m, _ in pairs}
            for model in (models if not self.all_paper_rows else models | set(self._paper_models())):
                pairs |= {(model, t) for t in self.paper.tasks_for(model)}
        return sorted(pairs)

    def _paper_models(self):
        return [model_label(hub) for hub in (self.paper.data.get("models") or {}).values()]

    def pick_steps(self, model, task, comm="concat", vis="full"):
        ms = [d["m"] for d in self.keys(model=model, task=task, comm=comm, vis=vis) if d["method"] in LATENT_METHODS]
        if not ms or self.main_steps in ms:
            return self.main_steps
        counts = Counter(ms)
        return sorted(counts, key=lambda m: (-counts[m], abs(int(m) - int(self.main_steps)) if isinstance(m, int) else 1e9))[0]

    def pick_tg(self, model, task, m, comm="concat", vis="full"):
        tgs = {d["tg"] for d in self.keys(model=model, task=task, method="diffmas", m=m, comm=comm, vis=vis)}
        return self.main_tg if self.main_tg in tgs or not tgs else sorted(tgs)[0]

    def setting(self, model, task, m, tg) -> str:
        has_diffmas = any(True for _ in self.keys(model=model, task=task, method="diffmas"))
        who = agents_label(self.agents.get((model, task)))
        return (f"{who}, " if who else "") + f"m={m}" + (f", trace_grad={tg}" if has_diffmas else "")

    def diffmas_variants(self, model, task, comm=None, vis=None):
        want = {"model": model, "task": task, "method": "diffmas"}
        tgs = {d["tg"] for d in self.keys(**want) if (comm is None or d["comm"] == comm) and (vis is None or d["vis"] == vis)}
        return sorted(tgs, key=lambda t: ("stop", "full", "?").index(t) if t in ("stop", "full", "?") else 9)

    # the tables -------------------------------------------------------------
    def main_table(self) -> Table:
        methods = list(self.main_methods or ["single", "text_mas", "latent_mas", "diffmas"])
        if not self.main_methods and any(k[2] == "c2c" for k in self.cells):
            methods.append("c2c")
        rows = []
        for model, task in self.model_tasks():
            m = self.pick_steps(model, task)
            tg = self.pick_tg(model, task, m)
            cells = {meth: self.get(model, task, meth, m, tg) for meth in methods}
            entries = [acc_entry(cells[meth], self.paper.main(model, task, meth)) for meth in methods]
            g = gain(self.get(model, task, "diffmas", m, tg), self.get(model, task, "single"))
            pd, ps = self.paper.main(model, task, "diffmas"), self.paper.main(model, task, "single")
            if pd is not None and ps is not None:
                g["paper"] = round(pd - ps, 1)
            rows.append([model, task, self.setting(model, task, m, tg), *entries, g])
        return Table("main", "Main results: accuracy (%) with 95% CI and n",
                     ["model", "task", "setting", *[LABELS.get(m, m) for m in methods], "DiffMAS − Single"], rows, 3,
                     notes=["setting: latent steps m of LatentMAS/DiffMAS and DiffMAS's trace_grad; concat, "
                            "full visibility", "DiffMAS − Single: points, paired bootstrap over shared items"])

    def latent_steps_table(self) -> Optional[Table]:
        rows, all_m = [], set()
        specs = []
        for model, task in self.model_tasks():
            ms = {d["m"] for d in self.keys(model=model, task=task, comm="concat", vis="full") if d["m"] is not None}
            paper_ms = self.paper.step_values(model, task)
            if len(ms) < 2 and not (ms and paper_ms):
                continue
            ms |= set(paper_ms)
            all_m |= ms
            specs.append((model, task, ms))
        if not specs:
            return None
        cols = sorted(all_m, key=lambda m: (not isinstance(m, int), m if isinstance(m, int) else 0, str(m)))
        for model, task, own in specs:
            variants = [("latent_mas", None), ("stitch_mas", None)] + \
                [("diffmas", tg) for tg in self.diffmas_variants(model, task, "concat", "full") or [self.main_tg]]
            for meth, tg in variants:
                if meth != "diffmas" and not any(True for _ in self.keys(model=model, task=task, method=meth)):
                    continue
                entries = [acc_entry(self.get(model, task, meth, m, tg), self.paper.steps(model, task, meth, m))
                           if m in own else text_entry("—") for m in cols]
                rows.append([model, task, LABELS[meth] + (f" ({tg})" if tg else ""), *entries])
        return Table("latent_steps", "Latent-steps sweep: accuracy (%) by m", ["model", "task", "method",
                     *[f"m={m}" for m in cols]], rows, 3, plot="lines",
                     notes=["concat, full visibility; DiffMAS rows by trace_grad",
                            "— : m not in this model and task's sweep (neither ours nor the paper's)"])

    def sft_table(self) -> Optional[Table]:
        if not any(k[2] in ("single_sft", "text_mas_sft") for k in self.cells):
            return None
        rows = []
        for model, task in self.model_tasks():
            if not any(True for d in self.keys(model=model, task=task) if d["method"] in ("single_sft", "text_mas_sft")):
                continue
            m = self.pick_steps(model, task)
            tg = self.pick_tg(model, task, m)
            c = {meth: self.get(model, task, meth, m, tg)
                 for meth in ("single", "single_sft", "text_mas", "text_mas_sft", "diffmas")}
            rows.append([model, task, self.setting(model, task, m, tg),
                         *[acc_entry(c[k], self.paper.main(model, task, k)) for k in c],
                         gain(c["diffmas"], c["single_sft"]), gain(c["diffmas"], c["text_mas_sft"])])
        return Table("sft", "Trained without the trace: Single+SFT and TextMAS+SFT vs DiffMAS",
                     ["model", "task", "setting", "Single", "Single+SFT", "TextMAS", "TextMAS+SFT", "DiffMAS",
                      "DiffMAS − Single+SFT", "DiffMAS − TextMAS+SFT"], rows, 3,
                     notes=["same targets, same LoRA; the SFT adapters never see a trace: a DiffMAS gain over "
                            "them is a gain from communication, not from learning the task"])

    def stitch_table(self, paper_only=False) -> Optional[Table]:
        """Rows where StitchMAS was run; with paper_only, the paper's rows that have no StitchMAS run."""
        if not paper_only and not any(k[2] == "stitch_mas" for k in self.cells):
            return None
        rows = []
        for model, task in self.model_tasks():
            ms = sorted({d["m"] for d in self.keys(model=model, task=task, method="stitch_mas", comm="concat",
                                                   vis="full")}, key=str)
            if paper_only:
                ms = [self.pick_steps(model, task)] if not ms and self.paper.stitch(model, task, "stitch_mas") \
                    is not None else []
            for m in ms:
                tg = self.pick_tg(model, task, m)
                c = {k: self.get(model, task, k, m, tg) for k in ("latent_mas", "stitch_mas", "diffmas")}
                rows.append([model, task, self.setting(model, task, m, tg),
                             *[acc_entry(c[k], self.paper.stitch(model, task, k) if m == 10 else None) for k in c],
                             gain(c["diffmas"], c["stitch_mas"])])
        return Table("stitch", "StitchMAS (segments built apart) vs DiffMAS",
                     ["model", "task", "setting", "LatentMAS", "StitchMAS", "DiffMAS", "DiffMAS − StitchMAS"], rows, 3,
                     notes=["each row compares runs with the same agents; with a single upstream agent "
                            "StitchMAS and LatentMAS coincide"])

    def trace_grad_table(self) -> Optional[Table]:
        tgs = {k[4] for k in self.cells if k[2] == "diffmas"}
        if not {"stop", "full"} <= tgs:
            return None
        rows = []
        # Where full was run, plus the main setting of every (model, task) that has a full run.
        settings = {(d["model"], d["task"], d["m"], d["comm"], d["vis"]) for d in self.keys(method="diffmas", tg="full")}
        settings |= {(mo, t, self.pick_steps(mo, t), "concat", "full") for mo, t, *_ in settings}
        for model, task, m, comm, vis in sorted(settings, key=str):
            stop, full = (self.get(model, task, "diffmas", m, t, comm, vis) for t in ("stop", "full"))
            who = agents_label(self.agents.get((model, task)))
            rows.append([model, task, f"{who}, m={m}, {comm}, {vis}", acc_entry(stop), acc_entry(full),
                         gain(full, stop)])
        return Table("trace_grad", "DiffMAS trace_grad: stop (trace is a constant) vs full (through upstream agents)",
                     ["model", "task", "setting", "stop", "full", "full − stop"], rows, 3)

    def communication_table(self) -> Optional[Table]:
        if not any(k[5] == "overwrite" for k in self.cells):
            return None
        rows = []
        combos = sorted({(d["model"], d["task"], d["method"], d["m"], d["tg"], d["vis"])
                         for d in self.keys() if d["comm"] is not None}, key=str)
        with_overwrite = {(d["model"], d["task"], d["m"], d["vis"]) for d in self.keys(comm="overwrite")}
        for model, task, meth, m, tg, vis in combos:
            if (model, task, m, vis) not in with_overwrite or meth == "stitch_mas":
                continue
            concat, over = (self.get(model, task, meth, m, tg, c, vis) for c in ("concat", "overwrite"))
            who = agents_label(self.agents.get((model, task)))
            rows.append([model, task, LABELS[meth] + (f" ({tg})" if tg else ""), f"{who}, m={m}, {vis}",
                         acc_entry(concat), acc_entry(over), gain(over, concat)])
        return Table("communication", "Concatenated vs overwritten communication",
                     ["model", "task", "method", "setting", "concat", "overwrite", "overwrite − concat"], rows, 4,
                     notes=["overwrite: each agent sees only the previous agent's segment (Proposition 3.1)"])

    def comm_benchmark_table(self) -> Optional[Table]:
        pairs = self.model_tasks(comm_benchmark=True)
        if not pairs:
            return None
        ms = sorted({d["m"] for d in self.keys() if d["task"] in self.comm_tasks and d["m"] is not None}, key=str)
        ms = sorted(ms, key=lambda m: (not isinstance(m, int), m if isinstance(m, int) else 0))
        rows = []
        for model, task in pairs:
            present = {(d["method"], d["tg"], d["comm"], d["vis"]) for d in self.keys(model=model, task=task)}
            order = sorted(present, key=lambda p: (METHOD_ORDER.index(p[0]) if p[0] in METHOD_ORDER else 99,
                                                   str(p[1:])))
            for meth, tg, comm, vis in order:
                label = LABELS.get(meth, meth) + (f" ({tg})" if tg else "")
                if meth in LATENT_METHODS:
                    label += f" [{vis}" + (f", {comm}" if comm != "concat" else "") + "]"
                    entries = [text_entry("—")] + [acc_entry(self.get(model, task, meth, m, tg, comm, vis)) for m in ms]
                else:
                    entries = [acc_entry(self.get(model, task, meth))] + [text_entry("—")] * len(ms)
                rows.append([model, task, label, *entries])
        return Table("comm_benchmark", "Communication benchmark (facts only upstream): accuracy (%) by m",
                     ["model", "task", "method", "no trace", *[f"m={m}" for m in ms]], rows, 3, plot="lines",
                     notes=["Single sees no facts; TextMAS's solver reads the upstream agents' text; latent methods "
                            "with [latent_only] let the solver attend only to upstream latent slots",
                            "— : not applicable (the method has no latent steps, or no trace)"])

    def cost_table(self, runs) -> Table:
        rows = []
        for r in sorted(runs, key=lambda r: (r.model, r.task, METHOD_ORDER.index(r.method)
                                             if r.method in METHOD_ORDER else 99, str(r.latent_steps), r.seed)):
            s, tok = r.summary, r.summary.get("tokens_per_question") or {}
            num = lambda v, f: text_entry(format(v, f) if isinstance(v, (int, float)) else "missing")
            setting = ", ".join(x for x in (agents_label(r.agents),
                                            f"m={r.latent_steps}" if r.latent_steps is not None else "",
                                            r.trace_grad or "", r.communication if r.communication == "overwrite" else "",
                                            r.visibility if r.visibility == "latent_only" else "", f"seed {r.seed}") if x)
            rows.append([r.model, r.task, LABELS.get(r.method, r.method), setting,
                         num(tok.get("prompt"), ".0f"), num(tok.get("generated"), ".1f"),
                         num(tok.get("latent_slots"), ".0f"), num(s.get("seconds_per_question"), ".2f"),
                         text_entry(f"{r.n}/{s.get('n_total', '?')}" + ("" if r.complete else " incomplete"))])
        return Table("cost", "Cost per question", ["model", "task", "method", "setting", "prompt tok/q",
                     "generated tok/q", "latent slots/q", "s/q", "items"], rows, 4, plot="none",
                     notes=["seconds are wall time of the machine that ran each cell"])


def main_agents(runs) -> dict:
    """(model, task) -> the agent set most of its runs use (ties: alphabetical)."""
    counts = Counter((r.model, r.task, r.agents) for r in runs if r.agents is not None)
    out: dict = {}
    for (model, task, agents), _ in sorted(counts.items(), key=lambda x: (-x[1], str(x[0]))):
        out.setdefault((model, task), agents)
    return out


def _merge(tables: list) -> Optional[Table]:
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    rows = [row for t in tables for row in t.rows]
    return dataclasses.replace(tables[0], rows=sorted(rows, key=lambda r: [str(x) for x in r[:tables[0].n_labels]]))


def build_tables(runs, paper: Optional[Paper] = None, **kw) -> list[Table]:
    """Main-type tables use each (model, task)'s main agent set; the trace_grad and
    concat/overwrite ablations report every agent set that has runs."""
    paper = paper or Paper(load_paper())
    main = main_agents(runs)
    with_agents = lambda keep: [r for r in runs if r.agents is None or keep(r)]
    b = Builder(with_agents(lambda r: main[(r.model, r.task)] == r.agents), paper, **kw)
    per_set = [Builder(with_agents(lambda r, a=a: r.agents == a), paper, **kw)
               for a in sorted({r.agents for r in runs if r.agents is not None})]
    tables = [b.main_table(), b.latent_steps_table(), b.sft_table(), _merge([x.stitch_table() for x in per_set] + [b.stitch_table(paper_only=True)]),
              _merge([x.trace_grad_table() for x in per_set]), _merge([x.communication_table() for x in per_set]),
              b.comm_benchmark_table(), b.cost_table(runs)]
    return [t for t in tables if t is not None and t.rows]


# ------------------------------------------------------------------------ render
def _pct(v) -> str:
    return "?" if v is None else f"{v:.1f}"


def fmt_entry(e: dict) -> str:
    """Markdown text of a cell."""
    k = e["kind"]
    if k == "text":
        return e["text"]
    paper = "" if e.get("paper") is None else \
        f" · paper {e['paper']:+.1f}" if e.get("gain") else f" · paper {e['paper']:.1f}"
    if k in ("missing",):
        return "missing" + paper
    if k == "incomplete" and "value" not in e:
        return "incomplete" + paper
    lo, hi = e["ci"]
    if k == "gain":
        return f"{e['value']:+.1f} [{lo:+.1f}, {hi:+.1f}] (n={e['n']})" + paper
    seeds = f", {e['seeds']} seeds" if e.get("seeds", 1) > 1 else ""
    if k == "incomplete":
        return f"incomplete: {_pct(e['value'])} [{_pct(lo)}, {_pct(hi)}] (n={e['n']}/{e['n_total']}{seeds})" + paper
    return f"{_pct(e['value'])} [{_pct(lo)}, {_pct(hi)}] (n={e['n']}{seeds})" + paper


def to_markdown(tables: list[Table], notes=(), paper: Optional[Paper] = None) -> str:
    out = []
    for t in tables:
        out.append(f"## {t.title}\n")
        out.append("| " + " | ".join(t.header) + " |")
        out.append("|" + "---|" * len(t.header))
        for row in t.rows:
            out.append("| " + " | ".join(x if isinstance(x, str) else fmt_entry(x) for x in row) + " |")
        if t.notes:
            out.append("")
            out.extend(f"* {n}" for n in t.notes)
        out.append("")
    if paper is not None:
        out.append(f"`paper X`: the number the paper reports for that cell, from {paper.data.get('provenance', '')}. "
                   "`missing`: no run; `incomplete`: the run has not finished (its partial value is shown and "
                   "used in no gain).\n")
    if notes:
        out.append("## Notes on the inputs\n")
        out.extend(f"* {n}" for n in notes)
        out.append("")
    return "\n".join(out)


_TEX_ESC = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def tex(s: str) -> str:
    s = "".join(_TEX_ESC.get(ch, ch) for ch in str(s))
    return s.replace("−", "$-$").replace("—", "---").replace("·", r"$\cdot$").replace("→", r"$\to$")


def tex_entry(e: dict) -> str:
    k = e["kind"]
    if k == "text":
        return tex(e["text"])
    paper = ""
    if e.get("paper") is not None:
        paper = r" \textcolor{gray}{(" + (f"{e['paper']:+.1f}" if e.get("gain") else f"{e['paper']:.1f}") + ")}"
    if k == "missing":
        return r"\textit{missing}" + paper
    if k == "incomplete" and "value" not in e:
        return r"\textit{incomplete}" + paper
    lo, hi = e["ci"]
    if k == "gain":
        body = f"{e['value']:+.1f} {{\\scriptsize [{lo:+.1f}, {hi:+.1f}] n={e['n']}}}"
    else:
        seeds = f", {e['seeds']} seeds" if e.get("seeds", 1) > 1 else ""
        n = f"n={e['n']}/{e['n_total']}" if k == "incomplete" else f"n={e['n']}"
        body = f"{_pct(e['value'])} {{\\scriptsize [{_pct(lo)}, {_pct(hi)}] {n}{seeds}}}"
        if k == "incomplete":
            body = r"\textit{incompl.} " + body
    return body + paper


def to_latex(tables: list[Table], paper: Optional[Paper] = None) -> str:
    out = ["% Generated by python -m diffmas_jax.tables; needs \\usepackage{booktabs,xcolor}.",
           "% Cells: accuracy (%) {\\scriptsize [95% CI] n}; gray (x): the paper's reported number "
           "(third-party reading); missing: no run.", ""]
    for t in tables:
        cols = "l" * t.n_labels + "c" * (len(t.header) - t.n_labels)
        out += [r"\begin{table}[t]", r"\centering", r"\scriptsize", r"\setlength{\tabcolsep}{3pt}",
                f"\\caption{{{tex(t.title)}}}", f"\\label{{tab:{t.name}}}",
                f"\\begin{{tabular}}{{{cols}}}", r"\toprule",
                " & ".join(tex(h) for h in t.header) + r" \\", r"\midrule"]
        for row in t.rows:
            out.append(" & ".join(tex(x) if isinstance(x, str) else tex_entry(x) for x in row) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def to_json(tables: list[Table], notes=()) -> str:
    return json.dumps({"tables": [{"name": t.name, "title": t.title, "header": t.header, "rows": t.rows,
                                   "notes": t.notes} for t in tables], "input_notes": list(notes)}, indent=1)


# ------------------------------------------------------------------------- plots
def _plot_bars(t: Table, path: Path, plt) -> bool:
    acc_cols = [j for j in range(t.n_labels, len(t.header))
                if all(not isinstance(r[j], str) and not r[j].get("gain") and r[j]["kind"] != "text" for r in t.rows)]
    if not any(not isinstance(r[j], str) and r[j]["kind"] == "acc" for r in t.rows for j in acc_cols):
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(t.rows) * len(acc_cols) / 2 + 2), 3.8))
    width = 0.8 / len(acc_cols)
    for c, j in enumerate(acc_cols):
        xs, ys, lo, hi, xs_p, ys_p = [], [], [], [], [], []
        for i, row in enumerate(t.rows):
            e = row[j]
            x = i + (c - (len(acc_cols) - 1) / 2) * width
            if e["kind"] in ("acc", "incomplete") and e.get("value") is not None:
                xs.append(x)
                ys.append(e["value"])
                lo.append(e["value"] - (e["ci"][0] if e["ci"][0] is not None else e["value"]))
                hi.append((e["ci"][1] if e["ci"][1] is not None else e["value"]) - e["value"])
                tag = f"{e['value']:.1f}" + (" incompl." if e["kind"] == "incomplete" else "")
                ax.text(x, 0.5, tag, rotation=90, ha="center", va="bottom", fontsize=6)
            else:
                ax.text(x, 1, "missing", rotation=90, ha="center", va="bottom", fontsize=6, color="gray")
            if e.get("paper") is not None:
                xs_p.append(x)
                ys_p.append(e["paper"])
        hatch = ["//" if row[j]["kind"] == "incomplete" else "" for row in t.rows if row[j].get("value") is not None]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=t.header[j], color=f"C{c}", alpha=0.85,
               hatch=hatch or None)
        if xs_p:
            ax.plot(xs_p, ys_p, "kx", markersize=6, label="paper (3rd-party reading)")
    ax.set_xticks(range(len(t.rows)))
    ax.set_xticklabels(["\n".join(str(x) for x in r[:t.n_labels]) for r in t.rows], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(t.title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _plot_lines(t: Table, path: Path, plt) -> bool:
    steps = []
    for j, h in enumerate(t.header):
        m = re.fullmatch(r"m=(\d+)", h)
        if m:
            steps.append((j, int(m.group(1))))
    if not steps:
        return False
    groups = defaultdict(list)
    for row in t.rows:
        groups[tuple(row[:2])].append(row)
    drawn = False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, ((model, task), rows) in zip(axes[0], groups.items()):
        for row in rows:
            pts = [(m, row[j]) for j, m in steps if not isinstance(row[j], str) and row[j]["kind"] == "acc"]
            if pts:
                drawn = True
                xs = [m for m, _ in pts]
                ys = [e["value"] for _, e in pts]
                err = [[e["value"] - (e["ci"][0] if e["ci"][0] is not None else e["value"]) for _, e in pts],
                       [(e["ci"][1] if e["ci"][1] is not None else e["value"]) - e["value"] for _, e in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=row[2])
            paper = [(m, row[j]["paper"]) for j, m in steps if not isinstance(row[j], str) and row[j].get("paper") is not None]
            if paper:
                ax.plot(*zip(*paper), "k--x", label=f"{row[2]}: paper (3rd-party)")
            flat = [row[j] for j in range(t.n_labels, len(row)) if not isinstance(row[j], str)
                    and not re.fullmatch(r"m=\d+", t.header[j]) and row[j]["kind"] == "acc"]
            for e in flat:  # methods without latent steps: a horizontal reference line
                drawn = True
                ax.axhline(e["value"], linestyle=":", color="gray")
                ax.text(steps[0][1], e["value"], f" {row[2]}", fontsize=7, va="bottom", color="gray")
        ax.set_title(f"{model} · {task}", fontsize=9)
        ax.set_xlabel("latent steps m")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return drawn


def write_plots(tables: list[Table], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for t in tables:
        path = out / f"{t.name}.png"
        tmp = out / f".{t.name}.tmp.png"   # drawn aside, then moved over the old plot: never half-written
        try:
            ok = _plot_bars(t, tmp, plt) if t.plot == "bars" else _plot_lines(t, tmp, plt) if t.plot == "lines" \
                else False
            if ok:
                os.replace(tmp, path)
                written.append(path)
        finally:
            tmp.unlink(missing_ok=True)
    return written


def remove_stale_plots(out: Path, keep) -> list[Path]:
    """Remove the plots an earlier run drew into ``out`` that this run did not draw (only
    <table name>.png files tables itself makes; any other file stays)."""
    keep = {Path(p).name for p in keep}
    removed = []
    for name in TABLE_NAMES:
        p = out / f"{name}.png"
        if p.name not in keep and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def _write_text(path: Path, text: str) -> None:
    """Write a whole file or leave the old one: the text goes to a temporary file moved over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_out_dir(out: Path) -> None:
    """--out is a directory, or can be made one: checked before any work (one error line)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise UserError(f"--out {out}: {out / name} is a directory; tables writes a file there")
    anc = out
    while not anc.exists() and anc != anc.parent:   # the nearest part of the path that exists
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"--out {out}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {anc} is not writable")


# -------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmas_jax.tables", description=__doc__.splitlines()[0])
    ap.add_argument("--workdirs", nargs="+", required=True,
                    help="directories searched recursively for evaluation summary.json files")
    ap.add_argument("--out", default=None, help="write tables.md, tables.tex, tables.json and PNG plots here (an earlier "
                    "run's <table>.png that this run does not draw is removed; other files stay)")
    ap.add_argument("--main-latent-steps", type=int, default=10,
                    help="m of LatentMAS/DiffMAS in the main, SFT and stitch tables (a (model, task) without "
                         "runs at this m uses its most common m)")
    ap.add_argument("--main-trace-grad", default="stop", choices=("stop", "full"),
                    help="DiffMAS trace_grad in the main table, when both were run")
    ap.add_argument("--comm-tasks", default=",".join(COMM_TASKS),
                    help="tasks reported as the communication benchmark, not in the main tables")
    ap.add_argument("--all-paper-rows", action="store_true",
                    help="main table: also the paper's (model, task) rows for models with no run")
    ap.add_argument("--methods", default=None,
                    help="main table's method columns, comma separated (default: single,text_mas,latent_mas,"
                         "diffmas, and c2c when there are c2c runs)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    methods = [m.strip().replace("+sft", "_sft") for m in args.methods.split(",") if m.strip()] if args.methods \
        else None
    unknown = [m for m in methods or [] if m not in LABELS]
    if unknown:
        raise UserError(f"unknown method(s) {unknown} in --methods; known: {', '.join(LABELS)}")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        check_out_dir(out)
    runs, notes = load_runs(args.workdirs)
    incomplete = [r for r in runs if not r.complete]
    if incomplete:
        notes.append(f"{len(incomplete)} incomplete run(s): " + ", ".join(str(r.dir) for r in incomplete))
    paper = Paper(load_paper())
    tables = build_tables(runs, paper, main_steps=args.main_latent_steps, main_trace_grad=args.main_trace_grad,
                          comm_tasks=[t for t in args.comm_tasks.split(",") if t], all_paper_rows=args.all_paper_rows,
                          main_methods=methods)
    md = to_markdown(tables, notes, paper)
    print(md)
    if out is not None:
        texts = {"tables.md": md, "tables.tex": to_latex(tables, paper), "tables.json": to_json(tables, notes)}
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():   # each file whole (old or new), all rendered before the first write
            _write_text(out / name, text)
        pngs = [] if args.no_plots else write_plots(tables, out)
        stale = remove_stale_plots(out, pngs)   # an earlier run's plots would not match these tables
        print(f"wrote {out / 'tables.md'}, tables.tex, tables.json" +
              (f" and {', '.join(p.name for p in pngs)}" if pngs else "") +
              (f"; removed the earlier run's {', '.join(p.name for p in stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
