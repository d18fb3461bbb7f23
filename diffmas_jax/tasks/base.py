"""Task interface: items, loading (local files or the Hub), extraction and scoring."""
from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import scoring


class TaskError(ValueError):
    """Bad task input: unknown task, missing file, malformed record. One clear line."""


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str
    kind: str                   # "math" | "choice" | "code" | "text"
    choices: tuple = ()
    target: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)


MATH_INSTRUCTION = "Put only the final answer inside \\boxed{}, e.g. \\boxed{42}."
CHOICE_INSTRUCTION = ("Answer with the letter of the correct option inside \\boxed{}, "
                      "e.g. \\boxed{B}.")
CODE_INSTRUCTION = "Write the complete Python function in one ```python code block."

Row = tuple[str, dict]  # (where, record): where = "path:line" or "hub_id[index]"


# ------------------------------------------------------------------------ readers

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else \
        open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise TaskError(f"{path}:{lineno}: expected a JSON object, got "
                                    f"{type(rec).__name__}")
                rows.append((f"{path}:{lineno}", rec))
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TaskError(f"{path}: cannot read ({e})") from None
    return rows


def read_json_array(path: Path) -> list[Row]:
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a JSON array of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise TaskError(f"{path}: record {i} is not a JSON object")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def read_csv(path: Path) -> list[Row]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return [(f"{path}:{reader.line_num}", dict(rec)) for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaskError(f"{path}: cannot read CSV ({e})") from None


def read_file(path: Path) -> list[Row]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        return read_jsonl(path)
    if name.endswith(".json"):
        return read_json_array(path)
    if name.endswith(".csv"):
        return read_csv(path)
    raise TaskError(f"{path}: unsupported file type (expected .jsonl, .json or .csv)")


def read_hub(hub_id: str, config: str | None, split: str, task: str) -> list[Row]:
    """Rows of a Hugging Face dataset split (network or the local HF cache)."""
    try:
        import datasets
        ds = datasets.load_dataset(hub_id, config)
    except Exception as e:  # any failure here has the same remedy
        msg = str(e).splitlines()[0] if str(e) else ""
        raise TaskError(f"{task}: cannot load '{hub_id}' from the Hugging Face Hub "
                        f"({type(e).__name__}: {msg}); pass data_dir= for a local copy") from None
    if split not in ds:
        if len(ds) != 1:
            raise TaskError(f"{task}: '{hub_id}' has no split '{split}' (has {sorted(ds)})")
        split = next(iter(ds))  # single-split datasets (AIME, GPQA) name it "train"
    return [(f"{hub_id}:{split}[{i}]", dict(rec)) for i, rec in enumerate(ds[split])]


# ------------------------------------------------------------------ field helpers

def require(row: Row, name: str, types: type | tuple = str) -> Any:
    where, rec = row
    if name not in rec or rec[name] is None:
        raise TaskError(f"{where}: missing required field '{name}'")
    value = rec[name]
    if not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise TaskError(f"{where}: field '{name}' must be {want}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise TaskError(f"{where}: field '{name}' is empty")
    return value


def first_field(row: Row, *names: str) -> str:
    """The first of several accepted field names (local and Hub copies differ)."""
    for name in names:
        if row[1].get(name) is not None:
            return name
    raise TaskError(f"{row[0]}: missing required field '{names[0]}'")


def format_choice_question(stem: str, options: list[str]) -> str:
    lines = [stem.strip()] + [f"{scoring.LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def choice_target(letter: str, option: str, explanation: str | None = None) -> str:
    parts = [explanation.strip()] if explanation and explanation.strip() else []
    parts.append(f"The correct option is {letter}: {option.strip().rstrip('.')}.\n"
                 f"The answer is \\boxed{{{letter}}}.")
    return "\n\n".join(parts)


def make_choice_item(row: Row, item_id: str, stem: str, options: list[str], gold_index: int,
                     explanation: str | None = None, **meta) -> Item:
    where = row[0]
    options = [str(o).strip() for o in options]
    if len(options) < 2:
        raise TaskError(f"{where}: a multiple-choice item needs at least 2 options, got {len(options)}")
    if len(options) > len(scoring.LETTERS):
        raise TaskError(f"{where}: too many options ({len(options)} > 26)")
    if not 0 <= gold_index < len(options):
        raise TaskError(f"{where}: answer index {gold_index} is out of range for "
                        f"{len(options)} options")
    letter = scoring.LETTERS[gold_index]
    return Item(id=item_id, question=format_choice_question(stem, options), gold=letter,
                kind="choice", choices=tuple(options),
                target=choice_target(letter, options[gold_index], explanation), meta=meta)


# -------------------------------------------------------------------------- tasks

class Task:
    """A benchmark: how to load it, what the solver must output, how to score it.

    Subclasses set name/kind/splits, where the local files are (`local_files`),
    the Hub source (`hub`), and turn one raw record into an Item (`make_item`).
    """

    name: str = ""
    kind: str = "math"
    answer_instruction: str = MATH_INSTRUCTION
    splits: tuple[str, ...] = ("test",)
    hub: tuple[str, str | None] | None = None     # (dataset id, config)
    hub_splits: dict[str, str] = {}               # our split -> Hub split name
    generated: bool = False                       # items made by code: no data_dir, no Hub
    unique_source_ids: bool = True                # False: ids are positions

    def __init__(self, **options):
        if options:
            raise TaskError(f"task '{self.name}' takes no options, got {sorted(options)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"

    # ----- loading
    def local_files(self, split: str) -> list[str]:
        raise NotImplementedError

    def make_item(self, row: Row, index: int, split: str) -> Item:
        raise NotImplementedError

    def load(self, split: str = "test", data_dir: str | None = None,
             limit: int | None = None) -> list[Item]:
        if split not in self.splits:
            raise TaskError(f"task '{self.name}' has no split '{split}' "
                            f"(supported: {', '.join(self.splits)})")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a positive integer, got {limit!r}")
        if data_dir is not None:
            path = self.resolve_local(split, Path(data_dir))
            rows, source = read_file(path), str(path)
        else:
            if self.hub is None:
                raise TaskError(f"task '{self.name}' has no Hugging Face source; pass data_dir=")
            rows = read_hub(self.hub[0], self.hub[1], self.hub_splits.get(split, split), self.name)
            source = self.hub[0]
        items = [self.make_item(row, i, split) for i, row in enumerate(rows)]
        if not items:
            raise TaskError(f"{source}: no items in dataset")
        if len({it.id for it in items}) != len(items):
            # positions are stable as long as the file is; source ids were not unique
            items = [Item(f"{self.name}/{split}/{i}", it.question, it.gold, it.kind, it.choices,
                          it.target, it.meta) for i, it in enumerate(items)]
        return items[:limit] if limit else items

    def resolve_local(self, split: str, data_dir: Path) -> Path:
        """Path of the split's file: data_dir is the shared data root or the task's folder."""
        if not data_dir.is_dir():
            raise TaskError(f"data_dir {data_dir} does not exist or is not a directory")
        candidates = self.local_files(split)
        for rel in candidates:
            for path in (data_dir / rel, data_dir / Path(rel).name):
                if path.is_file():
                    return path
        raise TaskError(f"{self.name}: data file {data_dir / candidates[0]} not found")

    # ----- answers
    numeric: bool = False  # numeric answers: last-number fallback, value comparison

    def extract(self, text: str, item: Item | None = None) -> str:
        """The prediction in `text`; with an item, choice extraction also matches option texts."""
        kind = item.kind if item is not None else self.kind
        if kind == "choice":
            choices = item.choices if item is not None else ()
            return scoring.extract_choice(text or "", choices)
        if kind == "code":
            return scoring.extract_code(text or "")
        return scoring.extract_math(text or "", numeric=self.numeric)

    def is_correct(self, item: Item, prediction: str) -> bool:
        if not prediction:
            return False
        if item.kind == "choice":
            return prediction == item.gold
        if self.numeric:
            return scoring.numbers_equal(prediction, item.gold)
        if item.kind == "text":
            return scoring.text_equal(prediction, item.gold)
        return scoring.math_equal(prediction, item.gold)

    def score(self, item: Item, text: str) -> dict:
        pred = self.extract(text, item)
        return {"prediction": pred, "correct": self.is_correct(item, pred)}


def positional_id(task: str, split: str, index: int) -> str:
    return f"{task}/{split}/{index}"


def iter_option_lines(text: str) -> Iterator[tuple[str, str]]:
    """("A", "bank") for each "A. bank" / "A) bank" line of a question text."""
    for line in text.splitlines():
        m = re.match(r"^\s*\(?([A-Z])[.)]\s+(.*\S)\s*$", line)
        if m:
            yield m.group(1), m.group(2)
