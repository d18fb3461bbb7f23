"""Evaluate one method on one benchmark; an interrupted run resumes where it stopped.

    python -m diffmas_jax.evaluate --config configs/embedded_eval.py --workdir runs/eval
        [--config.method=single --config.task=arc_easy --config.limit=20 ...]

The workdir holds:
  config.json    the resolved config (a later run with different results-changing
                 fields is refused instead of mixing results)
  items.jsonl    one JSON line per finished item, appended and fsynced per batch
  summary.json   accuracy with a 95% bootstrap CI (Wilson where every item is alike), tokens,
                 time, decoding stability,
                 every config value and library versions; rewritten (atomically) after
                 every batch, with complete=true once every item is done.

Batches are fixed slices of the item list (items 0..B-1, B..2B-1, ...). With sampling,
each item draws from its own key, a hash of the seed, its index in the item list and
the sample index (``item_seed``), so no row depends on its batch company, greedy or
sampled: a resumed run decodes only the missing items, each exactly as an uninterrupted
run would, and a changed batch_size leaves every sample as it was.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

from absl import flags
from ml_collections import config_flags

from diffmas_jax import config_utils, distributed, metrics
from diffmas_jax.cli import UserError, check_workdir_path, enable_compilation_cache, run_cli

ITEMS, SUMMARY, CONFIG = "items.jsonl", "summary.json", "config.json"
CI_SEED = 0


# ------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a whole file so readers see the old or the new version, never a mix."""
    if not distributed.is_main_process():
        return  # on a pod only process 0 writes the workdir
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_line(rec: dict) -> bytes:
    return (json.dumps(rec, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _is_count(x) -> bool:
    return config_utils.is_finite_number(x) and x >= 0


def _is_number_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


def record_ok(rec) -> bool:
    """Whether an items.jsonl record holds every field the summary reads, with usable types
    (a line with an id but without them is damage, not a finished item)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), (str, int)) or isinstance(rec.get("id"), bool):
        return False
    if not isinstance(rec.get("correct"), bool):
        return False
    if not all(_is_count(rec.get(k)) for k in ("prompt_tokens", "generated_tokens")):
        return False
    if not all(_is_count(rec[k]) for k in ("latency_s", "latent_slots", "answer_tokens") if k in rec):
        return False
    if not all(_is_number_list(rec[k]) for k in ("generated_logprobs", "generated_entropy") if k in rec):
        return False
    if "samples" in rec:
        samples = rec["samples"]
        if not isinstance(samples, list) or not samples or not all(
                isinstance(x, dict) and isinstance(x.get("correct"), bool) and _is_count(x.get("generated_tokens"))
                and _is_number_list(x.get("generated_logprobs")) for x in samples):
            return False
        if not isinstance(rec.get("majority_correct"), bool) or not _is_count(rec.get("agreement")):
            return False
    return True


def read_items(path: Path, check=None) -> tuple[dict, bool]:
    """Finished records by id (file order) and whether the file needs repairing.

    A last line that does not parse (or lacks the fields of a finished item, see
    record_ok) is the torn tail of an interrupted append: it is dropped (its item is
    run again). A bad line anywhere else is real damage and is refused. Repeated ids
    keep their first record. ``check(rec)``: whether a parsed line is a usable record
    (default: a JSON object with an id; evaluate passes record_ok).
    """
    path = Path(path)
    if not path.exists():
        return {}, False
    data = path.read_bytes()
    if not data:
        return {}, False
    lines = data.split(b"\n")
    repair = lines[-1] != b""  # no final newline: the last append did not finish
    if not repair:
        lines.pop()
    done: dict = {}
    for i, line in enumerate(lines):
        if not line.strip():
            repair = True
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and (check is None or check(rec))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            ok = False
        if not ok:
            if i == len(lines) - 1:
                repair = True
                continue
            raise UserError(f"{path}:{i + 1}: damaged line before the end of the file; "
                            "fix or remove it, or use a new workdir")
        if rec["id"] in done:
            repair = True
            continue
        done[rec["id"]] = rec
    return done, repair


def rewrite_items(path: Path, done: dict) -> None:
    atomic_write(path, b"".join(_json_line(r) for r in done.values()))


def append_items(path: Path, records: list[dict]) -> None:
    """One write per batch, flushed and fsynced before the summary says it is done."""
    if not distributed.is_main_process():
        return  # on a pod only process 0 writes the workdir
    with open(path, "ab") as f:
        f.write(b"".join(_json_line(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def check_previous_config(workdir: Path, cfg: dict, has_results: bool = True) -> Optional[dict]:
    """Refuse a workdir that holds results of a run with different behaviour, or a
    config.json that is not an evaluation's (a model's, a training run's), which this
    run would overwrite.

    ``has_results=False`` (items.jsonl holds no finished item, e.g. a first run that
    failed before its first batch): nothing could be mixed, so any evaluation config
    may start over.
    """
    cfg_path = workdir / CONFIG
    if not cfg_path.exists():
        if has_results and (workdir / ITEMS).exists() and (workdir / ITEMS).stat().st_size > 0:
            raise UserError(f"{workdir} has {ITEMS} but no {CONFIG}; cannot tell which config made "
                            "those results: use a new workdir")
        return None
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: cannot read the previous run's config ({e})") from None
    if not isinstance(old, dict):
        raise UserError(f"{cfg_path}: not a config object")
    foreign = sorted(set(old) - set(cfg))
    if foreign or not {"task", "method"} <= set(old):
        what = f"keys {', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}" if foreign else "no task or method"
        raise UserError(f"{cfg_path} is not an evaluation's config ({what}: a model's or a training "
                        "run's?) and would be overwritten; use a new --workdir")
    if not has_results:
        return None
    diffs = config_utils.behaviour_differences(old, cfg)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"{workdir} holds results of a different configuration ({shown}); "
                        "use a new --workdir or the same config")
    return old


# ------------------------------------------------------------------- building
def method_config(cfg: dict):
    from diffmas_jax.generation import SamplingConfig
    from diffmas_jax.methods import MethodConfig
    mc = MethodConfig(
        method=cfg["method"], layout=cfg["layout"],
        roles=tuple(cfg["roles"]) if cfg["roles"] is not None else None,
        latent_steps=tuple(cfg["latent_steps"]) if isinstance(cfg["latent_steps"], list) else cfg["latent_steps"],
        realign=cfg["realign"], realign_lambda=float(cfg["realign_lambda"]),
        communication=cfg["communication"], visibility=cfg["visibility"],
        solver_reads_trace=bool(cfg["solver_reads_trace"]), max_new_tokens=cfg["max_new_tokens"],
        text_max_new_tokens=cfg["text_max_new_tokens"], enable_thinking=cfg["enable_thinking"],
        sampling=SamplingConfig(cfg["temperature"], cfg["top_p"], cfg["top_k"]),
        compute_dtype=cfg["dtype"], prompt_bucket=cfg["prompt_bucket"])
    try:
        return mc.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def load_adapter(path: str):
    """Trained LoRA adapter for method 'diffmas' (diffmas_jax.lora, imported lazily)."""
    import importlib
    try:
        lora_mod = importlib.import_module("diffmas_jax.lora")
    except ModuleNotFoundError as e:
        if e.name == "diffmas_jax.lora":
            raise UserError("loading adapters needs diffmas_jax.lora") from None
        raise
    if not hasattr(lora_mod, "load_adapter"):
        raise UserError("loading adapters needs diffmas_jax.lora")
    try:
        return lora_mod.load_adapter(path)
    except (UserError, FileNotFoundError):
        raise
    except getattr(lora_mod, "LoraConfigError", UserError) as e:  # a field or tensor layout that is wrong
        raise UserError(f"adapter {path}: {e}" if str(path) not in str(e) else str(e)) from None
    except Exception as e:  # damaged adapter.json / adapter.safetensors: one line naming the file
        if os.environ.get("DIFFMAS_TRACEBACK"):
            raise
        try:
            json.loads((Path(path) / "adapter.json").read_text())
            what = "adapter.safetensors" if "safetensors" in repr(type(e)) else "adapter files"
        except (OSError, ValueError):
            what = "adapter.json"
        raise UserError(f"cannot read adapter {path} ({what}): {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}") from None


def check_adapter_fits(tree, model_cfg, path: str) -> None:
    """An adapter whose tensors do not fit the model's layers and sizes is one UserError line."""
    from diffmas_jax.lora import LoraConfigError, check_adapter_fits as fits
    try:
        fits(tree, model_cfg, f"adapter {path}")
    except LoraConfigError as e:
        raise UserError(str(e)) from None


def adapter_parts(adapter, cfg: dict) -> tuple:
    """(tree for run_batch, effective scale, metadata to record) of a loaded adapter.

    config.lora_scale multiplies the adapter's own alpha/rank (1.0 = as trained).
    """
    tree = getattr(adapter, "tree", adapter)
    base = float(getattr(adapter, "scale", 1.0))
    meta = dict(getattr(adapter, "meta", {}) or {})
    trained_on = meta.get("model")
    if trained_on is not None and config_utils.resolve_model(str(trained_on)) != cfg["model"]:
        print(f"warning: adapter {cfg['lora']} was trained on model {trained_on!r}, evaluating "
              f"{cfg['model']!r}", file=sys.stderr)
    if cfg["method"] == "diffmas":
        changed = stage1_differences(meta, cfg)
        if changed:
            print(f"warning: adapter {cfg['lora']} was trained with other Stage I settings: "
                  f"{'; '.join(changed)} (recorded in summary.json)", file=sys.stderr)
    if isinstance(tree, dict) and "roles" in tree:
        roles = cfg["roles"] or list(_agent_roles(cfg))
        missing = [r for r in roles if r not in tree["roles"]]
        if missing:
            print(f"warning: per-role adapter has no weights for role(s) {missing}; they run the base model",
                  file=sys.stderr)
    return tree, base * float(cfg["lora_scale"]), meta


STAGE1_FIELDS = config_utils.STAGE1_FIELDS


def stage1_differences(meta: dict, cfg: dict) -> list[str]:
    """'field: trained -> evaluated' for each Stage I setting the adapter records (adapters
    trained before they were recorded have none) that this evaluation runs otherwise."""
    out = []
    for field in STAGE1_FIELDS:
        if field not in meta:
            continue
        trained, now = meta[field], cfg[field]
        if field == "latent_steps":
            trained = config_utils._int_list(field, trained)
        if field == "realign_lambda":
            trained, now = float(trained), float(now)
        if trained != now:
            out.append(f"{field}: {trained} -> {now}")
    return out


def _agent_roles(cfg: dict):
    return [a.role for a in method_config(cfg).agents()]


def vote_key(task, item):
    """Equivalence class of a prediction for majority voting ("18.0" ~ "18")."""
    from diffmas_jax.tasks import scoring

    def key(pred: str):
        p = str(pred).strip()
        if item.kind == "choice":
            return p.upper()
        if item.kind == "code":
            return p
        v = scoring.parse_number(p)
        return ("num", scoring.format_number(v)) if v is not None else ("str", scoring.normalize_math(p))
    return key


def item_seed(seed: int, index: int, sample: int) -> int:
    """The sampling seed of item ``index`` (its place in the item list) in sample ``sample``:
    a 32-bit hash of the three, so the runs of two seeds share no item's stream (seed + index
    would give run 1's item i the stream of run 0's item i + 1). Recorded with the item;
    ``generate(..., seed=[it])`` draws that item's stream again."""
    import hashlib
    digest = hashlib.blake2b(f"{int(seed)}/{int(index)}/{int(sample)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


CODE_RUN_KEYS = ("status", "duration_s", "timeout_s", "reference_s", "reference_status")


def code_run(scored: dict) -> dict:
    """What decided a code answer's verdict (`CodeTask.score`): the sandbox status, its time, the
    limit it ran under and the reference's timing where it was taken; {} for other tasks."""
    return {k: scored[k] for k in CODE_RUN_KEYS if k in scored} if "timeout_s" in scored else {}


def make_record(task, item, index: int, samples: list, row: int, latency: float, batch: int) -> dict:
    """One items.jsonl line. ``samples``: [(row seeds, BatchResult)], the first is the primary."""
    outs = []
    for seeds, res in samples:
        text, rec = res.texts[row], res.records[row]
        scored = task.score(item, text)
        outs.append((seeds[row], text, rec, scored))
    seed0, text0, rec0, scored0 = outs[0]
    record = {
        "id": item.id, "question": item.question, "prediction": scored0["prediction"],
        "output": text0, "gold": item.gold, "correct": bool(scored0["correct"]),
        "prompt_tokens": int(rec0["prompt_tokens"]), "generated_tokens": int(rec0["generated_tokens"]),
        "latent_slots": int(rec0.get("latent_slots", 0)), "trace_per_agent": rec0.get("trace_per_agent", {}),
        "latency_s": round(latency, 4), "index": index, "batch": batch, "seed": seed0,
    }
    for extra in ("answer_tokens", "notes"):
        if extra in rec0:
            record[extra] = rec0[extra]
    run0 = code_run(scored0)
    if run0:
        record["code_run"] = run0
    record["generated_logprobs"] = [round(float(x), 4) for x in rec0.get("generated_logprobs", [])]
    record["generated_entropy"] = [round(float(x), 4) for x in rec0.get("generated_entropy", [])]
    if len(outs) > 1:
        record["samples"] = [
            {"seed": s, "prediction": sc["prediction"], "correct": bool(sc["correct"]), "output": t,
             "generated_tokens": int(r["generated_tokens"]),
             "generated_logprobs": [round(float(x), 4) for x in r.get("generated_logprobs", [])],
             **({"code_run": code_run(sc)} if code_run(sc) else {})}
            for s, t, r, sc in outs]
        key = vote_key(task, item)
        winner, agreement = metrics.majority_vote([sc["prediction"] for _, _, _, sc in outs], key=key)
        record["majority_prediction"] = winner
        # the verdict a sample with the winning answer got (a code answer is judged by running
        # its tests in score(); is_correct() cannot run them)
        voted = [sc for _, _, _, sc in outs if winner and key(sc["prediction"]) == key(winner)]
        record["majority_correct"] = bool(voted) and bool(voted[0]["correct"])
        record["agreement"] = agreement
    return record


# ------------------------------------------------------------------------ summary
def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values):
    return float(sum(values) / len(values)) if values else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("diffmas_jax", "jax", "jaxlib", "flax", "transformers", "numpy", "ml_collections"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    if "jax" in sys.modules:
        try:
            import jax
            devs = jax.devices()
            out["backend"] = jax.default_backend()
            out["devices"] = f"{len(devs)} x {devs[0].device_kind}"
        except Exception:  # best effort: a summary must not fail on this
            pass
    return out


def build_summary(cfg: dict, items: list, done: dict, run: dict) -> dict:
    recs = [done[it.id] for it in items if it.id in done]
    n = len(recs)
    correct = [1.0 if r["correct"] else 0.0 for r in recs]
    (lo, hi), ci_method = metrics.accuracy_ci(correct, cfg["bootstrap_resamples"], 0.95, seed=CI_SEED)
    all_lps = []
    for r in recs:
        if "samples" in r:
            all_lps.extend(s["generated_logprobs"] for s in r["samples"])
        else:
            all_lps.append(r.get("generated_logprobs", []))
    gen_time = sum(float(r.get("latency_s", 0.0)) for r in recs)
    tokens = {"prompt": _mean([r["prompt_tokens"] for r in recs]),
              "generated": _mean([r["generated_tokens"] for r in recs]),
              "latent_slots": _mean([r.get("latent_slots", 0) for r in recs])}
    if any("answer_tokens" in r for r in recs):
        tokens["answer"] = _mean([r.get("answer_tokens", r["generated_tokens"]) for r in recs])
    if cfg["num_samples"] > 1:
        tokens["generated_all_samples"] = _mean(
            [sum(s["generated_tokens"] for s in r.get("samples", [])) for r in recs])
    sc = None
    if cfg["num_samples"] > 1:
        with_s = [r for r in recs if "samples" in r]
        sc = metrics.self_consistency([[s["correct"] for s in r["samples"]] for r in with_s],
                                      [r["majority_correct"] for r in with_s],
                                      [r["agreement"] for r in with_s])
    total_generated = sum(r["generated_tokens"] + sum(s["generated_tokens"] for s in r.get("samples", [])[1:])
                          for r in recs)
    summary = {
        "complete": n == len(items),
        "n": n, "n_total": len(items), "correct": int(sum(correct)),
        "accuracy": _mean(correct),
        "accuracy_ci95": [_finite(lo), _finite(hi)],
        "ci_method": ci_method,
        "accuracy_note": ("accuracy and prediction are the first sample's; see decoding.self_consistency"
                          if cfg["num_samples"] > 1 else "one decoding per item"),
        "tokens_per_question": tokens,
        "seconds_per_question": gen_time / n if n else None,
        "generated_tokens_per_second": total_generated / gen_time if gen_time > 0 else None,
        "wall_time_s": {"generation_all_runs": round(gen_time, 3),
                        "this_run": round(time.perf_counter() - run["t_start"], 3),
                        "model_load_this_run": run.get("model_load_s")},
        "decoding": {
            "perplexity": metrics.perplexity(all_lps),
            "surprisal_curve": metrics.surprisal_curve(all_lps),
            "surprisal_note": "mean negative log-prob of the emitted token by output position",
            "entropy_curve": metrics.entropy_curve([r.get("generated_entropy", []) for r in recs]),
            "self_consistency": sc,
        },
        "resumed_with": run["resumed_with"],
        "adapter": run.get("adapter"),
        "config": cfg,
        "versions": run["versions"],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return summary


def write_summary(workdir: Path, summary: dict) -> None:
    atomic_write(workdir / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


# ------------------------------------------------------------------------- main
def evaluate(config, workdir: str | os.PathLike, progress: bool = True) -> dict:
    """Run (or resume) an evaluation; returns the final summary."""
    t_start = time.perf_counter()
    cfg = config_utils.resolve(config)
    mc = method_config(cfg)

    from diffmas_jax.tasks import get_task
    task = get_task(cfg["task"], **cfg["task_options"])
    items = task.load(cfg["split"], data_dir=cfg["data_dir"], limit=cfg["limit"])

    check_workdir_path(workdir)  # a file, or inside one: before the model loads
    workdir = Path(workdir).expanduser()
    items_path = workdir / ITEMS
    done, repair = read_items(items_path, check=record_ok)  # a line the summary cannot use is damage
    check_previous_config(workdir, cfg, has_results=bool(done))
    done = distributed.broadcast_from_main(done)  # on a pod every host runs the items process 0 has not done
    todo_n = sum(1 for it in items if it.id not in done)

    adapter, lora_scale, adapter_meta, model, load_s = None, 1.0, None, None, None
    if todo_n:
        if cfg["lora"]:
            adapter, lora_scale, adapter_meta = adapter_parts(load_adapter(cfg["lora"]), cfg)
        from diffmas_jax.cli import load_model_checked as load_model  # damaged model files: one error line
        t0 = time.perf_counter()
        from diffmas_jax import memory, mesh_presets
        memory.preflight_model(cfg, cfg["model"], cfg["dtype"])  # the weights alone must fit before they load
        mesh, place = mesh_presets.mesh_and_placer(cfg, cfg["model"])  # the config's mesh (None: one device)
        from diffmas_jax.sharding import set_active_mesh
        set_active_mesh(mesh)  # every stage returns its trace sharded over this mesh
        model = load_model(cfg["model"], dtype=cfg["dtype"], place=place)  # weights straight into their shards
        if cfg["method"] == "c2c":  # the receiver, plus the sharer and the trained fuser
            from diffmas_jax import c2c
            model = c2c.load_system(model, cfg["model"], cfg["sharer"], cfg["fuser"], dtype=cfg["dtype"])
        if adapter is not None and getattr(model, "cfg", None) is not None:
            check_adapter_fits(adapter, model.cfg, cfg["lora"])  # before anything is written
        load_s = round(time.perf_counter() - t0, 3)
        memory.preflight_eval(model, cfg, mc, items, adapter)  # per-device estimate; error if it cannot fit

    # Everything the user asked for checks out: from here on files are written.
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(workdir / CONFIG, json.dumps(cfg, indent=2) + "\n")
    if repair:
        rewrite_items(items_path, done)
    adapter_info = None if adapter is None else {"meta": adapter_meta, "effective_scale": lora_scale}
    if adapter_info is None and cfg["lora"]:  # nothing left to run: keep what the last run recorded
        try:
            adapter_info = json.loads((workdir / SUMMARY).read_text()).get("adapter")
        except (OSError, ValueError):
            pass
    run = {"t_start": t_start, "model_load_s": load_s, "versions": versions(), "adapter": adapter_info,
           "resumed_with": sum(1 for it in items if it.id in done)}
    write_summary(workdir, build_summary(cfg, items, done, run))

    from tqdm import tqdm
    from diffmas_jax.methods import run_batch
    bs = cfg["batch_size"]
    bar = tqdm(total=len(items), initial=len(items) - todo_n, unit="item", file=sys.stderr,
               desc=f"{cfg['method']}/{cfg['task']}", disable=not progress or not distributed.is_main_process(),
               dynamic_ncols=True)
    try:
        for b, start in enumerate(range(0, len(items), bs)):
            chunk = items[start:start + bs]
            todo = [it for it in chunk if it.id not in done]
            if not todo:
                continue
            # No row depends on its batch company (each samples from its own item seed),
            # so only the missing items run.
            index = {it.id: start + i for i, it in enumerate(chunk)}
            t0 = time.perf_counter()
            samples = []
            for s in range(cfg["num_samples"]):
                seeds = [item_seed(cfg["seed"], index[it.id], s) for it in todo]
                res = run_batch(model, [it.question for it in todo], task.answer_instruction, mc,
                                lora=adapter, lora_scale=lora_scale, seed=seeds)
                samples.append((seeds, res))
            latency = (time.perf_counter() - t0) / len(todo)
            new = [make_record(task, it, index[it.id], samples, row, latency, b) for row, it in enumerate(todo)]
            append_items(items_path, new)
            for r in new:
                done[r["id"]] = r
            bar.update(len(new))
            write_summary(workdir, build_summary(cfg, items, done, run))
    finally:
        bar.close()
    summary = build_summary(cfg, items, done, run)
    write_summary(workdir, summary)
    return summary


def _usage() -> str:
    fields = ", ".join(sorted(config_utils.DEFAULTS))
    return (f"{__doc__}\nFlags:\n  --config FILE        ml_collections config file (configs/*.py)\n"
            f"  --config.FIELD=VALUE override a field; fields: {fields}\n"
            f"  --workdir DIR        output directory (resumes)\n")


def define_flags(argv: list):
    """Flags in a private FlagValues, built for this argv (config_flags finds the
    --config.FIELD overrides in the argv it is given at definition time)."""
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (configs/*.py); override fields with --config.x=y",
        flag_values=fv, lock_config=True, sys_argv=list(argv))
    workdir = flags.DEFINE_string("workdir", None, "output directory; rerun with the same one to resume",
                                  flag_values=fv)
    return fv, config, workdir


def parse_flags(argv: list):
    """(config, workdir) from an argv (argv[0] is the program); problems become one UserError line
    (the config-flag handling is the one train uses: cli.parse_config_flags)."""
    from diffmas_jax.cli import parse_config_flags
    fv, config_flag, workdir_flag = define_flags(argv)
    rest, config = parse_config_flags(fv, config_flag, argv)
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}; fields are set with --config.FIELD=VALUE")
    if config is None:
        raise UserError("--config is required (e.g. --config configs/embedded_eval.py)")
    if not workdir_flag.value:
        raise UserError("--workdir is required")
    return config, workdir_flag.value


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else ["evaluate", *argv])
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(_usage())
        return 0
    config, workdir = parse_flags(argv)
    distributed.maybe_initialize()  # on a pod: connect the hosts before anything touches a device
    enable_compilation_cache()
    summary = evaluate(config, workdir)
    if not distributed.is_main_process():
        return 0
    acc, (lo, hi) = summary["accuracy"], summary["accuracy_ci95"]
    cfg = summary["config"]
    line = (f"{cfg['method']} on {cfg['task']}: accuracy {acc:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
            if acc is not None else f"{cfg['method']} on {cfg['task']}: ")
    print(f"{line}{summary['n']}/{summary['n_total']} items -> {Path(workdir) / SUMMARY}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
