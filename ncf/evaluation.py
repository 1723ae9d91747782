"""Leave-one-out evaluation in large batches: the paper's protocol (held-out item among
99 sampled items the user never interacted with, seeded) and full ranking (among every
item the user has not interacted with otherwise). Models are called as
`score(users, items) -> logits` on flat int64 arrays, so ItemPop fits the same slot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ncf.metrics import rank_of_positive, summarize
from ncf.sampling import PositiveSet, evaluation_negatives

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
NUM_EVAL_NEGATIVES = 99


@dataclass
class EvalSet:
    """One held-out item per user, its sampled negatives, and what full ranking excludes."""

    users: np.ndarray
    items: np.ndarray
    negatives: np.ndarray  # (E, 99), -1 = padding
    exclude_indptr: np.ndarray  # CSR over `users`: items not ranked against in full ranking
    exclude_items: np.ndarray
    n_items: int

    @classmethod
    def build(cls, users, items, all_positives: PositiveSet, exclude_users, exclude_items,
              n_items: int, seed: int, negatives: np.ndarray | None = None) -> EvalSet:
        if negatives is None:
            negatives = evaluation_negatives(users, all_positives, NUM_EVAL_NEGATIVES,
                                             np.random.default_rng(seed))
        row_of_user = np.full(max(int(users.max(initial=-1)), int(exclude_users.max(initial=-1))) + 1, -1)
        row_of_user[users] = np.arange(len(users))
        rows = row_of_user[exclude_users]
        keep = rows >= 0
        rows, ex_items = rows[keep], exclude_items[keep]
        # the held-out item itself is ranked, never excluded
        keep = ex_items != items[rows]
        rows, ex_items = rows[keep], ex_items[keep]
        order = np.lexsort((ex_items, rows))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(users)))])
        return cls(users, items, negatives, indptr, ex_items[order], n_items)

    def __len__(self) -> int:
        return len(self.users)


def sampled_ranks(score: ScoreFn, ev: EvalSet, batch_rows: int = 4096) -> np.ndarray:
    ranks = np.empty(len(ev), dtype=np.int64)
    for a in range(0, len(ev), batch_rows):
        b = min(a + batch_rows, len(ev))
        cands = np.concatenate([ev.items[a:b, None], ev.negatives[a:b]], axis=1)
        valid = cands >= 0
        users = np.broadcast_to(ev.users[a:b, None], cands.shape)
        s = np.full(cands.shape, -np.inf, dtype=np.float64)
        s[valid] = score(users[valid], cands[valid])
        ranks[a:b] = rank_of_positive(s[:, 0], s[:, 1:])
    return ranks


def full_ranks(score: ScoreFn, ev: EvalSet, max_pairs: int = 4_000_000) -> np.ndarray:
    n = ev.n_items
    rows_per_batch = max(1, max_pairs // n)
    ranks = np.empty(len(ev), dtype=np.int64)
    all_items = np.arange(n, dtype=np.int64)
    for a in range(0, len(ev), rows_per_batch):
        b = min(a + rows_per_batch, len(ev))
        users = np.repeat(ev.users[a:b], n)
        s = score(users, np.tile(all_items, b - a)).astype(np.float64).reshape(b - a, n)
        lo, hi = ev.exclude_indptr[a], ev.exclude_indptr[b]
        row_ids = np.repeat(np.arange(b - a), np.diff(ev.exclude_indptr[a : b + 1]))
        s[row_ids, ev.exclude_items[lo:hi]] = -np.inf
        local = np.arange(b - a)
        pos = s[local, ev.items[a:b]]
        s[local, ev.items[a:b]] = -np.inf  # the held-out item is not its own competitor
        ranks[a:b] = rank_of_positive(pos, s)
    return ranks


def evaluate(score: ScoreFn, ev: EvalSet, k: int = 10, full: bool = True) -> dict[str, float]:
    out = summarize(sampled_ranks(score, ev), k)
    if full:
        out.update(summarize(full_ranks(score, ev), k, prefix="full_"))
    out["users"] = len(ev)
    return out


def torch_scorer(model: torch.nn.Module, batch: int = 1 << 18) -> ScoreFn:
    """Wrap a model as a ScoreFn: logits (not probabilities; sigmoid saturates in float32)."""

    @torch.no_grad()
    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = np.empty(len(users), dtype=np.float32)
        u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64)).to(device)
        i = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64)).to(device)
        for a in range(0, len(users), batch):
            out[a : a + batch] = model(u[a : a + batch], i[a : a + batch]).float().cpu().numpy()
        model.train(was_training)
        return out

    return score


def popularity_scorer(train_items: np.ndarray, n_items: int) -> ScoreFn:
    """ItemPop: an item's score is its number of training interactions."""
    counts = np.bincount(train_items, minlength=n_items).astype(np.float32)
    return lambda users, items: counts[items]
