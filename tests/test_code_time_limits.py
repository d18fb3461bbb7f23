"""Per-item time limits of the code tasks: an answer that times out under timeout_s is run
again under limit_factor x the reference solution's runtime (timed lazily, once per item)."""
import math
import pickle
import threading
import time

import pytest

from diffmas_jax.tasks import TaskError, get_task
from diffmas_jax.tasks import code_tasks
from diffmas_jax.tasks.base import Item
from diffmas_jax.tasks.sandbox import SandboxResult


def _fence(code):
    return f"```python\n{code}\n```"


def mbpp_item(reference, item_id="T/1", test="assert f(3) == 3\n"):
    return Item(item_id, "q", "", "code", target=_fence(reference) if reference is not None else None,
                meta={"test": test, "test_imports": ["import time"], "entry_point": "f"})


def humaneval_item(solution, item_id="HE/1"):
    prompt = 'import time\n\n\ndef f(x):\n    """Return x."""\n'
    return Item(item_id, "q", "", "code", target=_fence(prompt + solution),
                meta={"prompt": prompt, "entry_point": "f",
                      "test": "def check(candidate):\n    assert candidate(3) == 3\n"})


SLOW_REF = "def f(x):\n    time.sleep(1.2)\n    return x\n"
FAST_REF = "def f(x):\n    return x\n"
LOOP = "```python\ndef f(x):\n    while True:\n        pass\n```"


@pytest.fixture
def calls(monkeypatch):
    """Every sandbox run of code_tasks, as (program, timeout_s)."""
    seen = []
    real = code_tasks.run_code

    def counting(code, timeout_s=10, *a, **k):
        seen.append((code, timeout_s))
        return real(code, timeout_s, *a, **k)
    monkeypatch.setattr(code_tasks, "run_code", counting)
    return seen


@pytest.mark.parametrize("name", ["mbppplus", "humanevalplus"])
def test_slow_correct_answer_passes_under_the_reference_based_limit(name, calls):
    task = get_task(name, timeout_s=1)
    if name == "mbppplus":
        item = mbpp_item(SLOW_REF)
        answer = "```python\ndef f(x):\n    time.sleep(1.5)\n    return x\n```"
    else:
        item = humaneval_item("    time.sleep(1.2)\n    return x\n")
        answer = "    time.sleep(1.5)\n    return x\n"  # a body-only completion
    res = task.score(item, answer)
    assert res["correct"] and res["status"] == "passed", res
    assert res["reference_status"] == "passed" and res["reference_s"] >= 1.2
    assert res["timeout_s"] == math.ceil(2.0 * res["reference_s"]) + 1 > 1.0
    assert res["duration_s"] >= 1.5
    # answer under timeout_s, the reference under its cap, the answer again under the new limit
    assert [t for _, t in calls] == [1.0, task.reference_cap_s, res["timeout_s"]]
    assert "sleep(1.2)" in calls[1][0]


def test_endless_answer_still_times_out_and_the_reference_is_timed_once(calls):
    task = get_task("mbppplus", timeout_s=1)
    item = mbpp_item(FAST_REF)
    first = task.score(item, LOOP)
    second = task.score(item, LOOP)
    for res in (first, second):
        assert res["status"] == "timeout" and not res["correct"]
        assert res["reference_status"] == "passed"
        assert res["timeout_s"] == math.ceil(2.0 * res["reference_s"]) + 1 > 1.0
    assert second["reference_s"] == first["reference_s"]
    refs = [c for c in calls if "return x" in c[0]]
    # the second answer starts at the derived limit: no second run under timeout_s
    limit = first["timeout_s"]
    assert len(refs) == 1 and [t for _, t in calls] == [1.0, task.reference_cap_s, limit, limit]


@pytest.mark.parametrize("reference, cap, status", [
    ("def f(x):\n    return x + 1\n", None, "failed"),
    ("def f(x):\n    time.sleep(60)\n", 1.5, "timeout"),
    (None, None, "missing"),
])
def test_reference_that_does_not_pass_leaves_the_timeout(reference, cap, status, calls):
    task = get_task("mbppplus", timeout_s=1, reference_cap_s=cap)
    res = task.score(mbpp_item(reference), LOOP)
    assert res["status"] == "timeout" and not res["correct"]
    assert res["reference_status"] == status and res["timeout_s"] == 1.0
    assert len(calls) == (1 if reference is None else 2)  # the answer is not run again


def test_answers_that_do_not_time_out_never_time_the_reference(calls):
    task = get_task("mbppplus", timeout_s=3)  # room for a busy host: these all end in well under 1 s
    item = mbpp_item(SLOW_REF)
    for answer, status in (("```python\ndef f(x):\n    return 0\n```", "failed"),
                           ("```python\ndef f(x):\n    return x\n```", "passed"),
                           ("```python\ndef f(x):\n    raise ValueError\n```", "failed")):
        res = task.score(item, answer)
        assert res["status"] == status and res["timeout_s"] == 3.0
        assert "reference_s" not in res and "reference_status" not in res
    assert len(calls) == 3 and all(t == 3.0 for _, t in calls)
    assert task.score(item, "")["status"] == "empty" and len(calls) == 3


def test_limit_options_are_checked():
    task = get_task("mbppplus", limit_factor=3, reference_cap_s=60)
    assert (task.limit_factor, task.reference_cap_s) == (3.0, 60.0)
    assert get_task("humanevalplus", timeout_s=40).reference_cap_s == 400.0
    assert get_task("humanevalplus").reference_cap_s == 300.0
    assert get_task("humanevalplus").limit_factor == 2.0
    for bad in (0, 0.5, -2, float("nan"), float("inf"), True, "2", None):
        with pytest.raises(TaskError, match=r"^task option limit_factor must be a finite number >= 1") as e:
            get_task("mbppplus", limit_factor=bad)
        assert "\n" not in str(e.value)
    for bad in (0, -1, float("inf"), False, "60"):
        with pytest.raises(TaskError, match=r"^task option reference_cap_s must be a finite number of seconds"):
            get_task("humanevalplus", reference_cap_s=bad)


def test_reference_cache_across_threads_and_pickling(monkeypatch):
    """Scorers in threads share one timing per item; a pickled task (a worker process)
    keeps the timings it had and times the rest itself."""
    runs = []

    def fake(code, timeout_s=10, memory_mb=None, **k):
        if "return x" in code:  # the reference
            runs.append(code)
            time.sleep(0.2)
            return SandboxResult("passed", 0, "", "", 0.4)
        return SandboxResult("timeout" if timeout_s < 2 else "passed", None, "", "", timeout_s)
    monkeypatch.setattr(code_tasks, "run_code", fake)
    task = get_task("mbppplus", timeout_s=1)
    item = mbpp_item(FAST_REF)
    out = []
    threads = [threading.Thread(target=lambda: out.append(task.score(item, LOOP))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and len(out) == 6
    assert all(r["correct"] and r["timeout_s"] == 2.0 and r["reference_s"] == 0.4 for r in out)
    copy = pickle.loads(pickle.dumps(task))
    assert copy.score(item, LOOP)["reference_s"] == 0.4 and len(runs) == 1
    assert copy.score(mbpp_item(FAST_REF, "T/2"), LOOP)["correct"] and len(runs) == 2


def _fake_sandbox(monkeypatch, reference_results, answer_s=None):
    """run_code stand-in: the reference (its program holds 'return x') gets the next of
    ``reference_results`` (status, seconds); an answer times out unless its limit covers
    ``answer_s``. Returns the (kind, timeout_s) log."""
    log, pending = [], list(reference_results)

    def fake(code, timeout_s=10, memory_mb=None, **k):
        if "return x" in code:
            log.append(("reference", timeout_s))
            status, secs = pending.pop(0)
            return SandboxResult(status, 0, "", "", secs)
        log.append(("answer", timeout_s))
        if answer_s is not None and answer_s <= timeout_s:
            return SandboxResult("passed", 0, "", "", answer_s)
        return SandboxResult("timeout", None, "", "", timeout_s)
    monkeypatch.setattr(code_tasks, "run_code", fake)
    return log


def test_a_fast_reference_gives_no_rerun(monkeypatch):
    """A reference whose derived limit is not above timeout_s: the timeout stands after one run."""
    log = _fake_sandbox(monkeypatch, [("passed", 0.4)])
    task = get_task("mbppplus", timeout_s=3)
    res = task.score(mbpp_item(FAST_REF), LOOP)
    assert res["status"] == "timeout" and res["timeout_s"] == 3.0 and res["reference_s"] == 0.4
    assert log == [("answer", 3.0), ("reference", task.reference_cap_s)]
    assert task.score(mbpp_item(FAST_REF), LOOP)["timeout_s"] == 3.0 and log[-1] == ("answer", 3.0)


def test_a_sandbox_error_timing_the_reference_is_not_kept(monkeypatch):
    log = _fake_sandbox(monkeypatch, [("error", 0.0), ("passed", 2.0)], answer_s=4.5)
    task = get_task("mbppplus", timeout_s=1)
    first = task.score(mbpp_item(FAST_REF), LOOP)
    assert first["status"] == "timeout" and first["reference_status"] == "error" and first["timeout_s"] == 1.0
    second = task.score(mbpp_item(FAST_REF), LOOP)  # timed again: the error was the sandbox's, not the item's
    assert second["correct"] and second["reference_status"] == "passed" and second["timeout_s"] == 5.0
    assert [kind for kind, _ in log] == ["answer", "reference", "answer", "reference", "answer"]


def test_items_sharing_an_id_do_not_share_a_timing(monkeypatch):
    """User split files may reuse ids: the timing is keyed on the reference program too."""
    log = _fake_sandbox(monkeypatch, [("passed", 4.0), ("passed", 0.1)])
    task = get_task("mbppplus", timeout_s=1)
    slow = task.score(mbpp_item(FAST_REF, "X/1", test="assert f(3) == 3\n"), LOOP)
    other = task.score(mbpp_item(FAST_REF, "X/1", test="assert f(4) == 4\n"), LOOP)
    assert (slow["reference_s"], slow["timeout_s"]) == (4.0, 9.0)
    assert (other["reference_s"], other["timeout_s"]) == (0.1, 2.0)
    assert [kind for kind, _ in log].count("reference") == 2


def test_evaluate_keeps_each_code_run_in_the_record(monkeypatch):
    """items.jsonl keeps what decided a code verdict: the sandbox status, the limit it ran
    under and the reference's timing, for the primary answer and for every sample."""
    from types import SimpleNamespace
    from diffmas_jax.evaluate import make_record
    _fake_sandbox(monkeypatch, [("passed", 2.0)], answer_s=4.5)
    task = get_task("mbppplus", timeout_s=1)
    item = mbpp_item(FAST_REF)
    rec = {"prompt_tokens": 3, "generated_tokens": 2}
    batch = SimpleNamespace(texts=[LOOP], records=[rec])
    record = make_record(task, item, 0, [([7], batch)], 0, 0.1, 0)
    assert record["correct"] and record["code_run"] == {
        "status": "passed", "duration_s": 4.5, "timeout_s": 5.0, "reference_s": 2.0, "reference_status": "passed"}
    record = make_record(task, item, 0, [([7], batch), ([8], batch)], 0, 0.1, 0)
    assert [s_["code_run"]["timeout_s"] for s_ in record["samples"]] == [5.0, 5.0]
    plain = make_record(get_task("arith", size=4), get_task("arith", size=4).load("test", limit=1)[0], 0,
                        [([7], SimpleNamespace(texts=["42"], records=[rec]))], 0, 0.1, 0)
    assert "code_run" not in plain
