import math

import pytest

from lsep_tune.stats import (
    NO_DIFFERENCE,
    adjusted_confidence,
    beats,
    decide,
    paired_difference,
    spearman,
    spread,
)

# Student t quantiles from a table: t(0.975, 2) = 4.302653, t(0.975, 3) = 3.182446.


def test_spread_uses_the_sample_standard_deviation():
    s = spread([1.0, 2.0, 3.0, 6.0])
    assert s.n == 4 and s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(14 / 3))  # squares 4+1+0+9 over n-1
    assert spread([5.0]).std == 0.0


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half width 4.302653 / sqrt(3) = 2.484138
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert (d.n, d.mean, d.std) == (3, 2.0, 1.0)
    assert d.ci_low == pytest.approx(-0.484138, abs=1e-5)
    assert d.ci_high == pytest.approx(4.484138, abs=1e-5)
    # differences 2, 3, 4, 5: mean 3.5, sd sqrt(5/3), half width 3.182446 * 1.290994 / 2 = 2.054254
    d = paired_difference([2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0])
    assert d.ci_low == pytest.approx(1.445746, abs=1e-5)
    assert d.ci_high == pytest.approx(5.554254, abs=1e-5)
    assert d.p_value < 0.05


def test_pairing_removes_the_shared_seed_effect():
    # Seeds move both configurations a lot; the candidate is always exactly 1 lower.
    base = [100.0, 80.0, 120.0]
    cand = [99.0, 79.0, 119.0]
    d = paired_difference(cand, base)
    assert (d.mean, d.ci_low, d.ci_high) == (-1.0, -1.0, -1.0)
    assert beats(d, "min") and not beats(d, "max")


def test_failed_runs_are_dropped_pairwise_and_one_pair_is_no_evidence():
    d = paired_difference([1.0, math.nan, 3.0], [0.0, 0.0, math.nan])
    assert d.n == 1 and d.ci_low == -math.inf and not beats(d, "min") and not beats(d, "max")


def test_bonferroni_level():
    assert adjusted_confidence(1) == pytest.approx(0.95)
    assert adjusted_confidence(5) == pytest.approx(0.99)


def test_decide_names_the_better_configuration():
    values = {"base": [10.0, 12.0, 11.0], "good": [5.0, 6.5, 5.5], "same": [10.2, 11.7, 11.1]}
    dec = decide(values, "base", "min", "fid")
    assert dec.winner == "good"
    assert dec.beats_baseline == {"good": True, "same": False}
    assert dec.differences["good"].ci_high < 0
    assert dec.verdict.startswith("good beats the baseline base on fid")
    # The adjusted interval (two comparisons: 97.5%) is wider than the reported 95% one.
    assert dec.adjusted["good"].ci_low < dec.differences["good"].ci_low


def test_decide_keeps_the_baseline_when_nothing_beats_it():
    values = {"base": [10.0, 12.0, 11.0], "twin": [10.0, 12.0, 11.0]}
    dec = decide(values, "base", "min", "fid")
    assert dec.winner == "base" and NO_DIFFERENCE in dec.verdict
    # The verdict says how close the nearest candidate came, with its interval.
    dec = decide({"base": [10.0, 12.0, 11.0], "near": [9.0, 12.5, 10.0], "far": [12.0, 13.0, 12.5]}, "base", "min")
    d = dec.differences["near"]
    assert dec.winner == "base" and d.ci_low < 0 < d.ci_high
    assert dec.verdict.endswith(f"; closest: near {d.mean:+.4g} (95% CI {d.ci_low:+.4g} to {d.ci_high:+.4g})")
    # Better in the wrong direction is not a win either.
    dec = decide({"base": [1.0, 2.0, 3.0], "worse": [2.0, 3.0, 4.0]}, "base", "min")
    assert dec.winner == "base"
    dec = decide({"base": [1.0, 2.0, 3.0], "higher": [2.0, 3.0, 4.0]}, "base", "max")
    assert dec.winner == "higher"


def test_multiplicity_can_turn_a_marginal_win_into_noise():
    # differences 1, 2, 3 + 0.2: the 95% interval just excludes zero only for one comparison.
    base = [0.0, 0.0, 0.0]
    values = {"base": base, "c": [-2.0, -2.6, -3.4]}
    alone = decide(values, "base", "min")
    assert alone.winner == "c"
    crowd = dict(values, **{f"noise{i}": [0.1 * i, -0.1 * i, 0.0] for i in range(1, 20)})
    assert decide(crowd, "base", "min").winner == "base"


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


# ----- the evaluation's own uncertainty -----------------------------------------------------------

def test_fid_bootstrap_std_matches_the_spread_over_fresh_samples(tmp_path):
    """The bootstrap spread of one set's FID should be about the spread of FID over disjoint sets."""
    import numpy as np

    from lsep_tune.data.digits import load_digits_split, to_uint8
    from lsep_tune.evaluation import compute_metrics

    images = to_uint8(load_digits_split("train")[0])
    size = 250
    sets = [images[i * size:(i + 1) * size] for i in range(len(images) // size)]
    outs = [compute_metrics(s, "digits", "fid", cache_dir=str(tmp_path), fid_bootstraps=20) for s in sets]
    between = float(np.std([o["fid"] for o in outs], ddof=1))
    within = float(np.mean([o["fid_std"] for o in outs]))
    assert all(o["fid_std"] > 0 for o in outs)
    print("fid spread: bootstrap", within, "between sets", between)
    assert 0.33 * between < within < 3.0 * between, (within, between)
    again = compute_metrics(sets[0], "digits", "fid", cache_dir=str(tmp_path), fid_bootstraps=20)
    assert again == outs[0]  # fixed resampling seed: the same features give the same spread
    assert "fid_std" not in compute_metrics(sets[0], "digits", "fid", cache_dir=str(tmp_path))


def test_in_training_evaluation_uses_common_random_numbers(digits_cfg):
    """Two runs with different training seeds are scored on the same sampler noise and labels,
    so the same weights give the same numbers; the report carries the FID's uncertainty."""
    import torch

    from lsep_tune.train.step import build_objective
    from lsep_tune.evaluation.in_training import evaluate_samples

    cfg = digits_cfg.model_copy(update={"sampling": digits_cfg.sampling.model_copy(update={"steps": 2})})
    torch.manual_seed(0)
    sit = build_objective(cfg).sit
    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 7})})
    a = evaluate_samples(sit, cfg, torch.device("cpu"), n=120)
    b = evaluate_samples(sit, other, torch.device("cpu"), n=120)
    assert set(a) == {"fid", "fid_std", "isc_mean", "isc_std"}
    assert a == b and a["fid_std"] > 0
