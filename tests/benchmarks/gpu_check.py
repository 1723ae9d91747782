"""One short scripted CUDA check, for a machine with an NVIDIA GPU (not run by the test suite):

  1. the CUDA provider really attaches (GridScorer(device="cuda") raises otherwise);
  2. top-k scores on CUDA match the CPU within 1e-4 (same items where scores are not tied);
  3. pairs/s on the larger synthetic grid (100,000 users x 20,000 items), CUDA vs CPU sample;
  4. training samples/s on the GPU for the training benchmark's configuration.

Usage: python tests/benchmarks/gpu_check.py   (exit 1 when CUDA is missing or a check fails)"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_score import K, make_model

from batch.scorer import GridScorer
from ncf.errors import NcfError


def main() -> int:
    ok = True
    with tempfile.TemporaryDirectory(prefix="ncf-gpu-") as d:
        grid_path, _ = make_model(Path(d), "large", 100_000, 20_000, 50)
        try:
            gpu = GridScorer(grid_path, device="cuda")
        except NcfError as exc:
            print(f"FAIL CUDA provider did not attach: {exc}")
            return 1
        print(f"ok   CUDA provider attached: {gpu.provider} ({gpu.device_note})")
        cpu = GridScorer(grid_path, device="cpu")
        sample = np.arange(0, 100_000, 50, dtype=np.int64)  # 2,000 users
        a, b = gpu.topk(sample, K), cpu.topk(sample, K)
        diff = float(np.nanmax(np.abs(a.scores - b.scores)))
        same_items = float((a.items == b.items).mean())
        ok &= diff <= 1e-4
        print(f"{'ok  ' if diff <= 1e-4 else 'FAIL'} CUDA vs CPU top-{K} scores: max |diff| {diff:.2e}; "
              f"same items at {same_items:.4%} of positions (differences only at near-ties)")
        rates = {}
        for name, sc, users in (("cuda", gpu, np.arange(100_000, dtype=np.int64)), ("cpu", cpu, sample)):
            sc.topk(users[: 4 * sc.chunk_users], K)  # warm-up
            t = time.perf_counter()
            sc.topk(users, K)
            rates[name] = len(users) * sc.n_candidates / (time.perf_counter() - t)
            print(f"     {name}: {len(users):,} users x {sc.n_candidates:,} items: {rates[name] / 1e6:,.1f} M pairs/s")
        print(f"     CUDA / CPU: {rates['cuda'] / rates['cpu']:.1f}x")
    try:
        import torch

        if torch.cuda.is_available():
            from ncf.models import ModelConfig, NeuMF
            from ncf.pipeline import scaled_lr
            from ncf.train import StageConfig, make_optimizer, train_epoch

            dev = torch.device("cuda")
            model = NeuMF(ModelConfig("neumf", 6040, 3706)).to(dev)
            opt = make_optimizer(model, StageConfig("gpu", lr=scaled_lr(2048)))
            n = 2_500_000
            u = torch.randint(0, 6040, (n,), device=dev)
            i = torch.randint(0, 3706, (n,), device=dev)
            y = torch.randint(0, 2, (n,), device=dev).float()
            for bs in (2048, 16384):
                train_epoch(model, opt, u[:100_000], i[:100_000], y[:100_000], bs)  # warm-up
                torch.cuda.synchronize()
                t = time.perf_counter()
                train_epoch(model, opt, u, i, y, bs)
                torch.cuda.synchronize()
                print(f"     training on {torch.cuda.get_device_name()}: batch {bs}: "
                      f"{n / (time.perf_counter() - t):,.0f} samples/s")
        else:
            print("     torch sees no CUDA device: training rate not measured")
    except ImportError:
        print("     torch not installed: training rate not measured")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
