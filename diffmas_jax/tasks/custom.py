"""A user's own JSONL file as a task.

One JSON object per line:
  question  (required) the question text
  answer    (required) free-form: the gold answer (string or number);
            multiple choice: a letter ("B"), a 1-based label string ("2"), the text
            of one option, or a 0-based integer index (2 -> "C")
  choices   (optional) list of option texts -> a multiple-choice item, any number >= 2
  target    (optional) a supervised target; "The answer is \\boxed{gold}." is appended
            when it has no \\boxed{}; without one a short boxed target is made
  id        (optional) unique id; default "jsonl/<line position>"
Other fields are kept in Item.meta. A file holds either only multiple-choice or
only free-form items, so the task has one answer format.
"""
from __future__ import annotations

from pathlib import Path

from .base import (CHOICE_INSTRUCTION, MATH_INSTRUCTION, Item, Row, Task, TaskError,
                   choice_target, format_choice_question, read_jsonl, require)
from .scoring import LETTERS, extract_boxed, label_to_letter


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str | None = None, kind: str = "text"):
        if kind not in ("text", "math"):
            raise TaskError(f"jsonl: kind for free-form items must be 'text' or 'math', got {kind!r}")
        self.path, self.free_kind, self.kind = path, kind, kind

    @property
    def answer_instruction(self) -> str:
        return CHOICE_INSTRUCTION if self.kind == "choice" else MATH_INSTRUCTION

    def load(self, split: str = "test", data_dir: str | None = None,
             limit: int | None = None) -> list[Item]:
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a positive integer, got {limit!r}")
        if self.path is not None:
            path = Path(self.path)
        elif data_dir is not None:
            path = Path(data_dir) / f"{split}.jsonl"
        else:
            raise TaskError("jsonl: pass path=<file.jsonl> (or data_dir containing <split>.jsonl)")
        if path.is_dir():
            raise TaskError(f"jsonl: {path} is a directory, not a .jsonl file")
        if not path.is_file():
            raise TaskError(f"jsonl: file {path} not found")
        rows = read_jsonl(path)
        if not rows:
            raise TaskError(f"{path}: no items in dataset")
        items, seen = [], {}
        for i, row in enumerate(rows):
            item = self.make_item(row, i, split)
            if item.id in seen:
                raise TaskError(f"{row[0]}: duplicate id {item.id!r} (first at {seen[item.id]})")
            seen[item.id] = row[0]
            if items and (item.kind == "choice") != (items[0].kind == "choice"):
                raise TaskError(f"{row[0]}: mixes multiple-choice and free-form items; "
                                "put them in separate files")
            items.append(item)
        self.kind = items[0].kind
        return items[:limit] if limit else items

    def make_item(self, row: Row, index: int, split: str) -> Item:
        where, rec = row
        question = require(row, "question")
        answer = require(row, "answer", (str, int, float))
        item_id = str(rec["id"]) if rec.get("id") is not None else f"jsonl/{index}"
        target = rec.get("target")
        if target is not None and not isinstance(target, str):
            raise TaskError(f"{where}: field 'target' must be str, got {type(target).__name__}")
        meta = {k: v for k, v in rec.items()
                if k not in ("question", "answer", "choices", "target", "id")}
        if rec.get("choices") is None:
            gold = str(answer).strip()
            target = self._boxed(target, gold)
            return Item(item_id, question.strip(), gold, self.free_kind, target=target, meta=meta)
        choices = require(row, "choices", list)
        if len(choices) < 2 or len(choices) > len(LETTERS):
            raise TaskError(f"{where}: field 'choices' needs 2 to 26 options, got {len(choices)}")
        if not all(isinstance(c, (str, int, float)) for c in choices):
            raise TaskError(f"{where}: field 'choices' must be a list of option texts")
        options = [str(c).strip() for c in choices]
        gold = self._choice_gold(row, answer, options)
        if target is None:
            target = choice_target(gold, options[LETTERS.index(gold)])
        else:
            target = self._boxed(target, gold)
        return Item(item_id, format_choice_question(question, options), gold, "choice",
                    choices=tuple(options), target=target, meta=meta)

    @staticmethod
    def _boxed(target: str | None, gold: str) -> str:
        box = f"The answer is \\boxed{{{gold}}}."
        if target is None or not target.strip():
            return box
        return target if extract_boxed(target) is not None else f"{target.rstrip()}\n{box}"

    @staticmethod
    def _choice_gold(row: Row, answer, options: list[str]) -> str:
        n = len(options)
        if isinstance(answer, int) and not isinstance(answer, bool):
            if 0 <= answer < n:
                return LETTERS[answer]
            raise TaskError(f"{row[0]}: answer index {answer} is out of range for {n} choices")
        text = str(answer).strip()
        letter = label_to_letter(text, n) if len(text.strip("()." )) == 1 else None
        if letter:
            return letter
        hits = [i for i, o in enumerate(options) if o.casefold() == text.casefold()]
        if len(hits) == 1:
            return LETTERS[hits[0]]
        raise TaskError(f"{row[0]}: answer {text!r} is not a letter, label or the text of "
                        f"one of its {n} choices")
