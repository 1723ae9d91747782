"""Batch top-k scoring: naive per-pair baseline vs the `ncf score` path, in one process.

    .venv/bin/python tests/benchmarks/bench_score.py [--quick]

Same random NeuMF weights (paper defaults: 8 factors, MLP 64-32-16-8) for both paths:
  (a) the machine's fp32 matmul rate (numpy, 2048^2; the best of measurements at the start and
      before every round, as this VM's speed drifts), the yardstick for the FLOP fraction;
  (b) an ML-1M-sized grid, 6,040 users x 3,706 items, ~160 seen items per user;
  (c) a larger synthetic grid, 100,000 users x 20,000 items, 50 seen items per user.
Baseline: the per-pair ONNX graph (model.pair.onnx) fed every (user, item) pair of a chunk of
users, seen items set to -inf, top-k by numpy argpartition + sort. Ours: `GridScorer.topk`
(the grid graph with its ReLU tower and its masked top-k as custom operators, batch/fused.py) and the
whole `score_users` run (Parquet in, Parquet out); as an ablation, `GridScorer.topk` on the plain
grid graph (every tower layer a separate ONNX operator). All exclude the seen items. The slow baseline and the large grid run on samples of users (sizes printed).
This shared VM's speed drifts by tens of percent within seconds, so the paths take turns:
each round runs the baseline, the plain graph, GridScorer.topk, then the whole `ncf score` path, and the
ratio of a round compares passes made seconds apart. Printed: the median rate of each path and
the median of the per-round ratios (the lowest and highest round in brackets).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

K = 50


def flops_per_pair(factors: int, layers: tuple[int, ...]) -> int:
    """After the split: add + activation of layer 1, each further layer's multiply-adds,
    bias and activation, the MLP output weights, the GMF dot product, the two final adds."""
    f = 2 * layers[1]  # first layer, split: only the add and the activation remain per pair
    for a, b in itertools.pairwise(layers[1:]):
        f += 2 * a * b + 2 * b
    f += 2 * layers[-1] + 2 * factors + 2
    return f


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def make_model(tmp: Path, name: str, n_users: int, n_items: int, seen_per_user: int, seed: int = 0):
    import polars as pl
    import torch

    from export.onnx_export import export_model
    from ncf.checkpoint import save_model_dir
    from ncf.models import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig("neumf", n_users, n_items, factors=8, layers=(64, 32, 16, 8)))
    with torch.no_grad():  # trained-like spread of scores instead of the N(0, 0.01) init
        for emb in (model.user_gmf, model.item_gmf, model.mlp_embedding):
            emb.weight.normal_(0, 0.5)
    rng = np.random.default_rng(seed)
    su = np.repeat(np.arange(n_users, dtype=np.int32), seen_per_user)
    # popularity-skewed seen items, like real feedback
    si = np.minimum(rng.zipf(1.3, len(su)) - 1, n_items - 1).astype(np.int32)
    si = (si + rng.integers(0, 7, len(su))) % n_items
    d = tmp / f"{name}-model"
    save_model_dir(
        d, model,
        user_ids=pl.Series("user_id", np.arange(n_users, dtype=np.int64) * 3 + 1),
        item_ids=pl.Series("item_id", np.arange(n_items, dtype=np.int64) * 5 + 2),
        seen_users=su, seen_items=si,
    )
    t = time.perf_counter()
    summary = export_model(d, tmp / f"{name}.onnx")
    print(f"  export {name}: {time.perf_counter() - t:.1f}s, max |dp| vs torch {summary['max_abs_diff']:.1e}", flush=True)
    return tmp / f"{name}.onnx", tmp / f"{name}.pair.onnx"


def baseline_session(pair_path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(pair_path), so, providers=["CPUExecutionProvider"])


def baseline(sess, users: np.ndarray, n_items: int, indptr, seen, chunk: int = 16):
    """One pass: (pairs/s, top-k item indices)."""
    items = np.arange(n_items, dtype=np.int64)
    out = np.empty((len(users), K), np.int64)
    t = time.perf_counter()
    for lo in range(0, len(users), chunk):
        u = users[lo:lo + chunk]
        (score,) = sess.run(["score"], {"user": np.repeat(u, n_items), "item": np.tile(items, len(u))})
        score = score.reshape(len(u), n_items)
        for r, uu in enumerate(u):
            score[r, seen[indptr[uu]:indptr[uu + 1]]] = -np.inf
        part = np.argpartition(-score, K, axis=1)[:, :K]
        top = np.take_along_axis(score, part, 1)
        out[lo:lo + chunk] = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), 1)
    return len(users) * n_items / (time.perf_counter() - t), out


def ours_topk(sc, users: np.ndarray):
    """One pass of GridScorer.topk: (pairs/s, result)."""
    t = time.perf_counter()
    res = sc.topk(users, K)
    return len(users) * sc.n_candidates / (time.perf_counter() - t), res


def ours_score(model_path: Path, users_path: Path, out: Path):
    """The whole `ncf score` run; rate over its scoring phase (read, score, write Parquet),
    loading time printed separately."""
    from batch.score import score_users

    s = score_users(model_path, users_path, out, k=K, device="cpu", progress=False)
    return s["pairs_per_s"], s


def grid(name, tmp, n_users, n_items, seen_per_user, base_sample, ours_sample, gflops, fpp, rng,
         rounds: int, score_all: bool = False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.scorer import GridScorer

    print(f"\n== {name}: {n_users:,} users x {n_items:,} items, {seen_per_user} seen/user", flush=True)
    grid_path, pair_path = make_model(tmp, name, n_users, n_items, seen_per_user)
    base_users = np.sort(rng.choice(n_users, min(base_sample, n_users), replace=False)).astype(np.int64)
    ours_users = np.sort(rng.choice(n_users, min(ours_sample, n_users), replace=False)).astype(np.int64)
    score_users_idx = np.arange(n_users, dtype=np.int64) if score_all else ours_users
    users_path = tmp / f"{name}-users.parquet"  # raw ids: index * 3 + 1 (make_model's vocabulary)
    pq.write_table(pa.table({"user_id": score_users_idx * 3 + 1}), users_path)
    sess = baseline_session(pair_path)
    rates: dict[str, list[float]] = {"baseline": [], "plain": [], "topk": [], "score": []}
    with GridScorer(grid_path, device="cpu") as sc, GridScorer(grid_path, device="cpu", fuse=False) as plain:
        print(f"  kernel: {sc.kernel_note}", flush=True)
        indptr, seen = sc.meta.seen_indptr, sc.meta.seen_items
        chunk, threads = sc.chunk_users, sc.threads
        baseline(sess, base_users[:32], n_items, indptr, seen)  # warm-up all
        sc.topk(ours_users[: 4 * chunk * threads], K)
        plain.topk(ours_users[: 4 * plain.chunk_users * threads], K)
        for r in range(rounds):
            gflops = max(gflops, matmul_gflops(reps=2))  # the yardstick: the best this run saw
            b_rate, b_top = baseline(sess, base_users, n_items, indptr, seen)
            p_rate, _ = ours_topk(plain, ours_users)
            o_rate, o_res = ours_topk(sc, ours_users)
            s_rate, s_sum = ours_score(grid_path, users_path, tmp / f"{name}-topn.parquet")
            for key, v in (("baseline", b_rate), ("plain", p_rate), ("topk", o_rate), ("score", s_rate)):
                rates[key].append(v)
            print(f"  round {r + 1}: baseline {b_rate / 1e6:6.2f} M  plain graph {p_rate / 1e6:6.2f} M  topk {o_rate / 1e6:6.2f} M  "
                  f"score_users {s_rate / 1e6:6.2f} M pairs/s  ratio {s_rate / b_rate:4.1f}x", flush=True)
    # agreement on the users both paths scored (items may differ only at exact ties)
    common = np.intersect1d(base_users, ours_users)
    agree = np.nan
    if len(common):
        bi = b_top[np.searchsorted(base_users, common)]
        oi = o_res.items[np.searchsorted(ours_users, common)]
        agree = float((bi == oi).mean())
    med = {key: float(np.median(v)) for key, v in rates.items()}
    ratios = {key: np.array(rates[key]) / np.array(rates["baseline"]) for key in ("plain", "topk", "score")}

    def ratio_text(key):
        r = ratios[key]
        return f"ratio {np.median(r):4.1f}x [{r.min():.1f}-{r.max():.1f}]"

    def share(rate):
        return f"{rate * fpp / 1e9 / gflops:6.1%} of FLOP limit"

    print(f"  FLOP limit: numpy fp32 matmul at its best in this run, {gflops:.1f} GFLOP/s -> {gflops * 1e9 / fpp / 1e6:.1f} M pairs/s")

    print(f"  baseline  per-pair graph + numpy top-k          users={len(base_users):>7,}  {med['baseline'] / 1e6:7.2f} M pairs/s  "
          f"{share(med['baseline'])}")
    print(f"  ablation  GridScorer.topk, plain graph (B={plain.chunk_users})    users={len(ours_users):>7,}  {med['plain'] / 1e6:7.2f} M pairs/s  "
          f"{share(med['plain'])}   {ratio_text('plain')}")
    print(f"  ours      GridScorer.topk (B={chunk}, {threads} threads)   users={len(ours_users):>7,}  {med['topk'] / 1e6:7.2f} M pairs/s  "
          f"{share(med['topk'])}   {ratio_text('topk')}")
    print(f"  ours      score_users (Parquet in/out)         users={s_sum['users_scored']:>7,}  {med['score'] / 1e6:7.2f} M pairs/s  "
          f"{share(med['score'])}   {ratio_text('score')}   (+{s_sum['seconds'] - s_sum['scoring_seconds']:.1f}s loading the model)")
    print(f"  top-{K} agreement with the baseline on {len(common)} common users: {agree:.4f}")
    return {**med, "gflops": gflops, "ratio": float(np.median(ratios["score"])), "ratio_topk": float(np.median(ratios["topk"])),
            "ratio_plain": float(np.median(ratios["plain"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small samples (about 1 minute)")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    fpp = flops_per_pair(8, (64, 32, 16, 8))
    gflops = matmul_gflops()
    print(f"machine: numpy fp32 matmul {gflops:.1f} GFLOP/s; NeuMF 8 / 64-32-16-8 after the split: {fpp} FLOP/pair "
          f"-> FLOP limit {gflops * 1e9 / fpp / 1e6:.1f} M pairs/s")
    rng = np.random.default_rng(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ncf-bench-") as d:
        tmp = Path(d)
        if args.quick:
            results["ml1m"] = grid("ML-1M-sized", tmp, 6040, 3706, 160, 400, 2000, gflops, fpp, rng, rounds=2)
            results["large"] = grid("large", tmp, 100_000, 20_000, 50, 100, 1000, gflops, fpp, rng, rounds=2)
        else:
            results["ml1m"] = grid("ML-1M-sized", tmp, 6040, 3706, 160, 1000, 6040, gflops, fpp, rng, rounds=5)
            results["large"] = grid("large", tmp, 100_000, 20_000, 50, 200, 10_000, gflops, fpp, rng, rounds=3)
    print("\nsummary (pairs/s; ratio = ours / baseline):")
    for name, r in results.items():
        print(f"  {name:6s} baseline {r['baseline'] / 1e6:6.2f} M  topk {r['topk'] / 1e6:6.2f} M  "
              f"score_users {r['score'] / 1e6:6.2f} M  ratio {r['ratio']:4.1f}x (topk {r['ratio_topk']:.1f}x, "
              f"plain graph {r['ratio_plain']:.1f}x)  "
              f"(median of rounds; target >= 5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
