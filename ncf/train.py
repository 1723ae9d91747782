"""Training: one stage = one model and one optimizer, trained on pointwise log loss with
negatives resampled every epoch, early-stopped on the validation hold-out. The data path
has no per-sample Python: negatives are drawn for the whole epoch at once and batches are
slices of one shuffled tensor, on whatever device the model lives on."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ncf.evaluation import EvalSet, sampled_ranks, torch_scorer
from ncf.metrics import summarize
from ncf.models import NCFModel
from ncf.sampling import PositiveSet, sample_negative_items
from ncf.threads import ThreadGovernor


@dataclass
class StageConfig:
    name: str
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd" (with momentum)
    momentum: float = 0.9
    num_neg: int = 4
    patience: int = 3  # epochs without a better validation HR before stopping
    # A new best epoch must beat the current best's validation HR@10 by this many standard
    # errors of the paired per-user difference (0: any gain). On ~1,000 validation users
    # HR moves by +-0.01 between epochs from noise alone; from a pre-trained start, taking
    # the luckiest epoch traded a better test HR for a noise gain (README, quality).
    significance: float = 0.0
    warmup: bool = False  # the first epoch ramps the learning rate up (train_epoch)
    thread_choices: tuple[int, ...] = (1,)  # torch threads to choose from by timing (ncf.threads)
    seed: int = 0


@dataclass
class StageResult:
    name: str
    model: NCFModel  # weights of the best validation epoch
    best_epoch: int  # 0 = the initial weights were best
    val: dict[str, float]
    val_ranks: np.ndarray  # per validation user, of the best epoch
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_s: float = 0.0


WARMUP_DIVISOR = 8  # warmup starts at lr / 8: the paper's 1e-3 at ncf's default batch 2048
K = 10  # validation metric: HR@10 (NDCG@10 on ties)

EpochCallback = Callable[[dict], None]
BatchCallback = Callable[[str, int, int], None]  # (stage name, batches done, batches total)


def make_optimizer(model: NCFModel, cfg: StageConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        # fused: one kernel per step over all parameters; measured 2x faster per step on CPU
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class EpochData:
    """Training positives plus freshly drawn negatives, shuffled, as device tensors.

    Everything that does not change between epochs (the user column, the labels, the
    permutation array, the output buffers) is allocated once: on this VM first-touching a
    fresh 20 MB array costs more than the sampling itself (measured: 1.5 s -> 0.3 s/epoch
    on ML-1M-half). The output buffers are torch tensors written through numpy views: numpy
    asks the kernel for huge pages, whose first touch stalled for up to 0.8 s in memory
    compaction on a fragmented heap (measured), and they are the tensors we train from.
    There are two sets of them, so that `epochs` can draw the next epoch while the caller
    trains on this one."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int, device: torch.device):
        self.users, self.items = users, items
        self.positives = PositiveSet(users, items, n_items)
        self.device = device
        self._num_neg = -1

    def _allocate(self, num_neg: int) -> None:
        n_pos = len(self.users)
        neg_users = np.repeat(self.users, num_neg)
        # a user who has every item cannot get a negative: those draws are left out
        self.neg_users = neg_users[self.positives.count(neg_users) < self.positives.n_items]
        n = n_pos + len(self.neg_users)
        self.all_users = np.concatenate([self.users, self.neg_users]).astype(np.int64)
        self.all_items = np.empty(n, np.int64)
        self.all_items[:n_pos] = self.items
        self.labels = np.zeros(n, np.float32)
        self.labels[:n_pos] = 1.0
        self.perm = np.arange(n)
        self.out = [(torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64),
                     torch.empty(n, dtype=torch.float32)) for _ in range(2)]
        self._num_neg = num_neg

    def draw(self, num_neg: int, rng: np.random.Generator, slot: int = 0):
        """One epoch's (users, items, labels), written into buffer set `slot` (0 or 1)."""
        if num_neg != self._num_neg:
            self._allocate(num_neg)
        n_pos = len(self.users)
        self.all_items[n_pos:] = sample_negative_items(self.neg_users, self.positives, rng)
        rng.shuffle(self.perm)  # in place: a uniform permutation whatever the previous order
        for src, dst in zip((self.all_users, self.all_items, self.labels), self.out[slot], strict=True):
            np.take(src, self.perm, out=dst.numpy())
        return tuple(t.to(self.device) for t in self.out[slot])

    def epochs(self, num_neg: int, rng: np.random.Generator, n_epochs: int) -> Iterator[tuple]:
        """`draw` for epochs 1..n_epochs, each epoch's draw made by a background thread while
        the caller trains on the previous one: the sampling (numpy, which releases the GIL)
        then runs beside the training steps instead of between epochs. The draws happen in
        the same order from the same generator, so the data equal sequential draws'. An
        epoch's tensors are valid until the next one is requested (on CPU they are reused
        buffers). A draw's error is raised by the `next` that asks for it; closing the
        iterator early waits for a draw in progress."""
        if n_epochs < 1:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="ncf-negatives") as pool:
            if num_neg != self._num_neg:
                self._allocate(num_neg)  # here, not in two threads
            pending = pool.submit(self.draw, num_neg, rng, 0)
            for epoch in range(n_epochs):
                current = pending.result()
                if epoch + 1 < n_epochs:  # the other buffer set: the caller is done with it
                    pending = pool.submit(self.draw, num_neg, rng, (epoch + 1) % 2)
                yield current


def train_epoch(model: NCFModel, opt: torch.optim.Optimizer, users: torch.Tensor, items: torch.Tensor,
                labels: torch.Tensor, batch_size: int,
                on_batch: Callable[[int, int], None] | None = None, warmup: bool = False,
                governor: ThreadGovernor | None = None) -> float:
    """One pass over pre-shuffled tensors in slices; returns the mean log loss. With warmup,
    the learning rate rises linearly from 1/WARMUP_DIVISOR of its value to all of it over
    this epoch's batches (gradual warmup, Goyal et al. 2017, the companion of the linear
    scaling rule: at the full scaled rate from the first step, Adam's first updates killed
    every ReLU unit of the MLP's last layer in one of three ML-100K seeds; README). `governor`
    sets torch's thread count for the steps (ncf.threads)."""
    n = len(users)
    n_batches = math.ceil(n / batch_size)
    model.train()
    total = torch.zeros((), device=labels.device)
    target_lrs = [group["lr"] for group in opt.param_groups]
    try:
        with governor if governor is not None else contextlib.nullcontext():
            for b in range(n_batches):
                if warmup:
                    ramp = 1 / WARMUP_DIVISOR + (1 - 1 / WARMUP_DIVISOR) * b / max(1, n_batches - 1)
                    for group, lr in zip(opt.param_groups, target_lrs, strict=True):
                        group["lr"] = lr * ramp
                sl = slice(b * batch_size, (b + 1) * batch_size)
                loss = F.binary_cross_entropy_with_logits(model(users[sl], items[sl]), labels[sl], reduction="sum")
                opt.zero_grad(set_to_none=True)
                (loss / (min(n, (b + 1) * batch_size) - b * batch_size)).backward()
                opt.step()
                total += loss.detach()
                if governor is not None:
                    governor.step_done()
                if on_batch and (b % 64 == 0 or b == n_batches - 1):
                    on_batch(b + 1, n_batches)
    finally:
        for group, lr in zip(opt.param_groups, target_lrs, strict=True):
            group["lr"] = lr
    return float(total) / n


def validation_ranks(model: NCFModel, val: EvalSet) -> np.ndarray:
    return sampled_ranks(torch_scorer(model), val)


def significantly_better(new: np.ndarray, best: np.ndarray, k: int, z: float) -> bool:
    """Whether ranks `new` beat `best` (same validation users) on HR@k by more than z
    standard errors of the mean paired difference; on equal HR, the same test on NDCG@k."""
    for gain in (_hits(new, k) - _hits(best, k), _gains(new, k) - _gains(best, k)):
        mean = float(gain.mean())
        if mean != 0.0:
            se = float(gain.std(ddof=1)) / math.sqrt(len(gain)) if len(gain) > 1 else 0.0
            return mean > z * se
    return False


def _hits(ranks: np.ndarray, k: int) -> np.ndarray:
    return (ranks < k).astype(np.float64)


def _gains(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)


def train_stage(
    model: NCFModel,
    data: EpochData,
    val: EvalSet,
    cfg: StageConfig,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> StageResult:
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    governor = ThreadGovernor(cfg.thread_choices)
    best_ranks = validation_ranks(model, val)
    best = summarize(best_ranks, K)
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    history = [{"stage": cfg.name, "epoch": 0, "loss": None, **best}]
    if on_epoch:
        on_epoch(history[-1])
    started, samples, stale = time.perf_counter(), 0, 0
    t0 = time.perf_counter()  # an epoch's clock includes waiting for its draw
    with contextlib.closing(data.epochs(cfg.num_neg, rng, cfg.epochs)) as epochs:
        for epoch, (users, items, labels) in enumerate(epochs, start=1):
            n = len(users)
            loss = train_epoch(model, opt, users, items, labels, cfg.batch_size,
                               (lambda done, total: on_batch(cfg.name, done, total)) if on_batch else None,
                               warmup=cfg.warmup and epoch == 1, governor=governor)
            samples += n
            train_s = time.perf_counter() - t0
            ranks = validation_ranks(model, val)
            metrics = summarize(ranks, K)
            record = {"stage": cfg.name, "epoch": epoch, "loss": loss, **metrics,
                      "seconds": round(time.perf_counter() - t0, 3), "train_seconds": train_s,
                      "samples_per_s": n / train_s}
            history.append(record)
            if significantly_better(ranks, best_ranks, K, cfg.significance):
                best, best_ranks, best_epoch, stale = metrics, ranks, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            record["best"] = best_epoch == epoch
            if on_epoch:
                on_epoch(record)
            if stale >= cfg.patience:
                break
            t0 = time.perf_counter()
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - started
    train_seconds = sum(h.get("train_seconds", 0) for h in history)
    return StageResult(cfg.name, model, best_epoch, best, best_ranks, history, seconds,
                       samples / train_seconds if train_seconds else 0.0)
