"""Real MovieLens data from ../shared/data (or $NCF_DATA); skipped where it is absent.
Nothing derived from it is stored in the repository."""

import numpy as np
import pytest

from ncf.data import load_interactions
from ncf.official import load_official_test, official_test_pairs
from ncf.split import leave_one_out


def test_ml100k_reads_and_splits(shared_data):
    inter = load_interactions(shared_data / "ml-100k" / "u.data")
    assert (len(inter), inter.n_users, inter.n_items) == (100_000, 943, 1_682)
    s = leave_one_out(inter)
    assert len(s.test_users) == len(s.val_users) == 943  # every ML-100K user has >= 20 ratings
    assert len(s.train_users) == 100_000 - 2 * 943
    assert s.n_users_train_only == 0
    # held-out items are each user's latest: test >= validation >= every training row in time
    ts = dict(zip(zip(inter.users.tolist(), inter.items.tolist()), inter.timestamps.tolist()))
    latest_train = np.full(943, -1)
    np.maximum.at(latest_train, s.train_users, [ts[p] for p in zip(s.train_users.tolist(), s.train_items.tolist())])
    val_ts = np.array([ts[p] for p in zip(s.val_users.tolist(), s.val_items.tolist())])
    test_ts = np.array([ts[p] for p in zip(s.test_users.tolist(), s.test_items.tolist())])
    assert (test_ts >= val_ts).all() and (val_ts >= latest_train[s.val_users]).all()


def test_ml1m_half_with_the_authors_test_files(shared_data):
    ratings = shared_data / "ml-1m-partial" / "ratings_users_1-2999.dat"
    rating = shared_data / "ncf-ml-1m" / "ml-1m.test.rating"
    negative = shared_data / "ncf-ml-1m" / "ml-1m.test.negative"
    if not (ratings.is_file() and negative.is_file()):
        pytest.skip("ML-1M files not present")
    inter = load_interactions(ratings)
    assert (len(inter), inter.n_users, inter.n_items) == (487_650, 2_999, 3_615)
    t = load_official_test(rating, negative, inter.user_ids, inter.item_ids, remap_from=ratings)
    assert len(t.users) == 2_999 and t.n_unknown_users == 6_040 - 2_999
    # the authors' test row is each user's latest-timestamp rating (their tie-break is theirs)
    fixed = official_test_pairs(rating, inter.user_ids, inter.item_ids, ratings)
    s = leave_one_out(inter, fixed_test=fixed)
    assert np.array_equal(s.test_items, t.items)
    ts = {(u, i): x for u, i, x in zip(inter.users, inter.items, inter.timestamps)}
    latest = np.full(inter.n_users, -1)
    np.maximum.at(latest, inter.users, inter.timestamps)
    assert all(ts[(u, i)] == latest[u] for u, i in zip(t.users, t.items))
    # no negative is an item the user interacted with (apart from the known self-listing quirk)
    seen = set(zip(inter.users.tolist(), inter.items.tolist()))
    assert not any((u, n) in seen for u, row in zip(t.users, t.negatives) for n in row if n >= 0)
