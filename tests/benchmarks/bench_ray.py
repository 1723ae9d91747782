"""`ncf score`: the local engine vs `--engine ray` (Ray Data, a local instance) on one machine.

    .venv/bin/python tests/benchmarks/bench_ray.py [--users N] [--quick]

The larger synthetic grid of bench_score.py (100,000 users x 20,000 items, 50 seen items per
user, NeuMF paper defaults 8 / 64-32-16-8, random weights; the same `make_model`). Both engines
score the same users file, a fixed random sample of the 100,000 users (20,000 by default: about
4e8 pairs, well under 3 minutes per engine on 2 idle cores; --users 100000 for all of them), with
k = 50 and the seen items excluded, and must write the same rows.

Printed per engine: wall time of the whole call, the scoring phase (read, score, write: what
pairs/s is computed over) and, for Ray, its start-up (ray.init of a local instance sized to
this machine) separately. One run each; the machine may be shared: compare within one run.
On one machine Ray cannot beat the local engine (same cores, plus its own processes); what it
buys is the same scorer on as many machines as the cluster has.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_score import K, make_model

N_USERS, N_ITEMS, SEEN = 100_000, 20_000, 50


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20_000, help="users scored (a fixed random sample; default 20,000)")
    ap.add_argument("--quick", action="store_true", help="5,000 users")
    args = ap.parse_args(argv)
    n = min(5_000 if args.quick else args.users, N_USERS)
    warnings.filterwarnings("ignore")

    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.ray_engine import score_users_ray
    from batch.score import score_users
    from batch.scorer import cpu_count

    print(f"== large grid: {N_USERS:,} users x {N_ITEMS:,} items, {SEEN} seen/user; scoring {n:,} users, k={K}, "
          f"{cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="ncf-bench-ray-") as d:
        tmp = Path(d)
        grid, _ = make_model(tmp, "large", N_USERS, N_ITEMS, SEEN)
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(N_USERS, n, replace=False)).astype(np.int64) * 3 + 1  # make_model's raw ids
        users = tmp / "users.parquet"
        pq.write_table(pa.table({"user_id": sample}), users)

        t = time.perf_counter()
        loc = score_users(grid, users, tmp / "local.parquet", k=K, device="cpu", progress=False)
        loc_wall = time.perf_counter() - t
        print(f"  local  wall {loc_wall:6.1f}s  scoring {loc['scoring_seconds']:6.1f}s  "
              f"{loc['pairs_per_s'] / 1e6:6.2f} M pairs/s  ({loc['threads']} threads, chunks of {loc['chunk_users']} users)",
              flush=True)

        t = time.perf_counter()
        ray = score_users_ray(grid, users, tmp / "ray", k=K, device="cpu", progress=False)
        ray_wall = time.perf_counter() - t
        print(f"  ray    wall {ray_wall:6.1f}s  scoring {ray['scoring_seconds']:6.1f}s  "
              f"{ray['pairs_per_s'] / 1e6:6.2f} M pairs/s  ({ray['actors']} actor(s) x {ray['cpus_per_actor']:g} CPU, "
              f"{ray['threads']} threads, {ray['blocks']} blocks of {ray['block_users']} users)")
        print(f"         Ray start-up {ray['startup_seconds']:.1f}s (ray.init, not in the scoring time); "
              f"of the scoring time, {ray['read_seconds']:.1f}s reading the users with Ray Data")

        a = pl.read_parquet(tmp / "local.parquet").sort("user_id", "rank")
        b = pl.read_parquet(tmp / "ray" / "*.parquet").sort("user_id", "rank")
        same = a.select("user_id", "rank", "item_id").equals(b.select("user_id", "rank", "item_id"))
        diff = float(np.abs(a["score"].to_numpy() - b["score"].to_numpy()).max()) if same else float("nan")
        print(f"  same rows: {same} ({a.height:,} rows; max |score diff| {diff:.1e})")
        print(f"\nsummary: local {loc['pairs_per_s'] / 1e6:.2f} M pairs/s ({loc_wall:.1f}s wall), "
              f"ray {ray['pairs_per_s'] / 1e6:.2f} M pairs/s ({ray_wall:.1f}s wall, of which "
              f"{ray['startup_seconds']:.1f}s start-up); ray/local throughput {ray['pairs_per_s'] / loc['pairs_per_s']:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
