"""Importing diffmas_jax sets its CPU XLA defaults (fresh processes: XLA_FLAGS is read
when the backend starts), and leaves a user's own value or opt-out alone."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PROBE = """
import os, sys
import diffmas_jax
import jax, jax.numpy as jnp
hlo = jax.jit(lambda a, b: jax.nn.softmax(a @ b)).lower(jnp.ones((8, 64)), jnp.ones((64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""), "|", "ynn_fusion" in hlo, "|", diffmas_jax.CPU_DEFAULTS_APPLIED)
"""
# A diffmas_jax process that starts the probe as its child, with its own environment.
PARENT = """
import os, subprocess, sys
import diffmas_jax
out = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
print(out.stdout if out.returncode == 0 else out.stderr, end="")
"""


def run_probe(via_parent=False, **env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "DIFFMAS_JAX_KEEP_XLA_FLAGS", "DIFFMAS_JAX_ADDED_XLA_FLAGS")}
    full.update(env, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", PARENT, PROBE] if via_parent else [sys.executable, "-c", PROBE]
    out = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags, fused, applied = out.stdout.strip().rsplit("|", 2)
    return flags.strip(), fused.strip() == "True", applied.strip() == "True"


def test_import_turns_off_ynn_fusions_on_cpu():
    flags, fused, applied = run_probe(XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert not fused and applied


def test_child_of_a_diffmas_jax_process_keeps_the_defaults_in_force():
    """The child inherits the flag its parent's import added; it is still this project's
    setting (per-jit YNNPACK dots stay on), not a user's."""
    flags, fused, applied = run_probe(via_parent=True, XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    assert not fused and applied


def test_user_value_and_opt_out_win():
    flags, _, applied = run_probe(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=dot" and not applied
    # the user's own value of the flag, even equal to ours, is theirs (in a child too)
    _, _, applied = run_probe(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
    assert not applied
    _, _, applied = run_probe(via_parent=True, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
    assert not applied
    flags, _, applied = run_probe(DIFFMAS_JAX_KEEP_XLA_FLAGS="1")
    assert flags == "" and not applied


# --------------------------------------------------------------------------- per-jit options
def _ynn_in(lowered) -> bool:
    return "ynn_fusion" in lowered.compile().as_text()


def test_few_row_jits_get_ynn_dots_with_equal_results(monkeypatch):
    """The train step and decode loops over >= 2 rows compile with YNNPACK dots (``xla_cpu``);
    one-row decode, or this project's CPU defaults not in force, keeps XLA's own dots; results
    agree."""
    import diffmas_jax
    from diffmas_jax.generation import jit_decode_steps, start_decode
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import forward, init_params, lm_logits
    from diffmas_jax.stages import make_realign
    from diffmas_jax.trace import KVTrace
    from diffmas_jax.training import StepConfig, make_optimizer, make_train_step
    from diffmas_jax.xla_cpu import YNN_DOTS, ynn_dot_options

    cfg = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    monkeypatch.setattr(diffmas_jax, "CPU_DEFAULTS_APPLIED", True)
    assert ynn_dot_options(1) == {} and ynn_dot_options(2) == ynn_dot_options() == YNN_DOTS

    def state(b):
        toks = jax.random.randint(jax.random.PRNGKey(1), (b, 5), 3, cfg.vocab_size)
        out = forward(params, cfg, KVTrace.create(cfg, b, 5 + 8), tokens=toks)
        return start_decode(out.trace, lm_logits(params, cfg, out.hidden[:, -1]), 8, jax.random.PRNGKey(2))

    kw = dict(cfg=cfg, num_steps=8, eos_ids=())
    assert _ynn_in(jit_decode_steps.lower(params, state=state(2), **kw))
    assert not _ynn_in(jit_decode_steps.lower(params, state=state(1), **kw))
    with_ynn = jit_decode_steps(params, state=state(2), **kw)
    plain = jit_decode_steps.plain(params, state=state(2), **kw)  # compiled without options
    np.testing.assert_array_equal(with_ynn.tokens, plain.tokens)
    np.testing.assert_allclose(with_ynn.logprobs, plain.logprobs, atol=1e-5)
    # nested in the caller's own jit, a jit takes no compiler options: the outer compile's rule
    nested = jax.jit(lambda s: jit_decode_steps(params, state=s, **kw).tokens)(state(2))
    np.testing.assert_array_equal(nested, plain.tokens)

    b, t_up, t_sol = 2, 6, 9
    rng = np.random.default_rng(0)
    batch = {"up_tokens": [jnp.asarray(rng.integers(3, 128, (b, t_up)))],
             "up_valid": [jnp.ones((b, t_up), bool)], "tokens": jnp.asarray(rng.integers(3, 128, (b, t_sol))),
             "valid": jnp.ones((b, t_sol), bool), "target_mask": jnp.asarray(np.arange(t_sol)[None] >= [[5], [6]])}
    sc = StepConfig(method="diffmas", trace_grad="full", roles=("planner", "solver"), latent_steps=(2,),
                    up_lengths=(t_up,), solver_length=t_sol, capacity=t_up + 2 + t_sol, lora_scale=2.0, max_target=4)
    opt = make_optimizer(1e-2, 1, 0, 0.0, 1.0, 1)
    realign = make_realign(params, cfg, "norm")
    lora = init_lora(cfg, LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(3))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(4), a.shape), lora)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # the step donates its LoRA and optimizer state

    results = {}
    for applied in (True, False):
        monkeypatch.setattr(diffmas_jax, "CPU_DEFAULTS_APPLIED", applied)
        step = make_train_step(cfg, sc, opt)
        results[applied] = step(copy(lora), opt.init(lora), params, realign, batch)
        (key,) = step.jits
        assert key == (tuple(sorted(YNN_DOTS.items())) if applied else ())
        assert _ynn_in(step.jits[key].lower(copy(lora), opt.init(lora), params, realign, batch, None)) == applied
        traced = jax.eval_shape(step, lora, opt.init(lora), params, realign, batch)  # nested (e.g. a FLOP count)
        assert traced[2]["loss"].shape == ()
    np.testing.assert_allclose(results[True][2]["loss"], results[False][2]["loss"], rtol=1e-5)
    # Adam's normalised update (lr 1e-2) magnifies summation-order noise in near-zero gradients,
    # so the updated weights agree to 1% of one step: a wrong step would differ by about lr.
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-4), results[True][0], results[False][0])


def test_suite_and_its_children_compile_at_llvm_level_0():
    """The suite's time (README, Tests) rests on conftest's level-0 flag: in force here unless
    DIFFMAS_TEST_FULL_OPT=1, and kept by xla_env under the flags a child adds."""
    from conftest import TEST_XLA_FLAGS, xla_env
    if os.environ.get("DIFFMAS_TEST_FULL_OPT") == "1":
        assert TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "").split()
    else:
        assert TEST_XLA_FLAGS in os.environ["XLA_FLAGS"].split()
    env = xla_env("--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    assert env["XLA_FLAGS"].split() == [*os.environ.get("XLA_FLAGS", "").split(),
                                        "--xla_force_host_platform_device_count=8"]
    assert env["JAX_PLATFORMS"] == "cpu"


def test_prompt_jits_pick_their_dots_by_cpu_vendor(monkeypatch, tmp_path, capsys):
    """Prompt jits (prefill, agent stages, the solver's prefill, jit_forward) take YNNPACK's dots
    on Intel CPUs and keep XLA's elsewhere (``xla_cpu.prompt_dot_options``, measured on both);
    DIFFMAS_JAX_PROMPT_DOTS overrides the rule and a bad value is one clear error; results agree."""
    import diffmas_jax
    import diffmas_jax.xla_cpu as xc
    from diffmas_jax.generation import jit_prefill
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import init_params, jit_forward
    from diffmas_jax.trace import KVTrace

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\nprocessor\t: 1\nvendor_id\t: x\n")
    assert xc.cpu_vendor(info) == "GenuineIntel" and xc.cpu_vendor(tmp_path / "missing") is None

    monkeypatch.setattr(diffmas_jax, "CPU_DEFAULTS_APPLIED", True)
    monkeypatch.delenv(xc.PROMPT_DOTS_VAR, raising=False)
    for vendor, expected in (("GenuineIntel", xc.YNN_DOTS), ("AuthenticAMD", {}), (None, {})):
        monkeypatch.setattr(xc, "cpu_vendor", lambda vendor=vendor: vendor)
        assert xc.prompt_dot_options() == expected
    monkeypatch.setenv(xc.PROMPT_DOTS_VAR, "ynn")
    assert xc.prompt_dot_options() == xc.YNN_DOTS  # vendor None: the override wins
    monkeypatch.setattr(xc, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv(xc.PROMPT_DOTS_VAR, "XLA")
    assert xc.prompt_dot_options() == {}
    monkeypatch.setenv(xc.PROMPT_DOTS_VAR, "oneDNN")
    with pytest.raises(xc.XlaOptionsError, match="DIFFMAS_JAX_PROMPT_DOTS='oneDNN': expected auto, ynn or xla"):
        xc.prompt_dot_options()
    # a CLI refuses it in one line, exit 2, before its main runs (no model loads, nothing is written)
    from diffmas_jax.cli import run_cli
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: pytest.fail("main must not run"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: DIFFMAS_JAX_PROMPT_DOTS='oneDNN': expected auto, ynn or xla\n"
    monkeypatch.setenv(xc.PROMPT_DOTS_VAR, "auto")
    monkeypatch.setattr(diffmas_jax, "CPU_DEFAULTS_APPLIED", False)  # opted out: XLA's defaults everywhere
    assert xc.prompt_dot_options() == {}
    monkeypatch.setattr(diffmas_jax, "CPU_DEFAULTS_APPLIED", True)

    cfg = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 3, cfg.vocab_size)
    valid = jnp.ones((2, 6), bool)
    trace = KVTrace.create(cfg, 2, 8)
    assert _ynn_in(jit_prefill.lower(params, cfg, trace, toks, valid))
    assert _ynn_in(jit_forward.lower(params, cfg, trace, tokens=toks))
    _, ynn_logits, _ = jit_prefill(params, cfg, trace, toks, valid)
    ynn_full = jit_forward(params, cfg, trace, tokens=toks).logits
    monkeypatch.setattr(xc, "cpu_vendor", lambda: "AuthenticAMD")
    assert not _ynn_in(jit_prefill.lower(params, cfg, trace, toks, valid))
    _, plain_logits, _ = jit_prefill(params, cfg, trace, toks, valid)
    np.testing.assert_allclose(ynn_logits, plain_logits, atol=1e-5)
    np.testing.assert_allclose(ynn_full, jit_forward(params, cfg, trace, tokens=toks).logits, atol=1e-5)
