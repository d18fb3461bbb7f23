"""A task the project generates itself: short multi-step arithmetic word problems.

Fully offline and deterministic (seeded), with worked solutions as targets, so
the DiffMAS demo can train and evaluate without any download.
"""
from __future__ import annotations

import random

from .base import Item, Task, TaskError

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas"]
_THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def make_problem(rng: random.Random) -> tuple[str, str, str]:
    """(question, gold, worked target) with 2-3 operations on small numbers."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    total = rng.randint(3, 20)
    lines = [f"{name} has {total} {thing}."]
    steps = []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["gain", "lose", "double"] if total <= 30 else ["gain", "lose"])
        if op == "gain":
            n = rng.randint(2, 15)
            lines.append(f"Then {name} gets {n} more.")
            steps.append(f"{total} + {n} = {total + n}.")
            total += n
        elif op == "lose" and total > 2:
            n = rng.randint(1, total - 1)
            lines.append(f"Then {name} gives away {n}.")
            steps.append(f"{total} - {n} = {total - n}.")
            total -= n
        else:
            lines.append(f"Then the number of {thing} doubles.")
            steps.append(f"{total} * 2 = {total * 2}.")
            total *= 2
    question = " ".join(lines) + f" How many {thing} does {name} have now?"
    target = " ".join(steps) + f"\nThe answer is \\boxed{{{total}}}."
    return question, str(total), target


class Arithmetic(Task):
    name = "arith"
    generated = True
    numeric = True
    splits = ("train", "test")

    def __init__(self, size: int = 2000, seed: int = 0):
        if size < 1:
            raise TaskError(f"arith size must be positive, got {size}")
        self.size, self.seed = size, seed
        super().__init__()

    def load(self, split: str = "test", data_dir: str | None = None, limit: int | None = None) -> list[Item]:
        if split not in self.splits:
            raise TaskError(f"task 'arith' has no split '{split}' (supported: train, test)")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a positive integer, got {limit!r}")
        # Disjoint streams for train and test; data_dir is ignored (nothing to read).
        rng = random.Random(f"{self.seed}-{split}")
        n = min(limit or self.size, self.size)
        items = []
        for i in range(n):
            q, gold, target = make_problem(rng)
            items.append(Item(f"arith/{split}/{i}", q, gold, "math", target=target))
        return items
