r"""Train DiffMAS communication (or an SFT baseline) with LoRA.

    python -m diffmas_jax.train --config configs/embedded_train.py --workdir runs/train \
        [--config.trace_grad=full --config.steps=100 ...]

Restarting with the same workdir resumes exactly (same data order, same result).
SIGTERM saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

from absl import app, flags
from ml_collections import config_flags

from diffmas_jax.cli import (UserError, config_flag_value, enable_compilation_cache, load_model_checked, remat_setting,
                            run_cli)

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumes if it holds a run)")

# Fields whose change makes an existing workdir a different experiment: what the adapter is
# trained on (data, held-out split, prompts, targets, the TextMAS+SFT upstream text), the
# model math and the optimizer with its schedule. Steps count too (the cosine schedule spans
# them). Free to change on resume: checkpoint / eval cadence, exports, remat, trace_capacity
# (padding only), on_nan, the mesh.
IDENTITY_FIELDS = ("model", "dtype", "method", "task", "task_path", "split", "data_dir", "limit", "eval_items",
                   "layout", "roles", "latent_steps", "realign", "realign_lambda", "communication", "visibility",
                   "trace_grad", "enable_thinking", "text_max_new_tokens", "lora_rank", "lora_alpha",
                   "lora_targets", "lora_dropout", "lora_per_role", "batch_size", "steps", "grad_accum", "lr",
                   "warmup_steps", "weight_decay", "clip", "seed", "max_target_tokens")

# The fields main() reads: a config file without them is not a DiffMAS training config.
TRAIN_FIELDS = ("model", "dtype", "method", "task", "task_path", "split", "data_dir", "limit", "layout", "roles",
                "latent_steps", "realign", "realign_lambda", "communication", "visibility", "trace_grad",
                "enable_thinking", "text_max_new_tokens", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout",
                "lora_per_role", "batch_size", "steps", "grad_accum", "lr", "warmup_steps", "weight_decay", "clip",
                "max_target_tokens", "trace_capacity", "remat", "seed", "checkpoint_every", "keep_checkpoints",
                "eval_every", "eval_items", "on_nan", "export_peft")


def check_config_kind(c) -> None:
    """UserError (one line) when the config file is not a training config of the kind its method needs,
    e.g. an evaluation or sweep config, or the DiffMAS config with method=c2c."""
    from diffmas_jax import train_loop
    if c.get("method") == "c2c":
        from diffmas_jax.c2c_training import TRAIN_FIELDS as C2C_FIELDS
        train_loop.require_fields(c, C2C_FIELDS, "C2C training", "configs/embedded_c2c_train.py for method=c2c")
    else:
        train_loop.require_fields(c, TRAIN_FIELDS, "DiffMAS training" if "method" in c else "training",
                                  "configs/embedded_train.py (or configs/embedded_c2c_train.py for method=c2c)")


def _ints(v):
    """'10' -> 10 (every upstream agent); '2,5,1' -> (2, 5, 1)."""
    if isinstance(v, int):
        return v
    try:
        vals = tuple(int(x) for x in str(v).split(",") if x.strip())
    except ValueError:
        raise UserError(f"latent_steps must be an int or a comma list of ints, got {v!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _roles(v):
    return None if v in (None, "") else tuple(r.strip() for r in str(v).split(",") if r.strip())


def validate(c) -> None:
    """Every config value checkable without the model; UserError naming the first bad one."""
    from diffmas_jax.config_utils import REALIGNS
    from diffmas_jax.train_loop import finite_number, validate_loop_fields
    from diffmas_jax.training import TRACE_GRADS, TRAIN_METHODS
    if c.method not in TRAIN_METHODS:
        raise UserError(f"unknown training method {c.method!r}; known: {', '.join(TRAIN_METHODS)}")
    if c.trace_grad not in TRACE_GRADS:
        raise UserError(f"unknown trace_grad {c.trace_grad!r}; known: {', '.join(TRACE_GRADS)}")
    if c.realign not in REALIGNS:
        raise UserError(f"unknown realign {c.realign!r}; known: {', '.join(REALIGNS)}")
    validate_loop_fields(c)
    if int(c.warmup_steps) < 0:
        raise UserError(f"warmup_steps must be >= 0, got {c.warmup_steps}")
    if not finite_number(c, "lora_alpha") > 0:
        raise UserError(f"lora_alpha must be positive, got {c.lora_alpha}")
    if not 0 <= finite_number(c, "lora_dropout") < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if finite_number(c, "realign_lambda") < 0:
        raise UserError(f"realign_lambda must be >= 0, got {c.realign_lambda}")
    if int(c.text_max_new_tokens) <= 0:
        raise UserError(f"text_max_new_tokens must be positive, got {c.text_max_new_tokens}")
    if c.trace_capacity is not None and int(c.trace_capacity) <= 0:
        raise UserError(f"trace_capacity must be positive (unset: what the longest batch needs), "
                        f"got {c.trace_capacity}")
    remat_setting(c)  # remat_policy


def check_config(c):
    """Every check of a training config that needs no model, data or workdir: the CLI runs
    it first, and a sweep's plan runs it for every training before any cell starts.
    Returns (LoraConfig, MethodConfig), or None for method c2c (its own checks)."""
    check_config_kind(c)  # an evaluation, sweep or C2C config: one line naming what is missing
    if c.method == "c2c":
        from diffmas_jax.c2c_training import check_config as check_c2c
        check_c2c(c)
        return None
    validate(c)
    from diffmas_jax.lora import LoraConfig, LoraConfigError
    from diffmas_jax.methods import MethodConfig
    lcfg = LoraConfig(rank=int(c.lora_rank), alpha=float(c.lora_alpha),
                      targets=tuple(t.strip() for t in str(c.lora_targets).split(",") if t.strip()),
                      dropout=float(c.lora_dropout), per_role=bool(c.lora_per_role))
    if lcfg.per_role and c.get("export_merged"):
        raise UserError("export_merged needs one shared adapter: with lora_per_role every role has its own "
                        "(PEFT exports them as peft/<role>/); set export_merged=False")
    try:
        lcfg.validate()
        mc = MethodConfig(method="latent_mas", layout=c.layout, roles=_roles(c.roles),
                          latent_steps=_ints(c.latent_steps), realign=c.realign,
                          realign_lambda=float(c.realign_lambda), communication=c.communication,
                          visibility=c.visibility, enable_thinking=c.enable_thinking,
                          compute_dtype=c.dtype).validate()
    except (LoraConfigError, ValueError) as e:
        raise UserError(str(e)) from None
    return lcfg, mc


def notes_settings(c, mc) -> dict:
    """What the TextMAS+SFT upstream text depends on besides each question (the cache's key)."""
    return json.loads(json.dumps({
        "model": c.model, "dtype": c.dtype, "roles": [a.role for a in mc.agents()], "layout": c.layout,
        "text_max_new_tokens": int(c.text_max_new_tokens), "enable_thinking": c.enable_thinking}))


def _read_notes_cache(cache: Path, settings: dict) -> dict:
    """The cached notes {item id: {"question", "notes"}} written with ``settings``; {} if none, unreadable
    or written with other settings (the text is then generated again)."""
    try:
        saved = json.loads(cache.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a crash can leave it empty or torn
        print(f"warning: {cache} is unreadable ({type(e).__name__}); generating the upstream text again",
              file=sys.stderr)
        return {}
    if not isinstance(saved, dict) or saved.get("settings") != settings or not isinstance(saved.get("notes"), dict):
        print(f"note: {cache} was written with other settings; generating the upstream text again", file=sys.stderr)
        return {}
    return saved["notes"]


def _cached(entry, question: str):
    """An entry's notes as [(role, text)] if it is well formed and for this question, else None."""
    if not (isinstance(entry, dict) and entry.get("question") == question and isinstance(entry.get("notes"), list)):
        return None
    notes = entry["notes"]
    if not all(isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in notes):
        return None
    return [tuple(x) for x in notes]


def upstream_notes(model, mc, train_items, eval_items, workdir: Path, max_new_tokens: int,
                   settings: Optional[dict] = None):
    """TextMAS+SFT: the upstream agents' text for every item, generated once by the base model.

    Cached in ``workdir/text_notes.json`` under ``settings`` (see :func:`notes_settings`) and
    each item's question: other settings, another question under the same id, or an
    unreadable file mean the text is generated again."""
    import dataclasses as dc
    from tqdm import tqdm
    from diffmas_jax.methods import speak_upstream
    mc = dc.replace(mc, method="text_mas", text_max_new_tokens=max_new_tokens)
    settings = json.loads(json.dumps(settings if settings is not None else
                                     {"roles": [a.role for a in mc.agents()], "text_max_new_tokens": max_new_tokens,
                                      "enable_thinking": mc.enable_thinking, "dtype": mc.compute_dtype}))
    cache = workdir / "text_notes.json"
    old = _read_notes_cache(cache, settings)
    saved = {}
    for it in train_items + eval_items:
        notes = _cached(old.get(it.id), it.question)
        if notes is not None:
            saved[it.id] = {"question": it.question, "notes": [list(x) for x in notes]}
    todo = [it for it in dict((it.id, it) for it in train_items + eval_items).values() if it.id not in saved]
    from diffmas_jax import distributed
    main = distributed.is_main_process()  # every host generates (one SPMD program); one writes
    for k in tqdm(range(0, len(todo), 8), desc="upstream text", disable=not todo or not main):
        chunk = todo[k:k + 8]
        notes, _, _ = speak_upstream(model, [it.question for it in chunk], mc)
        saved.update({it.id: {"question": it.question, "notes": [list(x) for x in n]} for it, n in zip(chunk, notes)})
        if not main:
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # atomic: a kill leaves old or new
        tmp.write_text(json.dumps({"settings": settings, "notes": saved}))
        os.replace(tmp, cache)
    get = lambda items: [[tuple(x) for x in saved[it.id]["notes"]] for it in items]
    return get(train_items), get(eval_items)


def export_adapter(workdir: Path, lora: dict, lcfg, c, model, roles) -> None:
    """adapter/ (with the Stage I settings: evaluate warns when it runs them otherwise), peft/
    (per-role adapters: peft/<role>/ each) and, if asked, merged/."""
    from diffmas_jax.config_utils import STAGE1_FIELDS
    from diffmas_jax.lora import export_merged, export_peft, save_adapter
    stage1 = {f: c[f] for f in STAGE1_FIELDS}
    stage1.update(latent_steps=str(c.latent_steps), realign_lambda=float(c.realign_lambda))
    save_adapter(workdir / "adapter", lora, lcfg, extra={
        "model": c.model, "roles": list(roles), "trace_grad": c.trace_grad, "method": c.method, **stage1})
    # the PEFT adapter names its base model as peft will look it up: a Hub id stays one
    hub_id = c.model and c.model != "embedded" and not Path(c.model).expanduser().exists()
    base = c.model if hub_id else str(model.path)
    if c.export_peft:
        for role, tree in (lora["roles"].items() if lcfg.per_role else [(None, lora)]):
            export_peft(workdir / "peft" / (role or ""), tree, lcfg, model.cfg, base_model=base)
    if c.get("export_merged"):  # a plain HF checkpoint with the LoRA folded in (check_config: shared only)
        export_merged(workdir / "merged", model.params, lora, lcfg.scale, model.cfg, model.path)


def check_hosts(c) -> None:
    """What a multi-host run cannot do, refused before the model loads (no-op on one host)."""
    from diffmas_jax import distributed
    if c.get("export_merged") and distributed.process_count() > 1:
        raise UserError("export_merged writes the model from one host, which cannot read weights sharded "
                        "over several: set export_merged=False and merge peft/ on one machine "
                        "(PEFT's merge_and_unload)")


def main(argv) -> int:
    c = config_flag_value(_CONFIG, sys.argv)
    if argv is not None and len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}; fields are set with --config.FIELD=VALUE")
    if c is None:
        raise UserError("--config is required (e.g. configs/embedded_train.py)")
    if not _WORKDIR.value:
        raise UserError("--workdir is required")
    checked = check_config(c)
    if c.method == "c2c":  # the fuser has its own data, step and state
        from diffmas_jax.c2c_training import train_c2c
        return train_c2c(c, Path(_WORKDIR.value))
    lcfg, mc = checked
    from diffmas_jax import distributed, memory, mesh_presets
    distributed.maybe_initialize()  # on a pod: connect the hosts before anything touches a device
    check_hosts(c)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    from diffmas_jax import train_loop
    workdir = Path(_WORKDIR.value)
    resolved = json.loads(c.to_json())
    train_loop.check_workdir(workdir, resolved, IDENTITY_FIELDS)

    # Everything that can fail on bad input happens before anything is written.
    enable_compilation_cache()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffmas_jax.lora import count_params, init_lora
    from diffmas_jax.stages import make_realign
    from diffmas_jax.training import (StepConfig, batch_of, encode_items, make_eval_loss, make_optimizer,
                                      make_train_step, step_capacity, warn_cut_targets)

    task, train_items, eval_items = train_loop.split_items(c)
    n_eval = len(eval_items)

    memory.preflight_model(c, c.model, c.dtype)  # the weights alone must fit before they load
    mesh, place = mesh_presets.mesh_and_placer(c, c.model)  # the config's mesh (None: one device)
    distributed.check_batch_layout(int(c.batch_size), mesh)  # several hosts: rows split over them
    from diffmas_jax.sharding import set_active_mesh
    set_active_mesh(mesh)  # traces inside the step are pinned to this mesh's sharding
    model = load_model_checked(c.model, dtype=c.dtype, place=place)  # weights straight into their shards
    optimizer = make_optimizer(float(c.lr), int(c.steps), int(c.warmup_steps), float(c.weight_decay),
                               float(c.clip), int(c.grad_accum))
    realign = make_realign(model.params, model.cfg, c.realign, float(c.realign_lambda))

    def plan(notes, eval_notes):
        """Encoded data and the step's static config (trace capacity checked)."""
        data, agents = encode_items(model.tokenizer, train_items, task.answer_instruction, mc, c.method,
                                    int(c.max_target_tokens), notes=notes)
        eval_data, _ = encode_items(model.tokenizer, eval_items, task.answer_instruction, mc, c.method,
                                    int(c.max_target_tokens), notes=eval_notes) if n_eval else (None, None)
        latent = tuple(a.latent_steps for a in agents[:-1])
        sc = StepConfig(method=c.method, trace_grad=c.trace_grad, roles=tuple(a.role for a in agents),
                        latent_steps=latent, up_lengths=tuple(t.shape[1] for t in data.up_tokens),
                        solver_length=data.tokens.shape[1], capacity=step_capacity(data, latent, c.trace_capacity),
                        lora_scale=lcfg.scale, communication=c.communication, visibility=c.visibility,
                        remat=remat_setting(c), compute_dtype=c.dtype, lora_dropout=lcfg.dropout,
                        max_target=int(max([data.n_target.max()] + ([eval_data.n_target.max()] if n_eval else []))))
        return data, eval_data, sc

    notes = eval_notes = None
    if c.method == "text_mas_sft":  # the base model's upstream text, written once (cached in workdir)
        # Before generating (and writing text_notes.json): the checks that can fail, on the solver
        # prompts with empty upstream text, a lower bound of what the notes make them.
        blank = [(a.role, "") for a in mc.agents()[:-1]]
        _, _, sc0 = plan([blank] * len(train_items), [blank] * n_eval)
        with contextlib.redirect_stderr(io.StringIO()):  # the estimate is printed once, for the real prompts
            memory.preflight_train(model.cfg, c, sc0, lcfg)
        notes, eval_notes = upstream_notes(model, mc, train_items, eval_items, workdir, int(c.text_max_new_tokens),
                                           notes_settings(c, mc))
    data, eval_data, sc = plan(notes, eval_notes)
    warn_cut_targets(data, eval_data, int(c.max_target_tokens))
    capacity = sc.capacity
    lora = init_lora(model.cfg, lcfg, jax.random.PRNGKey(c.seed), roles=sc.roles)
    opt_state = optimizer.init(lora)
    memory.preflight_train(model.cfg, c, sc, lcfg)  # per-device estimate before compiling; error if it cannot fit

    train_step = make_train_step(model.cfg, sc, optimizer, mesh)
    eval_loss = make_eval_loss(model.cfg, sc) if n_eval else None

    def step(state, batch, i, grad_weight=1.0):
        # Dropout masks, like the data order, are a function of (seed, step) alone.
        drop_rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), i) if lcfg.dropout > 0 else None
        lo, opt, m = train_step(state["lora"], state["opt_state"], model.params, realign, batch, drop_rng,
                                jnp.float32(grad_weight))
        return {"lora": lo, "opt_state": opt}, m

    def export(state):
        export_adapter(workdir, state["lora"], lcfg, c, model, sc.roles)

    seg = [f"seg_grad_{j}_{r}" for j, r in enumerate(sc.roles[:-1])]
    return train_loop.run(train_loop.Trainer(
        label="train", state={"lora": lora, "opt_state": opt_state}, n_items=len(train_items),
        banner=f"training {c.method} (trace_grad={c.trace_grad}) on {len(train_items)} items, "
               f"{count_params(lora):,} LoRA params, trace capacity {capacity}",
        batch=lambda idx: batch_of(data, idx), step=step,
        target_tokens=lambda idx: int(np.sum(data.n_target[idx])),
        # jnp sums: the batch may be a global array spread over several hosts
        tokens=lambda b: jnp.sum(b["valid"]) + sum(jnp.sum(v) for v in b["up_valid"]),
        fields=["step", "loss", "grad_norm", "tokens_per_s", "eval_loss"] + seg,
        extra_metrics=lambda m: dict(zip(seg, np.asarray(m["segment_grad_norms"]).tolist())),
        postfix=lambda row: {"loss": f"{row['loss']:.3f}", "tok_s": f"{row['tokens_per_s']:.0f}"},
        eval_loss=None if eval_loss is None else lambda state: eval_loss(
            state["lora"], model.params, realign, jax.tree.map(jnp.asarray, batch_of(eval_data, np.arange(n_eval)))),
        export=export, exports="adapter exports", done=f"done: adapter in {workdir / 'adapter'}"),
        c, workdir, resolved, mesh)


def _parse_flags(argv):
    """absl flag parsing; a bad flag or config file is one 'error:' line (exit 2), not FATAL + usage."""
    from diffmas_jax.cli import parse_config_flags
    try:
        return parse_config_flags(flags.FLAGS, _CONFIG, argv)[0]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry():
    if any(a in ("-h", "--help", "--helpfull") for a in sys.argv[1:]):  # absl's own help exits 1
        print(f"{__doc__}\nFlags:\n  --config FILE        ml_collections config file (configs/*_train.py)\n"
              "  --config.FIELD=VALUE override a field of that file\n"
              "  --workdir DIR        output directory (resumes if it holds a run)")
        sys.exit(0)
    flags.mark_flags_as_required([])
    app.run(lambda argv: run_cli(lambda _: main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
