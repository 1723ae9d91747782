"""Leave-one-out split: each user's latest interaction is the test item, the one before
it the validation item (for early stopping and stage choice), the rest is training data.

Order within a user is (timestamp, item index); without timestamps a seeded random key
per (user, item) stands in. Both depend only on the set of pairs, never on row order.
Users with fewer than 3 interactions cannot spare two: they are trained on entirely,
left out of evaluation, and counted in `n_users_train_only`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncf.data import Interactions

MIN_INTERACTIONS_TO_EVALUATE = 3


@dataclass
class Split:
    train_users: np.ndarray
    train_items: np.ndarray
    val_users: np.ndarray  # one row per evaluated user
    val_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    n_users: int
    n_items: int
    n_users_train_only: int


def leave_one_out(inter: Interactions, seed: int = 0,
                  fixed_test: tuple[np.ndarray, np.ndarray] | None = None) -> Split:
    """`fixed_test` = (user indices, item indices): given test items (e.g. the NCF authors'
    test rows, whose ties in time were broken by no rule we can rebuild); those users'
    validation item is then their latest other interaction."""
    users, items = inter.users, inter.items
    if inter.timestamps is not None:
        when = inter.timestamps
    else:
        when = np.random.default_rng(seed).random(len(users))
    given = np.zeros(len(users), dtype=bool)
    if fixed_test is not None:
        from ncf.sampling import PositiveSet

        given = PositiveSet(*fixed_test, inter.n_items).contains(users, items)
    order = np.lexsort((items, when, given, users))  # by user, given test last, time, item id
    users, items = users[order], items[order]
    counts = np.bincount(users, minlength=inter.n_users)
    ends = np.cumsum(counts)  # one past each user's last row
    evaluated = np.flatnonzero(counts >= MIN_INTERACTIONS_TO_EVALUATE)
    test_rows = ends[evaluated] - 1
    val_rows = ends[evaluated] - 2
    train = np.ones(len(users), dtype=bool)
    train[test_rows] = False
    train[val_rows] = False
    return Split(
        train_users=users[train],
        train_items=items[train],
        val_users=users[val_rows],
        val_items=items[val_rows],
        test_users=users[test_rows],
        test_items=items[test_rows],
        n_users=inter.n_users,
        n_items=inter.n_items,
        n_users_train_only=int(np.count_nonzero((counts > 0) & (counts < MIN_INTERACTIONS_TO_EVALUATE))),
    )
