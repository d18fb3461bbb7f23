"""A benchmark where communication is necessary: the facts go to the upstream agents only.

Each problem is a few facts ("Ava has 7 marbles. Ben has 12 marbles. ...") and a
question about them ("How many marbles does Ben have?"). The item's question is an
``agents.Question`` whose context gives the facts to the upstream roles only: the
solver's prompt holds the question alone, and Single (one agent) never sees them.
Run the latent methods with ``visibility = latent_only`` so the solver reads only the
upstream agents' latent slots, not their prompt tokens: the answer then reaches the
solver only if the latent steps (or, for TextMAS, the written notes) carry it.

Options: ``op`` = lookup (one person's count) | sum (two people together) | mixed;
``n_facts`` people per problem; ``size`` items per split; ``seed``. Offline and
deterministic; train and test are disjoint streams; targets are worked answers.
"""
from __future__ import annotations

import random

from diffmas_jax.agents import Question

from .base import Item, Task, TaskError

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam"]
_THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]
OPS = ("lookup", "sum", "mixed")


def make_problem(rng: random.Random, n_facts: int, op: str) -> tuple[str, str, str, str]:
    """(facts, question, gold, worked target)."""
    thing = rng.choice(_THINGS)
    names = rng.sample(_NAMES, n_facts)
    counts = [rng.randint(2, 40) for _ in names]
    facts = " ".join(f"{n} has {c} {thing}." for n, c in zip(names, counts))
    if op == "mixed":
        op = rng.choice(["lookup", "sum"])
    if op == "lookup" or n_facts < 2:
        i = rng.randrange(n_facts)
        question = f"How many {thing} does {names[i]} have?"
        gold = counts[i]
        target = f"{names[i]} has {counts[i]} {thing}."
    else:
        i, j = sorted(rng.sample(range(n_facts), 2))
        question = f"How many {thing} do {names[i]} and {names[j]} have together?"
        gold = counts[i] + counts[j]
        target = f"{names[i]} has {counts[i]} and {names[j]} has {counts[j]}, so {counts[i]} + {counts[j]} = {gold}."
    return facts, question, str(gold), target + f"\nThe answer is \\boxed{{{gold}}}."


class Communication(Task):
    name = "comm"
    generated = True
    numeric = True
    splits = ("train", "test")

    def __init__(self, size: int = 2000, seed: int = 0, n_facts: int = 3, op: str = "lookup"):
        if not isinstance(size, int) or size < 1:
            raise TaskError(f"comm size must be a positive integer, got {size!r}")
        if not isinstance(n_facts, int) or not 1 <= n_facts <= len(_NAMES):
            raise TaskError(f"comm n_facts must be in 1..{len(_NAMES)}, got {n_facts!r}")
        if op not in OPS:
            raise TaskError(f"comm op must be one of {', '.join(OPS)}, got {op!r}")
        self.size, self.seed, self.n_facts, self.op = size, seed, n_facts, op
        super().__init__()

    def load(self, split: str = "test", data_dir: str | None = None, limit: int | None = None) -> list[Item]:
        if split not in self.splits:
            raise TaskError(f"task 'comm' has no split '{split}' (supported: train, test)")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a positive integer, got {limit!r}")
        # data_dir is ignored: the problems are generated.
        rng = random.Random(f"comm-{self.seed}-{self.n_facts}-{self.op}-{split}")
        items = []
        for i in range(min(limit or self.size, self.size)):
            facts, question, gold, target = make_problem(rng, self.n_facts, self.op)
            items.append(Item(f"comm/{split}/{i}", Question(question, {"upstream": facts}), gold, "math",
                              target=target, meta={"facts": facts}))
        return items
