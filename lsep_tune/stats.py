"""Seed statistics: is a configuration better than a baseline, or is the difference noise?

Runs are compared *paired by seed*: configuration A with seed s and the baseline with seed s share
initial weights, data order and every training draw (all a function of the seed), and the
evaluation uses common random numbers, so the per-seed difference cancels most of the noise that
the two means carry separately. The difference's confidence interval is Student's t over seeds.

Multiplicity: when K candidates are each compared with one baseline, the chance that at least one
pure-noise candidate "wins" grows with K. The verdict therefore uses Bonferroni-adjusted intervals
(level 1 - alpha/K each, so all K hold together with probability >= 1 - alpha). Bonferroni, not
Holm, because it yields an interval a reader can check by eye against zero; with K = 1 the
adjusted interval is the plain 95% interval.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
NO_DIFFERENCE = "no difference beyond noise"


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of per-seed values."""

    n: int
    mean: float
    std: float


def spread(values: Sequence[float]) -> Spread:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Spread(0, math.nan, math.nan)
    return Spread(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """candidate - baseline over matched seeds, with a two-sided t-interval at `confidence`."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(candidate: Sequence[float], baseline: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Both sequences are per-seed values in the same seed order; non-finite pairs are dropped
    (a failed run has no value). Fewer than two pairs give an unbounded interval."""
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, -math.inf, math.inf, confidence, math.nan)
    mean = float(d.mean())
    if n == 1:
        return PairedDifference(1, mean, 0.0, -math.inf, math.inf, confidence, math.nan)
    std = float(d.std(ddof=1))
    if std == 0.0:  # identical differences on every seed: the interval is that one value
        return PairedDifference(n, mean, 0.0, mean, mean, confidence, 1.0 if mean == 0.0 else 0.0)
    sem = std / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sem
    p = float(2 * sps.t.sf(abs(mean) / sem, n - 1))
    return PairedDifference(n, mean, std, mean - half, mean + half, confidence, p)


def adjusted_confidence(comparisons: int, confidence: float = CONFIDENCE) -> float:
    """Bonferroni: each of `comparisons` intervals at 1 - alpha/K keeps the family at 1 - alpha."""
    return 1.0 - (1.0 - confidence) / max(1, comparisons)


def beats(diff: PairedDifference, mode: str) -> bool:
    """Better beyond noise: the whole interval lies on the better side of zero."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return diff.ci_high < 0.0 if mode == "min" else diff.ci_low > 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation, e.g. between search-time and confirmed metrics of the same configurations."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return math.nan
    return float(sps.spearmanr(a[keep], b[keep]).statistic)


@dataclass(frozen=True)
class Decision:
    """The verdict on K candidates against one baseline (see the module note on multiplicity)."""

    winner: str
    verdict: str
    differences: dict[str, PairedDifference]  # at `confidence`, what a reader reports
    adjusted: dict[str, PairedDifference]  # at the Bonferroni level, what decides
    beats_baseline: dict[str, bool]


def decide(values: dict[str, Sequence[float]], baseline: str, mode: str, metric: str = "metric",
           confidence: float = CONFIDENCE) -> Decision:
    """values: per-seed values by configuration name, every list in the same seed order.

    A candidate beats the baseline only if its adjusted paired interval excludes zero on the better
    side; among those, the best mean difference wins. When none does, the baseline is kept.
    """
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not among {sorted(values)}")
    others = [name for name in values if name != baseline]
    the_baseline = "the baseline" if baseline == "baseline" else f"the baseline {baseline}"
    level = adjusted_confidence(len(others), confidence)
    diffs = {n: paired_difference(values[n], values[baseline], confidence) for n in others}
    adjusted = {n: paired_difference(values[n], values[baseline], level) for n in others}
    wins = {n: beats(adjusted[n], mode) for n in others}
    better = [n for n in others if wins[n]]
    if not better:
        seeds = max((d.n for d in diffs.values()), default=0)
        verdict = (f"{NO_DIFFERENCE}: no configuration beats {the_baseline} on {metric} "
                   f"({len(others)} compared, paired over {seeds} seeds, Bonferroni-adjusted); keeping the baseline")
        finite = [n for n in others if math.isfinite(diffs[n].mean)]
        if finite:  # the candidate that came closest, with its interval: how much the seeds could tell
            sign = 1.0 if mode == "min" else -1.0
            near = min(finite, key=lambda n: sign * diffs[n].mean)
            d = diffs[near]
            verdict += (f"; closest: {near} {d.mean:+.4g} (95% CI {d.ci_low:+.4g} to {d.ci_high:+.4g})"
                        if math.isfinite(d.ci_low) else f"; closest: {near} {d.mean:+.4g} (no interval)")
        return Decision(baseline, verdict, diffs, adjusted, wins)
    sign = 1.0 if mode == "min" else -1.0
    winner = min(better, key=lambda n: sign * diffs[n].mean)
    d = diffs[winner]
    verdict = (f"{winner} beats {the_baseline} on {metric}: {d.mean:+.4g} "
               f"(95% CI {d.ci_low:+.4g} to {d.ci_high:+.4g}, paired over {d.n} seeds; "
               f"holds at the Bonferroni level over {len(others)} compared)")
    return Decision(winner, verdict, diffs, adjusted, wins)
