"""Free-form math benchmarks: GSM8K, AIME 2024/2025, MATH-500."""
from __future__ import annotations

import re

from .base import Item, Row, Task, TaskError, first_field, positional_id, require
from .scoring import canonical_number, extract_boxed


def _boxed_sentence(gold: str) -> str:
    return f"The answer is \\boxed{{{gold}}}."


class GSM8K(Task):
    name = "gsm8k"
    numeric = True
    splits = ("train", "test")
    hub = ("openai/gsm8k", "main")

    def local_files(self, split):
        return [f"gsm8k/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        question, answer = require(row, "question"), require(row, "answer")
        m = re.search(r"####\s*(.+?)\s*$", answer)
        if m is None:
            raise TaskError(f"{row[0]}: field 'answer' does not end with '#### <answer>'")
        gold = canonical_number(m.group(1))
        # <<48/2=24>> are calculator annotations for the original data collection
        steps = re.sub(r"<<[^<>]*>>", "", answer[:m.start()]).strip()
        target = f"{steps}\n{_boxed_sentence(gold)}" if steps else _boxed_sentence(gold)
        return Item(positional_id(self.name, split, index), question.strip(), gold, "math",
                    target=target)


class AIME(Task):
    """AIME problems: integer answers 0-999 (local copies may zero-pad: '025')."""

    numeric = True

    def __init__(self, name: str, hub_id: str, **options):
        self.name, self.hub = name, (hub_id, None)
        super().__init__(**options)

    def local_files(self, split):
        return [f"{self.name}/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        where, rec = row
        question = require(row, first_field(row, "problem", "question"))
        gold = canonical_number(str(require(row, "answer", (str, int))))
        solution = rec.get("solution")
        worked = isinstance(solution, str) and solution.strip() and \
            canonical_number(solution.strip()) != gold  # some copies store just the answer
        target = f"{solution.strip()}\n\n{_boxed_sentence(gold)}" if worked else _boxed_sentence(gold)
        item_id = f"{self.name}/{rec['id']}" if rec.get("id") is not None else \
            positional_id(self.name, split, index)
        return Item(item_id, question.strip(), gold, "math", target=target,
                    meta={"target_source": "solution" if worked else "answer",
                          "url": rec.get("url")})


class MATH500(Task):
    name = "math500"
    hub = ("HuggingFaceH4/MATH-500", None)

    def local_files(self, split):
        return [f"math500/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        question, solution = require(row, "problem"), require(row, "solution")
        gold = str(require(row, "answer", (str, int))).strip()
        target = solution.strip()
        if extract_boxed(target) is None:
            target += "\n" + _boxed_sentence(gold)
        item_id = str(rec.get("unique_id") or positional_id(self.name, split, index))
        return Item(item_id, question.strip(), gold, "math", target=target,
                    meta={"subject": rec.get("subject"), "level": rec.get("level")})
