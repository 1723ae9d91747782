import numpy as np
import polars as pl

from ncf.data import index_interactions
from ncf.split import leave_one_out


def _frame():
    return pl.DataFrame({
        "user": ["a", "a", "a", "a", "b", "b", "b", "c", "c"],
        "item": [10, 11, 12, 13, 10, 12, 14, 10, 11],
        "ts": [1, 5, 3, 5, 2, 9, 7, 1, 2],
    })


def test_latest_is_test_second_latest_is_validation_ties_by_item():
    inter = index_interactions(_frame())
    s = leave_one_out(inter)
    uid, iid = inter.user_ids.to_list(), inter.item_ids.to_list()
    test = {uid[u]: iid[i] for u, i in zip(s.test_users, s.test_items)}
    val = {uid[u]: iid[i] for u, i in zip(s.val_users, s.val_items)}
    # user a: ts 5 for items 11 and 13 -> ordered by item: 13 is latest
    assert test == {"a": 13, "b": 12}
    assert val == {"a": 11, "b": 14}
    assert s.n_users_train_only == 1  # c has two interactions: trained on, not evaluated
    assert len(s.train_users) == 9 - 4


def test_split_identical_under_row_shuffle():
    rng = np.random.default_rng(0)
    n = 3000
    frame = pl.DataFrame({"user": rng.integers(0, 100, n), "item": rng.integers(0, 300, n),
                          "ts": rng.integers(0, 50, n)})  # many timestamp ties
    a = leave_one_out(index_interactions(frame))
    b = leave_one_out(index_interactions(frame.sample(fraction=1.0, shuffle=True, seed=3)))
    for field in ("train_users", "train_items", "val_users", "val_items", "test_users", "test_items"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_split_without_timestamps_is_seeded_and_order_free():
    frame = _frame().drop("ts")
    a = leave_one_out(index_interactions(frame), seed=1)
    b = leave_one_out(index_interactions(frame.reverse()), seed=1)
    assert np.array_equal(a.test_items, b.test_items) and np.array_equal(a.val_items, b.val_items)


def test_fixed_test_items_override_the_latest():
    inter = index_interactions(_frame())
    a = inter.user_ids.to_list().index("a")
    item10 = inter.item_ids.to_list().index(10)
    s = leave_one_out(inter, fixed_test=(np.array([a]), np.array([item10])))
    iid = inter.item_ids.to_list()
    assert iid[s.test_items[0]] == 10  # given, although it is a's earliest interaction
    assert iid[s.val_items[0]] == 13  # latest of the rest
    assert iid[s.test_items[1]] == 12  # b: plain leave-one-out
