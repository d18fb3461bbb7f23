"""Evaluation metrics in plain numpy: accuracy with a bootstrap (or Wilson) CI and decoding stability.

Decoding stability follows the paper's three readings, computed from what decoding
records (the log-probability the model gave each token it emitted):

- ``perplexity``: exp of the mean negative log-prob of an answer's tokens, averaged
  over answers (plus the token-weighted corpus value).
- ``surprisal_curve``: mean negative log-prob of the emitted token at each output
  position. This is *not* the token entropy the paper plots (that needs the whole
  next-token distribution, which decoding does not keep); it is the sampled-token
  surprisal, whose expectation over sampling equals the entropy, and with greedy
  decoding it is a lower bound on it. It is named for what it is.
- ``self_consistency``: majority vote over repeated samples and how often samples
  agree with the vote.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Hashable, Optional, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((nan, nan) for n = 0): unlike the
    bootstrap it keeps a width at 0% and 100% (0 of 40 correct: [0, 8.8%])."""
    if n == 0:
        return (math.nan, math.nan)
    from statistics import NormalDist
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)   # exact at the ends (no rounding dust)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def alike_interval(correct, confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """The Wilson interval when every 0/1 verdict is the same (where a bootstrap's CI is a
    point), else None."""
    x = np.asarray(correct, np.float64).ravel()
    if x.size and np.all(x == x[0]) and x[0] in (0.0, 1.0):
        return wilson_interval(int(x.sum()), x.size, confidence)
    return None


def accuracy_ci(correct: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95,
                seed: int = 0) -> tuple[tuple[float, float], str]:
    """(CI, method) of an accuracy over 0/1 verdicts: the percentile bootstrap over items, or
    the Wilson interval where every verdict is the same (the bootstrap's CI is then a point)."""
    x = np.asarray(correct, np.float64).ravel()
    alike = alike_interval(x, confidence)
    if alike is not None:
        return alike, "Wilson score interval (every item alike)"
    return (bootstrap_ci(x, num_resamples, confidence, seed),
            f"percentile bootstrap over items, {num_resamples} resamples, seed {seed}")


def bootstrap_ci(values: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (deterministic for a seed).

    Returns (nan, nan) for no values. Resampling runs in chunks so memory stays small.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, np.float64)
    chunk = max(1, min(num_resamples, 4_000_000 // n))
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def _clean(logprobs: Sequence[Sequence[float]]) -> list[np.ndarray]:
    return [np.asarray(lp, dtype=np.float64).ravel() for lp in logprobs]


def sequence_perplexity(logprobs: Sequence[float]) -> float:
    """exp(mean negative log-prob) of one sequence; nan when it has no tokens."""
    lp = np.asarray(logprobs, dtype=np.float64).ravel()
    if lp.size == 0:
        return math.nan
    return float(np.exp(-lp.mean()))


def perplexity(logprobs: Sequence[Sequence[float]]) -> dict:
    """Decoding perplexity over answers (each a list of per-token log-probs).

    ``mean``: average of per-answer perplexities; ``token``: exp of the mean NLL over all
    tokens of all answers; ``median``; ``n``: answers with at least one token.
    """
    seqs = [lp for lp in _clean(logprobs) if lp.size]
    if not seqs:
        return {"mean": None, "median": None, "token": None, "n": 0}
    per = np.array([np.exp(-lp.mean()) for lp in seqs])
    total = np.concatenate(seqs)
    return {"mean": float(per.mean()), "median": float(np.median(per)),
            "token": float(np.exp(-total.mean())), "n": len(seqs)}


def surprisal_curve(logprobs: Sequence[Sequence[float]], max_points: int = 64) -> dict:
    """Mean negative log-prob of the emitted token by output position.

    Positions are grouped into at most ``max_points`` equal-width bins (width 1 when the
    longest answer fits). Returns {"bin_width", "position" (first position of each bin),
    "mean_nll", "count" (tokens per bin)}; bins with no tokens are left out.
    """
    seqs = [lp for lp in _clean(logprobs) if lp.size]
    if not seqs:
        return {"bin_width": 1, "position": [], "mean_nll": [], "count": []}
    longest = max(lp.size for lp in seqs)
    width = max(1, -(-longest // max_points))
    bins = -(-longest // width)
    total = np.zeros(bins)
    count = np.zeros(bins, np.int64)
    for lp in seqs:
        b = np.arange(lp.size) // width
        np.add.at(total, b, -lp)
        np.add.at(count, b, 1)
    keep = count > 0
    return {"bin_width": int(width), "position": [int(p) for p in (np.arange(bins) * width)[keep]],
            "mean_nll": [float(v) for v in (total[keep] / count[keep])],
            "count": [int(c) for c in count[keep]]}


def majority_vote(predictions: Sequence[Optional[str]],
                  key: Optional[Callable[[str], Hashable]] = None) -> tuple[str, float]:
    """(winner, agreement) over repeated samples' predictions.

    Empty predictions abstain. ``key`` maps a prediction to its equivalence class
    ("18.0" and "18"); the winner is the first-seen prediction of the largest class, so
    ties go to the earliest sample. ``agreement`` is the winner's share of all samples
    (abstentions included); ("", 0.0) when every sample abstains.
    """
    key = key or (lambda p: p)
    counts: Counter = Counter()
    first: dict = {}
    for p in predictions:
        if p is None or not str(p).strip():
            continue
        k = key(p)
        counts[k] += 1
        first.setdefault(k, p)
    if not counts:
        return "", 0.0
    best = max(counts.values())
    winner_key = next(k for k in first if counts[k] == best)  # first seen among the tied
    return first[winner_key], best / len(predictions)


def self_consistency(sample_correct: Sequence[Sequence[bool]], majority_correct: Sequence[bool],
                     agreement: Sequence[float]) -> dict:
    """Summary over items of repeated sampling: per-sample accuracy, majority-vote
    accuracy, mean agreement with the vote, and pass@n (any sample correct)."""
    sc = [np.asarray(s, dtype=np.float64) for s in sample_correct]
    if not sc:
        return {"n_items": 0, "num_samples": 0, "sample_accuracy": None, "majority_vote_accuracy": None,
                "agreement": None, "pass_at_n": None}
    return {"n_items": len(sc), "num_samples": int(max(s.size for s in sc)),
            "sample_accuracy": float(np.mean([s.mean() for s in sc])),
            "majority_vote_accuracy": float(np.mean(np.asarray(majority_correct, np.float64))),
            "agreement": float(np.mean(np.asarray(agreement, np.float64))),
            "pass_at_n": float(np.mean([s.max() if s.size else 0.0 for s in sc]))}


def entropy_curve(entropies: Sequence[Sequence[float]], max_points: int = 64) -> dict:
    """Mean next-token entropy (nats) by output position, binned like ``surprisal_curve``."""
    curve = surprisal_curve([[-e for e in seq] for seq in entropies], max_points)
    curve["mean_entropy"] = curve.pop("mean_nll")
    return curve
