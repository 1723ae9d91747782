"""Ranking metrics. With r the 0-based rank of the held-out item among its candidates:
HR@K = [r < K], NDCG@K = 1 / log2(r + 2) if r < K else 0. Ties count against the
held-out item: r = #(candidates scoring higher) + #(other candidates scoring equal)."""

from __future__ import annotations

import numpy as np


def rank_of_positive(pos_scores: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
    """pos_scores (E,), cand_scores (E, C) of the other candidates (-inf = not a candidate)."""
    pos = pos_scores[:, None]
    return np.count_nonzero(cand_scores >= pos, axis=1)


def hit_ratio(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)
    return float(np.mean(gains))


def summarize(ranks: np.ndarray, k: int, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}hr@{k}": hit_ratio(ranks, k), f"{prefix}ndcg@{k}": ndcg(ranks, k)}
