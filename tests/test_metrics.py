"""Metrics: bootstrap CI, decoding perplexity, surprisal curve, self-consistency."""
import math

import numpy as np
import pytest

from diffmas_jax import metrics


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = (rng.random(200) < 0.3).astype(float)
    lo, hi = metrics.bootstrap_ci(x, num_resamples=1000, seed=0)
    assert lo <= x.mean() <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert metrics.bootstrap_ci(x, num_resamples=1000, seed=0) == (lo, hi)
    assert metrics.bootstrap_ci(x, num_resamples=1000, seed=1) != (lo, hi)


def test_bootstrap_ci_width_shrinks_with_n():
    def width(n):
        x = np.array([1.0, 0.0] * (n // 2))
        lo, hi = metrics.bootstrap_ci(x, num_resamples=2000, seed=0)
        return hi - lo
    w20, w200, w2000 = width(20), width(200), width(2000)
    assert w20 > w200 > w2000 > 0
    # standard error scales as 1/sqrt(n): 10x the items, about sqrt(10) narrower
    assert w200 / w2000 == pytest.approx(math.sqrt(10), rel=0.25)
    assert w2000 == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(2000), rel=0.1)


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([]))
    assert metrics.bootstrap_ci([1.0]) == (1.0, 1.0)
    assert metrics.bootstrap_ci([1, 1, 1, 1]) == (1.0, 1.0)
    # many resamples are done in chunks: same answer as a seed-fixed single pass
    x = np.arange(50) % 3 == 0
    assert metrics.bootstrap_ci(x, num_resamples=5000, seed=3) == metrics.bootstrap_ci(x, num_resamples=5000, seed=3)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([1, 0], confidence=1.5)


def test_perplexity_of_known_logprobs():
    a = [math.log(0.5)] * 4             # perplexity 2
    b = [math.log(0.25), math.log(1.0)]  # mean nll = log(4)/2 -> perplexity 2
    c = [math.log(0.1)]                 # perplexity 10
    assert metrics.sequence_perplexity(a) == pytest.approx(2.0)
    assert metrics.sequence_perplexity(b) == pytest.approx(2.0)
    assert math.isnan(metrics.sequence_perplexity([]))
    p = metrics.perplexity([a, b, c, []])  # an empty answer is left out
    assert p["n"] == 3
    assert p["mean"] == pytest.approx((2 + 2 + 10) / 3)
    assert p["median"] == pytest.approx(2.0)
    total_nll = -(sum(a) + sum(b) + sum(c))
    assert p["token"] == pytest.approx(math.exp(total_nll / 7))
    assert metrics.perplexity([])["mean"] is None


def test_surprisal_curve_by_position_and_binned():
    curve = metrics.surprisal_curve([[-1.0, -2.0, -3.0], [-3.0, -4.0]])
    assert curve["bin_width"] == 1
    assert curve["position"] == [0, 1, 2]
    assert curve["mean_nll"] == pytest.approx([2.0, 3.0, 3.0])
    assert curve["count"] == [2, 2, 1]
    long = metrics.surprisal_curve([[-1.0] * 100, [-3.0] * 10], max_points=10)
    assert long["bin_width"] == 10 and len(long["position"]) == 10
    assert long["mean_nll"][0] == pytest.approx(2.0) and long["mean_nll"][-1] == pytest.approx(1.0)
    assert long["count"][0] == 20
    assert metrics.surprisal_curve([])["position"] == []


def test_majority_vote():
    assert metrics.majority_vote(["A", "B", "A"]) == ("A", pytest.approx(2 / 3))
    # ties go to the first-seen answer; abstentions count in the denominator only
    assert metrics.majority_vote(["B", "A", "A", "B", ""]) == ("B", pytest.approx(0.4))
    assert metrics.majority_vote(["", None]) == ("", 0.0)
    # an equivalence key merges spellings; the first spelling is reported
    key = lambda p: float(p.replace(",", ""))
    assert metrics.majority_vote(["18.0", "7", "18", "1,000"], key=key) == ("18.0", 0.5)


def test_self_consistency_summary():
    sc = metrics.self_consistency(sample_correct=[[True, True, False], [False, False, False], [False, True, False]],
                                  majority_correct=[True, False, False], agreement=[2 / 3, 1.0, 1 / 3])
    assert sc["n_items"] == 3 and sc["num_samples"] == 3
    assert sc["sample_accuracy"] == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert sc["majority_vote_accuracy"] == pytest.approx(1 / 3)
    assert sc["agreement"] == pytest.approx((2 / 3 + 1 + 1 / 3) / 3)
    assert sc["pass_at_n"] == pytest.approx(2 / 3)
    assert metrics.self_consistency([], [], [])["majority_vote_accuracy"] is None


def test_entropy_curve_averages_by_position():
    from diffmas_jax.metrics import entropy_curve
    c = entropy_curve([[1.0, 2.0], [3.0]])
    assert c["position"] == [0, 1] and c["mean_entropy"] == [2.0, 2.0] and c["count"] == [2, 1]


def test_wilson_interval_where_the_bootstrap_is_a_point():
    lo, hi = metrics.wilson_interval(0, 40)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 43.8415, rel=1e-4)  # z^2 / (n + z^2)
    lo, hi = metrics.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))
    ci, method = metrics.accuracy_ci([1.0] * 5)
    assert ci == (pytest.approx(0.5655, abs=1e-4), 1.0) and method.startswith("Wilson")
    ci, method = metrics.accuracy_ci([1.0, 0.0, 1.0, 1.0], num_resamples=500, seed=2)
    assert ci == metrics.bootstrap_ci([1.0, 0.0, 1.0, 1.0], 500, seed=2) and method.startswith("percentile bootstrap")
