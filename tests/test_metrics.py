import numpy as np
import pytest

from ncf.evaluation import EvalSet, full_ranks, sampled_ranks
from ncf.metrics import hit_ratio, ndcg, rank_of_positive
from ncf.sampling import PositiveSet


def test_rank_counts_ties_against_the_positive():
    pos = np.array([0.5, 0.5, 0.9])
    cands = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.1], [0.95, 0.9, -np.inf]])
    assert rank_of_positive(pos, cands).tolist() == [0, 2, 2]


def test_hr_and_ndcg_hand_computed():
    ranks = np.array([0, 1, 9, 10, 50])
    assert hit_ratio(ranks, 10) == pytest.approx(3 / 5)
    expected = (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(11)) / 5
    assert ndcg(ranks, 10) == pytest.approx(expected, abs=1e-12)
    assert ndcg(np.array([0]), 10) == 1.0  # rank 0 -> 1/log2(2)


def test_constant_scores_look_bad():
    """A model that scores everything equal must rank the held-out item last."""
    n_items = 200
    users = np.arange(5)
    items = np.arange(5)
    pos = PositiveSet(users, items, n_items)
    ev = EvalSet.build(users, items, pos, users[:0], items[:0], n_items, seed=0)
    const = lambda u, i: np.zeros(len(u), np.float32)
    assert sampled_ranks(const, ev).tolist() == [99] * 5
    assert full_ranks(const, ev).tolist() == [n_items - 1] * 5


def test_full_ranking_excludes_other_positives():
    n_items = 6
    # user 0: held-out item 2; item 5 scores higher but is a known positive (excluded)
    ev = EvalSet.build(np.array([0]), np.array([2]), PositiveSet(np.array([0, 0]), np.array([2, 5]), n_items),
                       np.array([0]), np.array([5]), n_items, seed=0)
    scores = np.array([0.1, 0.3, 0.5, 0.5, 0.2, 0.9])
    r = full_ranks(lambda u, i: scores[i], ev)
    assert r.tolist() == [1]  # item 3 ties -> counted against; item 5 excluded
