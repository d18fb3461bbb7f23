"""Table builder: cells land in place, missing and incomplete cells never read as zero."""
import json

from diffmas_jax.tables import accuracy_table, load_summaries


def write(tmp_path, name, task, method, acc, complete=True, lora=None):
    d = tmp_path / name
    d.mkdir()
    s = {"complete": complete, "n": 10 if complete else 4, "n_total": 10, "accuracy": acc,
         "accuracy_ci95": [acc - 0.1, acc + 0.1], "tokens_per_question": {"prompt": 50, "generated": 9},
         "seconds_per_question": 1.0, "config": {"task": task, "method": method, "lora": lora}}
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_cells_missing_and_incomplete(tmp_path):
    dirs = [write(tmp_path, "a", "gsm8k", "single", 0.2), write(tmp_path, "b", "gsm8k", "latent_mas", 0.3),
            write(tmp_path, "c", "arc_easy", "single", 0.5, complete=False),
            write(tmp_path, "d", "arc_easy", "single", 0.4, lora="/x") , tmp_path / "nothing"]
    rows = load_summaries(dirs)
    table = accuracy_table(rows, ["single", "latent_mas", "single+sft"])
    lines = table.splitlines()
    assert lines[2] == "| arc_easy | incomplete (4/10) | missing | 40.0 [30.0, 50.0] (n=10) |"
    assert lines[3] == "| gsm8k | 20.0 [10.0, 30.0] (n=10) | 30.0 [20.0, 40.0] (n=10) | missing |"
