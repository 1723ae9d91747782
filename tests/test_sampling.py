import time

import numpy as np

from ncf.sampling import PositiveSet, evaluation_negatives, training_negatives


def _data(rng, n_users=50, n_items=40):
    users = np.repeat(np.arange(n_users), 15)
    items = np.concatenate([rng.choice(n_items, 15, replace=False) for _ in range(n_users)])
    return users, items


def test_training_negatives_are_never_positives_and_resampled():
    rng = np.random.default_rng(0)
    users, items = _data(rng)
    pos = PositiveSet(users, items, 40)
    nu, ni = training_negatives(users, pos, 4, rng)
    assert len(nu) == 4 * len(users)
    assert not pos.contains(nu, ni).any()
    _, ni2 = training_negatives(users, pos, 4, rng)
    assert not np.array_equal(ni, ni2)  # redrawn each epoch


def test_evaluation_negatives_unique_unseen_and_not_the_test_item():
    rng = np.random.default_rng(1)
    users, items = _data(rng, n_users=30, n_items=130)
    pos = PositiveSet(users, items, 130)
    eval_users = np.arange(30)
    negs = evaluation_negatives(eval_users, pos, 99, rng)
    assert negs.shape == (30, 99)
    for u, row in zip(eval_users, negs):
        assert len(set(row.tolist())) == 99
        assert not set(row.tolist()) & set(items[users == u].tolist())  # includes the test item


def test_evaluation_negatives_pad_when_too_few_items():
    users = np.repeat([0], 8)
    items = np.arange(8)
    pos = PositiveSet(users, items, 10)
    negs = evaluation_negatives(np.array([0]), pos, 5, np.random.default_rng(0))
    assert sorted(negs[0].tolist()) == [-1, -1, -1, 8, 9]


def test_epoch_data_rows_labels_and_fresh_negatives():
    import torch

    from ncf.train import EpochData

    rng = np.random.default_rng(2)
    users, items = _data(rng)
    data = EpochData(users, items, 40, torch.device("cpu"))
    pos = PositiveSet(users, items, 40)
    u, i, y = (t.numpy().copy() for t in data.draw(4, rng))
    assert len(u) == 5 * len(users) and y.sum() == len(users)
    assert sorted(zip(u[y == 1].tolist(), i[y == 1].tolist())) == sorted(zip(users.tolist(), items.tolist()))
    assert not pos.contains(u[y == 0], i[y == 0]).any()
    assert np.array_equal(np.bincount(u[y == 0]), 4 * np.bincount(users))
    u2, i2, y2 = (t.numpy() for t in data.draw(4, rng))
    assert not pos.contains(u2[y2 == 0], i2[y2 == 0]).any()
    assert not np.array_equal(u, u2)  # reshuffled and redrawn


def test_prefetched_epochs_equal_sequential_draws():
    """EpochData.epochs draws epoch e + 1 in a background thread while e trains: the same
    data as drawing one epoch after the other, and epoch e's tensors stay intact meanwhile."""
    import torch

    from ncf.train import EpochData

    users, items = _data(np.random.default_rng(5))
    sequential = EpochData(users, items, 40, torch.device("cpu"))
    rng = np.random.default_rng(7)
    expected = [[t.clone() for t in sequential.draw(4, rng)] for _ in range(3)]

    prefetched = EpochData(users, items, 40, torch.device("cpu"))
    seen = 0
    for epoch, tensors in enumerate(prefetched.epochs(4, np.random.default_rng(7), 3)):
        time.sleep(0.2)  # "training": the next epoch's draw completes meanwhile
        for got, want in zip(tensors, expected[epoch], strict=True):
            assert torch.equal(got, want)  # the same data, untouched by the next draw
        seen += 1
    assert seen == 3
    assert not torch.equal(expected[0][1], expected[1][1])


def test_prefetched_epochs_raise_draw_errors_and_close_early():
    import pytest
    import torch

    from ncf.train import EpochData

    users, items = _data(np.random.default_rng(5))
    data = EpochData(users, items, 40, torch.device("cpu"))
    it = data.epochs(4, np.random.default_rng(1), 5)
    next(it)
    it.close()  # stops after epoch 1: waits for epoch 2's draw, leaves no worker behind
    with pytest.raises(StopIteration):
        next(it)

    class Broken(np.random.Generator):
        def integers(self, *a, **k):
            raise RuntimeError("rng broke")

    broken = Broken(np.random.PCG64(0))
    with pytest.raises(RuntimeError, match="rng broke"):
        next(EpochData(users, items, 40, torch.device("cpu")).epochs(4, broken, 2))
