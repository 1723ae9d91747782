"""Training throughput, side by side in one process, on the same data, split and model
configuration (paper defaults: NeuMF, 8 factors, MLP 64-32-16-8, 4 negatives, Adam 1e-3):

  reference  the common way: a torch Dataset of (user, item, label) triples whose negatives
             are drawn per sample in a Python loop each epoch, a DataLoader (batch 256,
             shuffle), one optimizer step per batch, and NeuMF written as public
             reimplementations write it (nn.Embedding, torch.cat, an nn.Sequential tower),
             starting from the same initial weights as ncf's model
  ncf        ncf.train's path: negatives drawn vectorised for the whole epoch, batches
             sliced from one shuffled tensor, with ncf fit's default batch size

Prints samples/s of each, the ratio, and test HR@10 / NDCG@10 (sampled and full ranking)
after the same number of epochs.
Usage: python tests/benchmarks/bench_train.py [--data PATH] [--epochs N] [--quick]"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ncf.data import (
    index_interactions,
    load_interactions,
)
from ncf.evaluation import evaluate, torch_scorer
from ncf.models import ModelConfig, NeuMF, _rows
from ncf.pipeline import FitConfig, build_eval_sets, scaled_lr, training_threads
from ncf.split import leave_one_out
from ncf.synthetic import synthetic_interactions
from ncf.threads import ThreadGovernor
from ncf.train import EpochData, StageConfig, make_optimizer, train_epoch

DEFAULT_DATA = Path(os.environ.get("NCF_DATA", REPO.parent / "shared" / "data")) / "ml-1m-partial" / "ratings_users_1-2999.dat"


class TripletDataset(torch.utils.data.Dataset):
    """The usual public NCF data path: per-sample negatives in Python, tuples per item."""

    def __init__(self, users, items, n_items, num_neg):
        self.pos = list(zip(users.tolist(), items.tolist()))
        self.train_set = set(self.pos)
        self.n_items, self.num_neg = n_items, num_neg
        self.triples: list[tuple[int, int, float]] = []

    def resample(self):
        triples = []
        for u, i in self.pos:
            triples.append((u, i, 1.0))
            for _ in range(self.num_neg):
                j = np.random.randint(self.n_items)
                while (u, j) in self.train_set:
                    j = np.random.randint(self.n_items)
                triples.append((u, j, 0.0))
        self.triples = triples

    def __len__(self):
        return len(self.triples)

    def __getitem__(self, idx):
        return self.triples[idx]


class ReferenceNeuMF(nn.Module):
    """NeuMF as public PyTorch reimplementations write it."""

    def __init__(self, n_users: int, n_items: int, factors: int = 8, layers=(64, 32, 16, 8)):
        super().__init__()
        self.user_gmf, self.item_gmf = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
        self.user_mlp, self.item_mlp = nn.Embedding(n_users, layers[0] // 2), nn.Embedding(n_items, layers[0] // 2)
        tower = []
        for a, b in itertools.pairwise(layers):
            tower += [nn.Linear(a, b), nn.ReLU()]
        self.tower = nn.Sequential(*tower)
        self.h = nn.Linear(factors + layers[-1], 1)

    def forward(self, u, i):
        gmf = self.user_gmf(u) * self.item_gmf(i)
        mlp = self.tower(torch.cat([self.user_mlp(u), self.item_mlp(i)], dim=-1))
        return self.h(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)

    @classmethod
    @torch.no_grad()
    def like(cls, model: NeuMF) -> ReferenceNeuMF:
        """Same configuration and the same initial weights as an ncf NeuMF."""
        cfg = model.cfg
        ref = cls(cfg.n_users, cfg.n_items, cfg.factors, cfg.layers)
        for name in ("user_gmf", "item_gmf", "h"):
            getattr(ref, name).load_state_dict(getattr(model, name).state_dict())
        ref.user_mlp.weight.copy_(model.mlp_embedding.users)
        ref.item_mlp.weight.copy_(model.mlp_embedding.items)
        for lin, ours in zip([m for m in ref.tower if isinstance(m, nn.Linear)], model.tower.linears):
            lin.load_state_dict(ours.state_dict())
        return ref


class TwoTableNeuMF(ReferenceNeuMF):
    """ncf's NeuMF before PairEmbedding: index_select lookups, but two MLP tables and cat."""

    def forward(self, u, i):
        gmf = _rows(self.user_gmf, u) * _rows(self.item_gmf, i)
        mlp = self.tower(torch.cat([_rows(self.user_mlp, u), _rows(self.item_mlp, i)], dim=-1))
        return self.h(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


def reference_epoch(model, opt, ds, batch_size=256):
    ds.resample()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    model.train()
    for u, i, y in loader:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(u, i), y.float())
        loss.backward()
        opt.step()
    return len(ds)


def step_ablation(n_users: int, n_items: int, steps: int = 150) -> None:
    """Where the speed comes from: samples/s of the bare training step (same NeuMF, random
    indices) for each setting ncf changed, one at a time. ncf runs the 2-thread or the 1-thread
    batch-2048 row, whichever its steps measure faster (ncf.threads)."""
    settings = [  # (label, batch, fused Adam, torch threads)
        ("batch 256, Adam (foreach), 2 threads, reference model", 256, False, 2),
        ("batch 256, Adam (foreach), 2 threads", 256, False, 2),
        ("batch 256, Adam (fused), 2 threads", 256, True, 2),
        ("batch 256, Adam (fused), 1 thread", 256, True, 1),
        ("batch 2048, Adam (fused), 2 threads  [ncf: 2nd core free]", 2048, True, 2),
        ("batch 2048, Adam (fused), 1 thread, MLP tables + cat", 2048, True, 1),
        ("batch 2048, Adam (fused), 1 thread   [ncf: 2nd core busy]", 2048, True, 1),
        ("batch 4096, Adam (fused), 1 thread", 4096, True, 1),
        ("batch 8192, Adam (fused), 1 thread", 8192, True, 1),
    ]
    threads_before = torch.get_num_threads()
    print("\nstep ablation (bare optimizer steps, random indices):")
    for label, bs, fused, threads in settings:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = NeuMF(ModelConfig("neumf", n_users, n_items))
        if "reference model" in label:
            model = ReferenceNeuMF.like(model)
        elif "tables + cat" in label:
            model = TwoTableNeuMF.like(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        u = torch.randint(0, n_users, (bs,))
        i = torch.randint(0, n_items, (bs,))
        y = torch.randint(0, 2, (bs,)).float()
        for k in range(steps + 10):
            if k == 10:
                t0 = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(model(u, i), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dt = (time.perf_counter() - t0) / steps
        print(f"  {label:<60}{bs / dt:>12,.0f} samples/s  ({dt * 1e3:.2f} ms/step)")
    torch.set_num_threads(threads_before)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=FitConfig().batch_size,
                    help="ncf's batch size (lr follows 1e-3 * batch / 256); default: ncf fit's")
    ap.add_argument("--quick", action="store_true", help="synthetic data, 1 epoch: a smoke run")
    args = ap.parse_args()

    if args.quick or not args.data.is_file():
        if not args.quick:
            print(f"{args.data} not found: using synthetic data (set NCF_DATA)")
        inter = index_interactions(synthetic_interactions(n_users=1500, n_items=2000, seed=0)
                                   .rename({"user_id": "user", "item_id": "item", "timestamp": "ts"}))
        args.epochs = 1 if args.quick else args.epochs
    else:
        inter = load_interactions(args.data)
    cfg = FitConfig()
    split = leave_one_out(inter, seed=0)
    _, test = build_eval_sets(inter, split, seed=0)
    mcfg = ModelConfig("neumf", inter.n_users, inter.n_items)
    print(f"data: {len(split.train_users):,} training positives, {inter.n_users:,} users, "
          f"{inter.n_items:,} items; NeuMF paper defaults; {cfg.num_neg} negatives; "
          f"{args.epochs} epochs; reference on 1 torch thread, ncf on 1 or 2 (its default)")

    # The reference gets one thread: measured with 2 it ran at the same speed on a quiet machine
    # (it is Python-bound) and can only lose on a busy one. ncf chooses 1 or 2 by timing its
    # steps, as `ncf fit` does (ncf.threads). Epochs alternate between the two paths so that both see the same machine conditions
    # (this shared VM drifts by +-30% within minutes).
    threads_default = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    model = NeuMF(mcfg)
    ref_model = ReferenceNeuMF.like(model)  # the same initial weights for both paths
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    ds = TripletDataset(split.train_users, split.train_items, inter.n_items, cfg.num_neg)

    sc = StageConfig("bench", batch_size=args.batch_size, lr=scaled_lr(args.batch_size), num_neg=cfg.num_neg)
    opt = make_optimizer(model, sc)
    data = EpochData(split.train_users, split.train_items, inter.n_items, torch.device("cpu"))
    rng = np.random.default_rng(0)

    seconds = {"ref": 0.0, "ncf": 0.0}
    samples = {"ref": 0, "ncf": 0}
    governor = ThreadGovernor(training_threads(cfg.threads, torch.device("cpu")))  # as ncf fit
    ncf_epochs = data.epochs(cfg.num_neg, rng, args.epochs)  # as train_stage: next draw in background
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        samples["ref"] += reference_epoch(ref_model, ref_opt, ds)
        seconds["ref"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        users, items, labels = next(ncf_epochs)  # epoch 1: drawn now; later: waits if unfinished
        train_epoch(model, opt, users, items, labels, sc.batch_size, warmup=cfg.warmup and epoch == 1,
                    governor=governor)
        samples["ncf"] += len(users)
        seconds["ncf"] += time.perf_counter() - t0
        print(f"  epoch {epoch}: reference {seconds['ref']:.1f} s, ncf {seconds['ncf']:.1f} s (cumulative)")
    torch.set_num_threads(threads_default)
    results = {
        "reference (Dataset+DataLoader, batch 256)": (samples["ref"] / seconds["ref"], ref_model),
        f"ncf (vectorised, batch {sc.batch_size})": (samples["ncf"] / seconds["ncf"], model),
    }

    print(f"{'path':<44}{'samples/s':>12}{'HR@10':>8}{'NDCG@10':>9}{'full HR':>9}{'full NDCG':>10}")
    for name, (rate, m) in results.items():
        q = evaluate(torch_scorer(m), test, 10)
        print(f"{name:<44}{rate:>12,.0f}{q['hr@10']:>8.4f}{q['ndcg@10']:>9.4f}"
              f"{q['full_hr@10']:>9.4f}{q['full_ndcg@10']:>10.4f}")
    (ref, _), (ours, _) = results.values()
    windows = [t for t, _ in governor.history]
    print("ncf's thread windows: " + ", ".join(f"{windows.count(t)} x {t}" for t in sorted(set(windows)))
          + " thread(s) (seconds/step last measured: "
          + ", ".join(f"{t}: {s * 1e3:.2f} ms" for t, s in sorted(governor.seconds_per_step.items())) + ")")
    print(f"training speed-up (ncf / reference): {ours / ref:.1f}x")
    step_ablation(inter.n_users, inter.n_items)


if __name__ == "__main__":
    main()
