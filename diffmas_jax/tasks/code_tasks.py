"""Code benchmarks (EvalPlus MBPP+ and HumanEval+): generated code runs in the sandbox."""
from __future__ import annotations

import math
import re

from .base import CODE_INSTRUCTION, Item, Row, Task, TaskError, require
from .sandbox import run_code
from .scoring import extract_code


def _fence(code: str) -> str:
    return f"```python\n{code.strip(chr(10))}\n```"


class CodeTask(Task):
    kind = "code"
    answer_instruction = CODE_INSTRUCTION

    def __init__(self, timeout_s: float = 30.0, memory_mb: int = 4096):
        # 4 GiB of address space like EvalPlus: some reference solutions need over 2 GiB
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise TaskError(f"task option timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
            raise TaskError(f"task option memory_mb must be a positive integer (MiB), got {memory_mb!r}")
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)

    def program(self, item: Item, code: str) -> str:
        """The solution followed by the item's tests, as one script."""
        raise NotImplementedError

    def score(self, item: Item, text: str) -> dict:
        code = extract_code(text or "", item.meta.get("entry_point"))
        if not code.strip():
            return {"prediction": code, "correct": False, "status": "empty"}
        res = run_code(self.program(item, code), timeout_s=self.timeout_s,
                       memory_mb=self.memory_mb)
        return {"prediction": code, "correct": res.status == "passed", "status": res.status,
                "stderr": res.stderr[-2000:], "duration_s": round(res.duration_s, 3)}


# Tests of the released data that score every answer the same; each repair leaves a correct
# reference passing and a wrong answer failing (tests/test_tasks.py).
_UNCHECKED_MATCH = "        exact_match = exp == (out is not None)\n"


def _repair_mbpp_test(test: str) -> str:
    """Mbpp/737, 787, 794: the assertion helper computes exact_match but never asserts it,
    so any function with the right name passed."""
    if _UNCHECKED_MATCH in test and "assert exact_match" not in test:
        test = test.replace(_UNCHECKED_MATCH, _UNCHECKED_MATCH + "    assert exact_match\n", 1)
    return test


def _repair_humaneval_test(test: str) -> str:
    """HumanEval/32: `_poly(*candidate(*inp), inp)` raises for every float answer, so no
    answer passed; the intended check is |poly(xs, root)| <= 1e-4."""
    return test.replace("assert _poly(*candidate(*inp), inp) <= 0.0001",
                        "assert abs(_poly(*inp, candidate(*inp))) <= 0.0001")


class MBPPPlus(CodeTask):
    name = "mbppplus"
    hub = ("evalplus/mbppplus", None)

    def local_files(self, split):
        return ["mbppplus/MbppPlus-OriginFmt.jsonl.gz", "mbppplus/MbppPlus-OriginFmt.jsonl",
                f"mbppplus/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        rec = row[1]
        prompt, code, test = require(row, "prompt"), require(row, "code"), require(row, "test")
        examples = require(row, "test_list", list)
        imports = rec.get("test_imports") or []
        defined = re.findall(r"^def\s+(\w+)\s*\(", code, re.MULTILINE)
        # the function under test is the one the example test calls first (the full test may
        # also hold a copy of the reference with its helpers: Mbpp/630's adjac)
        shown = examples[0] if examples else test
        called = sorted((m.start(), name) for name in defined
                        if (m := re.search(rf"\b{name}\s*\(", shown)))
        if not called:
            called = [(0, name) for name in defined if re.search(rf"\b{name}\s*\(", test)]
        entry = called[0][1] if called else (defined[-1] if defined else "")
        if not entry:
            raise TaskError(f"{row[0]}: field 'code' defines no function")
        question = prompt.strip()
        if examples:
            question += f"\nThe function must be named {entry} and pass this test:\n{examples[0]}"
        tid = rec.get("task_id")
        item_id = f"Mbpp/{tid}" if isinstance(tid, int) else str(tid)
        return Item(item_id, question, "", "code", target=_fence(code),
                    meta={"test": _repair_mbpp_test(test), "test_imports": list(imports), "entry_point": entry,
                          "test_list": list(examples)})

    def program(self, item: Item, code: str) -> str:
        imports = "\n".join(item.meta.get("test_imports", []))
        return f"{imports}\n{code}\n\n{item.meta['test']}\n"


class HumanEvalPlus(CodeTask):
    name = "humanevalplus"
    hub = ("evalplus/humanevalplus", None)

    def local_files(self, split):
        return ["humanevalplus/HumanEvalPlus-OriginFmt.jsonl.gz",
                "humanevalplus/HumanEvalPlus-OriginFmt.jsonl", f"humanevalplus/{split}.jsonl"]

    def make_item(self, row: Row, index: int, split: str) -> Item:
        prompt, solution = require(row, "prompt"), require(row, "canonical_solution")
        entry, test = require(row, "entry_point"), require(row, "test")
        question = f"Complete this Python function:\n\n```python\n{prompt.rstrip()}\n```"
        return Item(str(require(row, "task_id")), question, "", "code",
                    target=_fence(prompt + solution),
                    meta={"prompt": prompt, "test": _repair_humaneval_test(test), "entry_point": entry})

    def program(self, item: Item, code: str) -> str:
        prompt, entry = item.meta["prompt"], item.meta["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            # a full function: keep the prompt first for its imports and helper
            # functions; the solution's definition replaces the docstring-only stub
            body = f"{prompt}\n\n{code}"
        else:
            body = prompt + code  # a body-only completion continues the prompt
        return f"{body}\n\n{item.meta['test']}\n\ncheck({entry})\n"
