"""Multiple-choice benchmarks: ARC, OpenBookQA, CommonsenseQA, MedQA, GPQA-Diamond.

Every item is normalised to options lettered A, B, C, ... by position, whatever
labels the source uses (ARC mixes A-E and 1-5), and gold is that letter.
"""
from __future__ import annotations

import hashlib
import random
import re

from .base import (Item, Row, Task, TaskError, CHOICE_INSTRUCTION, first_field,
                   iter_option_lines, make_choice_item, positional_id, require)


def _labelled(row: Row, choices) -> tuple[list[str], list[str]]:
    """(labels, texts) from [{text, label}, ...] (local ARC) or {text: [], label: []} (Hub)."""
    if isinstance(choices, dict) and "text" in choices:
        texts, labels = list(choices["text"]), [str(x) for x in choices.get("label") or []]
    elif isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
        texts, labels = [c.get("text") for c in choices], [str(c.get("label")) for c in choices]
    else:
        raise TaskError(f"{row[0]}: field 'choices' has an unexpected format")
    if any(t is None for t in texts) or len(labels) != len(texts):
        raise TaskError(f"{row[0]}: field 'choices' needs a text and a label for every option")
    return labels, [str(t) for t in texts]


def _index_of_label(row: Row, labels: list[str], key) -> int:
    key = str(key).strip()
    if key not in labels:
        raise TaskError(f"{row[0]}: answer key '{key}' is not one of the labels {labels}")
    return labels.index(key)


class ChoiceTask(Task):
    kind = "choice"
    answer_instruction = CHOICE_INSTRUCTION


class ARC(ChoiceTask):
    splits = ("train", "validation", "test")
    _files = {"train": "Train", "validation": "Dev", "test": "Test"}

    def __init__(self, name: str, variant: str, **options):
        self.name, self.variant = name, variant
        self.hub = ("allenai/ai2_arc", f"ARC-{variant}")
        super().__init__(**options)

    def local_files(self, split):
        return [f"arc/ARC-{self.variant}-{self._files[split]}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        q = rec.get("question")
        if isinstance(q, dict):                       # local: question{stem, choices}
            stem, choices = q.get("stem"), q.get("choices")
        else:                                         # Hub: question + choices{text, label}
            stem, choices = q, rec.get("choices")
        if not stem or choices is None:
            raise TaskError(f"{row[0]}: missing required field 'question'")
        labels, texts = _labelled(row, choices)
        gold = _index_of_label(row, labels, require(row, "answerKey"))
        return make_choice_item(row, str(rec.get("id") or positional_id(self.name, split, index)),
                                stem, texts, gold, source_labels=labels)


class OpenBookQA(ChoiceTask):
    name = "openbookqa"
    hub = ("allenai/openbookqa", "main")

    def local_files(self, split):
        return [f"openbookqa/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        if "question_stem" in rec:                    # Hub format
            labels, texts = _labelled(row, require(row, "choices", dict))
            gold = _index_of_label(row, labels, require(row, "answerKey"))
            stem = require(row, "question_stem")
        else:                                         # local: query, choices[], gold index
            stem, texts = require(row, "query"), require(row, "choices", list)
            gold = require(row, "gold", int)
        item_id = str(rec.get("id") or positional_id(self.name, split, index))
        return make_choice_item(row, item_id, stem, texts, gold)


class CommonsenseQA(ChoiceTask):
    """Labelled test answers are not public; "test" is the validation split."""

    name = "commonsenseqa"
    splits = ("test", "validation")
    hub = ("tau/commonsense_qa", None)
    hub_splits = {"test": "validation"}

    def local_files(self, split):
        return ["commonsenseqa/validation.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        if "query" in rec:  # local: options are lines "A. text" inside the query
            query = require(row, "query")
            options = list(iter_option_lines(query))
            if len(options) < 2:
                raise TaskError(f"{row[0]}: field 'query' has no 'A. option' lines")
            m = re.search(r"(?:Question:\s*)?(.*?)\n\s*(?:Choices:|A\.)", query, re.DOTALL)
            stem = (m.group(1) if m else query).strip()
            texts = [t for _, t in options]
            gold = require(row, "gold", int)
        else:
            labels, texts = _labelled(row, require(row, "choices", dict))
            gold = _index_of_label(row, labels, require(row, "answerKey"))
            stem = require(row, "question")
        item_id = str(rec.get("id") or positional_id(self.name, split, index))
        return make_choice_item(row, item_id, stem, texts, gold)


class MedQA(ChoiceTask):
    """MedQA subset (4 options); gold is the answer text; `idx` repeats, so ids are positions."""

    name = "medqa"

    def local_files(self, split):
        return ["medqa/medqa.json", "medqa/test.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        text = require(row, first_field(row, "question", "query"))
        options = [re.sub(r"^\s*\(?[A-Z][.)]\s*", "", str(o)).strip()
                   for o in require(row, "options", list)]
        # the stem is followed by the lettered options (sometimes twice)
        stem = re.split(r"\n\s*A[.)]\s", text, maxsplit=1)[0].strip()
        answer = str(require(row, "answer", (str, int))).strip()
        norm = lambda s: re.sub(r"\s+", " ", s).strip().casefold()
        hits = [i for i, o in enumerate(options) if norm(o) == norm(answer)]
        if len(hits) != 1:
            letter_hits = [i for i in range(len(options)) if answer.upper().strip("().") == chr(65 + i)]
            hits = letter_hits
        if len(hits) != 1:
            raise TaskError(f"{row[0]}: answer {answer!r} matches none of the options")
        return make_choice_item(row, positional_id(self.name, split, index), stem, options, hits[0])


class GPQADiamond(ChoiceTask):
    """GPQA-Diamond: one correct and three incorrect answers, shuffled per item.

    The shuffle is seeded by the item id, so every run and machine sees the same
    option order, and it differs between items (the correct answer is not always A).
    """

    name = "gpqa_diamond"
    hub = ("Idavidrein/gpqa", "gpqa_diamond")

    def local_files(self, split):
        return [f"gpqa_diamond/{split}.jsonl", f"gpqa_diamond/{split}.csv",
                "gpqa_diamond/gpqa_diamond.csv"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        question = require(row, "Question")
        correct = require(row, "Correct Answer")
        wrong = [require(row, f"Incorrect Answer {k}") for k in (1, 2, 3)]
        item_id = str(rec.get("Record ID") or positional_id(self.name, split, index)).strip()
        seed = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big")
        order = list(range(4))
        random.Random(seed).shuffle(order)
        options = [([correct] + wrong)[j].strip() for j in order]
        explanation = rec.get("Explanation")
        return make_choice_item(row, item_id, question, options, order.index(0),
                                explanation=explanation if isinstance(explanation, str) else None)
