"""Peak memory of `ncf score` as the users file grows: N, 10N and 100N users, same model.

    .venv/bin/python tests/benchmarks/bench_memory.py [--n 2000] [--items 2000]

One synthetic NeuMF model (`make_model` of bench_score.py) with 100N users; each run scores
the first N, 10N or 100N of them (shuffled, plus 1% duplicates) in a fresh subprocess and
reports the peak resident set size (VmHWM of that process). Scoring streams the users file
and writes parts as it goes, so the peak should be flat within noise: what grows with the
users file is only the output on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model: str, users: str, out: str, k: int) -> int:
    """One scoring run; prints its summary and peak RSS as JSON."""
    from batch.score import score_users

    before = vm_hwm_mb()
    s = score_users(Path(model), Path(users), Path(out), k=k, device="cpu", progress=False)
    print(json.dumps({"users": s["users_in"], "rows": s["rows"], "seconds": s["seconds"],
                      "pairs_per_s": s["pairs_per_s"], "hwm_mb": vm_hwm_mb(), "hwm_before_mb": before}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="smallest users file (N); also 10N and 100N")
    ap.add_argument("--items", type=int, default=2000, help="items in the model (all are candidates)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "USERS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child, args.k)
    import warnings

    warnings.filterwarnings("ignore")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_score import make_model

    sizes = [args.n, 10 * args.n, 100 * args.n]
    print(f"peak RSS of `ncf score` (k={args.k}) for {', '.join(f'{s:,}' for s in sizes)} users; "
          f"one model of {sizes[-1]:,} users x {args.items:,} items", flush=True)
    with tempfile.TemporaryDirectory(prefix="ncf-bench-mem-") as d:
        tmp = Path(d)
        t = time.perf_counter()
        model, _ = make_model(tmp, "mem", sizes[-1], args.items, 20)
        print(f"  model built in {time.perf_counter() - t:.1f}s ({model.stat().st_size / 1e6:.0f} MB)", flush=True)
        rng = np.random.default_rng(0)
        all_ids = rng.permutation(sizes[-1]).astype(np.int64) * 3 + 1  # raw ids of make_model
        rows = []
        for n in sizes:
            ids = all_ids[:n]
            ids = np.concatenate([ids, ids[rng.integers(0, n, n // 100)]])  # 1% duplicates
            up = tmp / f"users-{n}.parquet"
            pq.write_table(pa.table({"user_id": ids}), up)
            out = tmp / f"topn-{n}.parquet"
            r = subprocess.run([sys.executable, __file__, "--k", str(args.k), "--child", str(model), str(up), str(out)],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                print(r.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            out_mb = out.stat().st_size / 1e6
            rows.append((n, res))
            print(f"  {n:>9,} users  {res['rows']:>11,} rows ({out_mb:7.1f} MB out)  {res['seconds']:6.1f}s  "
                  f"{res['pairs_per_s'] / 1e6:5.1f} M pairs/s  peak RSS {res['hwm_mb']:7.1f} MB "
                  f"(after loading modules {res['hwm_before_mb']:.0f} MB)", flush=True)
            out.unlink()
        base = rows[0][1]["hwm_mb"]
        print("  peak RSS ratio vs N: " + ", ".join(f"{n // args.n}N {r['hwm_mb'] / base:.2f}x" for n, r in rows)
              + "   (flat = memory does not grow with the users file)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
