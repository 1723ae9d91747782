"""The NCF authors' own test files: `*.test.rating` (user, item, rating, timestamp; one row
per user) and `*.test.negative` (`(user,item)` then 99 negative items), with ids in the
authors' 0-based remapping. Given the original ratings file, the remapping is rebuilt:
user = position in the sorted user ids (ML-1M: UserID - 1), item = order of first
appearance in the file.

Known quirk: in the ML-1M negative file, the test item appears among its own negatives for
156 users. Such a duplicate is dropped (the item is ranked once, as the positive). Users and
items the model never saw are counted; unknown negative items are left out of the ranking,
and a pessimistic bound (each of them scored above the test item) is reported beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ncf.data import read_table
from ncf.errors import NcfError


@dataclass
class OfficialTest:
    users: np.ndarray  # model user index per evaluated row
    items: np.ndarray  # model item index of the test item
    negatives: np.ndarray  # (E, 99) model item indices, -1 = dropped (unknown or duplicate)
    unknown_negatives: np.ndarray  # (E,) how many negatives the model does not know
    n_rows: int
    n_unknown_users: int
    n_unknown_test_items: int
    n_positive_in_negatives: int


def authors_remap(ratings_path: Path) -> tuple[pl.Series, pl.Series]:
    """Raw user ids and raw item ids in the authors' index order."""
    df = read_table(ratings_path)
    users = df[df.columns[0]].unique().sort()
    items = df[df.columns[1]].unique(maintain_order=True)
    return users, items


def _read_negative_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        heads = [ln.split("\t", 1)[0].strip("()").split(",") for ln in lines]
        users = np.array([int(h[0]) for h in heads], dtype=np.int64)
        items = np.array([int(h[1]) for h in heads], dtype=np.int64)
        negs = np.array([[int(x) for x in ln.split("\t")[1:]] for ln in lines], dtype=np.int64)
    except (OSError, ValueError, IndexError) as exc:
        raise NcfError(f"cannot read negative file {path}: expected '(user,item)\\tneg1\\t...' lines ({exc})")
    return users, items, negs


class _Remap:
    """Authors' 0-based ids -> raw ids (identity without a remap file)."""

    def __init__(self, remap_from: Path | None):
        self.users, self.items = authors_remap(remap_from) if remap_from is not None else (None, None)

    @staticmethod
    def _to_raw(ids: np.ndarray, raw: pl.Series | None) -> pl.Series:
        if raw is None:
            return pl.Series(ids)
        ok = ids < len(raw)  # beyond the remap file: unknown (null)
        vals = raw.gather(np.where(ok, ids, 0))
        return pl.select(pl.when(pl.Series(ok)).then(vals).otherwise(None)).to_series()

    def user(self, ids: np.ndarray) -> pl.Series:
        return self._to_raw(ids, self.users)

    def item(self, ids: np.ndarray) -> pl.Series:
        return self._to_raw(ids, self.items)


def _read_rating_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise NcfError(f"test file {path} not found")
    rating = read_table(path)
    if rating.width < 2 or not all(rating[c].dtype.is_integer() for c in rating.columns[:2]):
        raise NcfError(f"{path}: expected integer 'user<TAB>item...' rows (the authors' *.test.rating)")
    return (rating[rating.columns[0]].to_numpy().astype(np.int64),
            rating[rating.columns[1]].to_numpy().astype(np.int64))


def official_test_pairs(rating_path: Path, user_vocab: pl.Series, item_vocab: pl.Series,
                        remap_from: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The test rows as (user index, item index) of a vocabulary, for `ncf fit --test-rating`:
    rows whose user or item the data does not have are left out."""
    r_users, r_items = _read_rating_file(rating_path)
    remap = _Remap(remap_from)
    u, i = _lookup(remap.user(r_users), user_vocab), _lookup(remap.item(r_items), item_vocab)
    keep = (u >= 0) & (i >= 0)
    return u[keep], i[keep]


def load_official_test(rating_path: Path, negative_path: Path, user_vocab: pl.Series,
                       item_vocab: pl.Series, remap_from: Path | None) -> OfficialTest:
    r_users, r_items = _read_rating_file(rating_path)
    if not Path(negative_path).is_file():
        raise NcfError(f"test file {negative_path} not found")
    n_users, n_items, negs = _read_negative_file(negative_path)
    if len(n_users) != len(r_users) or not (np.array_equal(n_users, r_users) and np.array_equal(n_items, r_items)):
        raise NcfError("the rating and negative files do not list the same (user, item) rows in the same order")
    remap = _Remap(remap_from)
    u_all = _lookup(remap.user(r_users), user_vocab)
    i_all = _lookup(remap.item(r_items), item_vocab)
    keep = (u_all >= 0) & (i_all >= 0)
    u_idx, i_idx = u_all[keep], i_all[keep]
    n_idx = _lookup(remap.item(negs.ravel()), item_vocab).reshape(negs.shape)[keep]
    unknown = np.count_nonzero(n_idx < 0, axis=1)
    dup = n_idx == i_idx[:, None]
    n_idx = np.where(dup, -1, n_idx)
    return OfficialTest(
        users=u_idx, items=i_idx, negatives=n_idx, unknown_negatives=unknown,
        n_rows=len(r_users),
        n_unknown_users=int(np.count_nonzero(u_all < 0)),
        n_unknown_test_items=int(np.count_nonzero((u_all >= 0) & (i_all < 0))),
        n_positive_in_negatives=int(dup.any(axis=1).sum()),
    )


def _lookup(raw: pl.Series, vocab: pl.Series) -> np.ndarray:
    """Index of each raw id in the sorted vocabulary, -1 where absent or null."""
    raw = raw.cast(vocab.dtype, strict=False)
    pos = vocab.search_sorted(raw.fill_null(vocab[0]), side="left").to_numpy().astype(np.int64)
    pos = np.minimum(pos, len(vocab) - 1)
    found = (vocab.gather(pos) == raw.fill_null(vocab[0])).to_numpy() & raw.is_not_null().to_numpy()
    return np.where(found, pos, -1)


def official_metrics(score, test: OfficialTest, seen_users: np.ndarray, seen_items: np.ndarray,
                     n_items: int, k: int = 10) -> dict[str, float]:
    """`score` is an evaluation ScoreFn. Sampled ranks over the authors' negatives; full ranking over every item except the
    user's other known interactions; plus the pessimistic bound for unknown negatives."""
    from ncf.evaluation import EvalSet, full_ranks, sampled_ranks
    from ncf.metrics import summarize
    from ncf.sampling import PositiveSet

    ev = EvalSet.build(test.users, test.items, PositiveSet(seen_users, seen_items, n_items),
                       seen_users, seen_items, n_items, seed=0, negatives=test.negatives)
    ranks = sampled_ranks(score, ev)
    return {
        **summarize(ranks, k),
        **summarize(full_ranks(score, ev), k, prefix="full_"),
        **summarize(ranks + test.unknown_negatives, k, prefix="pessimistic_"),
        "users": len(test.users),
    }
