"""Choosing epochs and stages on validation: a gain must exceed z standard errors of the
paired per-user difference; hand-computed cases."""

import math

import numpy as np

from ncf.pipeline import select_stage
from ncf.train import StageResult, significantly_better

K = 10


def ranks(hits: int, misses: int, hit_rank: int = 0) -> np.ndarray:
    return np.array([hit_rank] * hits + [50] * misses)


def test_any_gain_counts_at_z0():
    best = ranks(50, 50)
    new = best.copy()
    new[50] = 3  # one more hit
    assert significantly_better(new, best, K, 0.0)
    assert not significantly_better(best, new, K, 0.0)
    assert not significantly_better(best, best.copy(), K, 0.0)


def test_gain_must_exceed_z_standard_errors():
    # 100 users; the new ranks gain 4 hits and lose 1: d = +1 x4, -1 x1, 0 x95
    best = ranks(50, 50)
    new = best.copy()
    new[50:54] = 0
    new[0] = 50
    mean = 0.03
    sd = math.sqrt((4 * 0.97**2 + 1.03**2 + 95 * 0.03**2) / 99)
    z = mean / (sd / 10)  # = 1.347...
    assert 1.34 < z < 1.35
    assert significantly_better(new, best, K, 1.34)
    assert not significantly_better(new, best, K, 1.35)


def test_equal_hr_falls_back_to_ndcg():
    best = ranks(50, 50, hit_rank=5)
    new = ranks(50, 50, hit_rank=0)  # same hits, every hit ranked higher: NDCG gain with zero spread
    assert significantly_better(new, best, K, 1.0)
    assert not significantly_better(best, new, K, 1.0)


def _result(name, val_ranks):
    return StageResult(name, None, 0, {}, np.asarray(val_ranks))


def test_later_stage_kept_unless_an_earlier_one_is_significantly_better():
    base = ranks(50, 50)
    slightly_worse = base.copy()
    slightly_worse[[0, 1]] = 50  # two hits lost, one gained: 0.57 standard errors worse
    slightly_worse[60] = 0
    much_worse = ranks(30, 70)
    results = {"gmf": _result("gmf", base), "mlp": _result("mlp", base),
               "neumf": _result("neumf", slightly_worse)}
    assert select_stage(results, K, 1.0) == "neumf"
    assert select_stage(results, K, 0.0) == "mlp"  # z = 0: any loss counts
    results["neumf-sgd"] = _result("neumf-sgd", much_worse)
    assert select_stage(results, K, 1.0) == "neumf"
