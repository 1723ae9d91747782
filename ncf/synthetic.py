"""A seeded generator of realistic implicit-feedback data, for the demo and tests:
popularity skew (Zipf-like item prior) plus latent structure (users prefer items near
them in a low-dimensional taste space). SYNTHETIC: it is not MovieLens and carries no
licensed data; it only lets the pipeline run end to end with nothing outside the repo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def synthetic_interactions(n_users: int = 800, n_items: int = 1000, dim: int = 8,
                           mean_per_user: int = 40, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    taste_u = rng.normal(size=(n_users, dim))
    taste_i = rng.normal(size=(n_items, dim))
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    rng.shuffle(popularity)
    logits = 2.5 * taste_u @ taste_i.T / np.sqrt(dim) + np.log(popularity)[None, :]
    # Gumbel-top-k: sampling without replacement from softmax(logits), per user
    noisy = logits + rng.gumbel(size=logits.shape)
    counts = np.clip(rng.geometric(1.0 / mean_per_user, size=n_users) + 5, 5, n_items // 2)
    order = np.argsort(-noisy, axis=1)
    users = np.repeat(np.arange(n_users), counts)
    items = np.concatenate([order[u, : counts[u]] for u in range(n_users)])
    items = items[np.lexsort((rng.random(len(users)), users))]  # no taste order in time
    # timestamps: a random walk per user, so later interactions are the held-out ones
    start = 1_600_000_000 + rng.integers(0, 30 * 86400, size=n_users)
    ts = np.repeat(start, counts) + np.cumsum(rng.integers(60, 86400, size=len(users)))
    return pl.DataFrame({
        "user_id": users + 1,
        "item_id": [f"item_{i:05d}" for i in items],
        "timestamp": ts,
    })


def write_demo_csv(path: Path, **kwargs) -> Path:
    synthetic_interactions(**kwargs).write_csv(path)
    return Path(path)
