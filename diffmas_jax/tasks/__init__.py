"""Benchmarks: loading (local copies or the Hugging Face Hub), answer formats, scoring.

    task = get_task("gsm8k")
    items = task.load("test", data_dir="../shared/data", limit=10)
    task.score(items[0], model_output)  # {"prediction": ..., "correct": ...}
"""
from __future__ import annotations

import inspect

from .base import Item, Task, TaskError
from .choice_tasks import ARC, CommonsenseQA, GPQADiamond, MedQA, OpenBookQA
from .comm import Communication
from .code_tasks import HumanEvalPlus, MBPPPlus
from .custom import JsonlTask
from .math_tasks import AIME, GSM8K, MATH500
from .synthetic import Arithmetic

_FACTORIES = {
    "gsm8k": GSM8K,
    "aime24": lambda **o: AIME("aime24", "HuggingFaceH4/aime_2024", **o),
    "aime25": lambda **o: AIME("aime25", "yentinglin/aime_2025", **o),
    "gpqa_diamond": GPQADiamond,
    "arc_easy": lambda **o: ARC("arc_easy", "Easy", **o),
    "arc_challenge": lambda **o: ARC("arc_challenge", "Challenge", **o),
    "openbookqa": OpenBookQA,
    "commonsenseqa": CommonsenseQA,
    "medqa": MedQA,
    "mbppplus": MBPPPlus,
    "humanevalplus": HumanEvalPlus,
    "math500": MATH500,
    "jsonl": JsonlTask,
    "arith": Arithmetic,
    "comm": Communication,
}
TASK_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_task(name: str, **options) -> Task:
    """A task by name. Options: jsonl takes path= and kind=; code tasks take
    timeout_s= and memory_mb= (sandbox limits), limit_factor= (default 2: an answer that
    times out is run again under max(timeout_s, ceil(limit_factor x the reference's
    runtime) + 1 s)) and reference_cap_s= (the cap on timing the reference, default
    max(10 x timeout_s, 300)); arith takes size= and seed=; comm takes size=, seed=,
    n_facts= and op=; the others take none."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in _FACTORIES:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    factory = _FACTORIES[key]
    if inspect.isclass(factory):
        params = inspect.signature(factory.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            bad = sorted(set(options) - set(params) - {"self"})
            if bad:
                raise TaskError(f"task '{key}' does not take option(s) {bad}; "
                                f"accepted: {sorted(set(params) - {'self'})}")
    return factory(**options)


def is_generated(name: str) -> bool:
    """Whether the task makes its items in code (reads no data_dir); False for unknown names."""
    return bool(getattr(_FACTORIES.get(str(name).strip().lower().replace("-", "_")), "generated", False))


__all__ = ["Item", "Task", "TaskError", "TASK_NAMES", "get_task", "is_generated"]
