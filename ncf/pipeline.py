"""`ncf fit`: split, evaluation sets, the stages of the chosen path, test metrics once per
stage, and the model directory. With pre-training (the default): GMF, then MLP, then
NeuMF initialised from both, trained with Adam, then with SGD + momentum. The model
written out is the stage with the best validation HR@10; the test set is only reported."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ncf.checkpoint import save_model_dir
from ncf.cpus import cpu_count
from ncf.data import Interactions
from ncf.errors import NcfError
from ncf.evaluation import EvalSet, evaluate, popularity_scorer, torch_scorer
from ncf.models import GMF, MLP, ModelConfig, NCFModel, NeuMF, build_model, tower_layers
from ncf.sampling import PositiveSet
from ncf.split import Split, leave_one_out
from ncf.train import (
    BatchCallback,
    EpochCallback,
    EpochData,
    StageConfig,
    StageResult,
    significantly_better,
    train_stage,
)

MIN_TRAIN_INTERACTIONS = 10


@dataclass
class FitConfig:
    model: str = "neumf"  # gmf | mlp | neumf | fused
    pretrain: bool = True  # only for neumf
    factors: int = 8
    mlp_layers: int = 3  # hidden layers after the concatenated embeddings: 64-32-16-8
    activation: str = "relu"
    epochs: int = 40  # at most, per stage (GMF, MLP, NeuMF-Adam); early stopping ends it
    sgd_epochs: int = 10  # NeuMF continued with SGD + momentum
    # Paper: batch 256, Adam 1e-3. Measured (README): batch 2048 with the learning rate
    # scaled linearly (1e-3 * batch / 256) trains about 10x faster at equal quality.
    batch_size: int = 2048
    lr: float | None = None  # Adam, GMF / MLP / NeuMF from scratch; None = the scaling rule
    neumf_lr: float | None = None  # Adam on the pre-trained NeuMF; None = a quarter of lr
    sgd_lr: float | None = None  # SGD + momentum, the last stage; None = the scaling rule
    momentum: float = 0.9
    alpha: float = 0.5
    num_neg: int = 4
    patience: int = 5  # 3 stopped GMF and MLP on a validation plateau (README, quality)
    # From pre-trained weights (the NeuMF stages) a new best epoch must gain this many
    # standard errors on validation, and an earlier stage is chosen over a later one only
    # when it is that much better (train.StageConfig; README, quality).
    significance: float = 1.0
    k: int = 10
    seed: int = 0
    device: str = "auto"
    # CPU threads for torch's training steps. None: 1 or 2, chosen and re-checked by timing the
    # steps (ncf.threads: 2 threads gained ~20% with the other core idle, lost 3.7x with it
    # busy). A number: exactly that many.
    threads: int | None = None
    warmup: bool = True  # first epoch of each stage: lr from lr / 8 up to lr (ncf.train.train_epoch)


def scaled_lr(batch_size: int, base: float = 1e-3, base_batch: int = 256) -> float:
    """The linear scaling rule: the paper's Adam 1e-3 at batch 256, proportionally above."""
    return base * batch_size / base_batch


@dataclass
class FitReport:
    stages: dict[str, dict] = field(default_factory=dict)  # name -> val/test metrics
    selected: str = ""
    n_users: int = 0
    n_items: int = 0
    n_interactions: int = 0
    n_train: int = 0
    n_eval_users: int = 0
    n_users_train_only: int = 0
    seconds: float = 0.0


def select_stage(results: dict[str, StageResult], k: int, significance: float) -> str:
    """On validation only, preferring later stages: NeuMF starts from GMF and MLP and its
    SGD stage from its Adam stage, so a later stage is kept unless the stage chosen so far
    is significantly better on the same validation users."""
    chosen = None
    for name, result in results.items():
        if chosen is None or not significantly_better(results[chosen].val_ranks, result.val_ranks, k, significance):
            chosen = name
    return chosen


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NcfError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise NcfError(f"--device must be auto, cpu or cuda (got {name!r})")
    return torch.device(name)


def training_threads(threads: int | None, device: torch.device) -> tuple[int, ...]:
    """The thread counts a training stage may choose from (ncf.threads.ThreadGovernor)."""
    if threads is not None:
        return (max(1, threads),)
    return (1, 2) if device.type == "cpu" and cpu_count() >= 2 else (1,)


def build_eval_sets(inter: Interactions, split: Split, seed: int) -> tuple[EvalSet, EvalSet]:
    """Validation: ranks the validation item, never against the test item. Test: ranks
    the test item, never against training or validation items. Sampled negatives come
    from items the user never interacted with at all."""
    everything = PositiveSet(inter.users, inter.items, inter.n_items)
    val = EvalSet.build(
        split.val_users, split.val_items, everything,
        np.concatenate([split.train_users, split.test_users]),
        np.concatenate([split.train_items, split.test_items]),
        inter.n_items, seed=seed + 1,
    )
    test = EvalSet.build(
        split.test_users, split.test_items, everything,
        np.concatenate([split.train_users, split.val_users]),
        np.concatenate([split.train_items, split.val_items]),
        inter.n_items, seed=seed + 2,
    )
    return val, test


def fit(
    inter: Interactions,
    cfg: FitConfig,
    out_dir: Path | None,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
    on_stage: Callable[[str, NCFModel], None] | None = None,
    fixed_test: tuple[np.ndarray, np.ndarray] | None = None,
) -> FitReport:
    started = time.perf_counter()
    split = leave_one_out(inter, seed=cfg.seed, fixed_test=fixed_test)
    if len(split.train_users) < MIN_TRAIN_INTERACTIONS or len(split.test_users) == 0:
        raise NcfError(
            f"too few interactions to train: {len(inter)} unique pairs from {inter.n_users} users; "
            f"need at least {MIN_TRAIN_INTERACTIONS} training pairs and one user with "
            "3 or more interactions"
        )
    device = resolve_device(cfg.device)
    thread_choices = training_threads(cfg.threads, device)
    torch.set_num_threads(thread_choices[0])  # evaluation and the rest: the safe setting
    torch.manual_seed(cfg.seed)
    val, test = build_eval_sets(inter, split, cfg.seed)
    data = EpochData(split.train_users, split.train_items, inter.n_items, device)
    report = FitReport(n_users=inter.n_users, n_items=inter.n_items, n_interactions=len(inter),
                       n_train=len(split.train_users), n_eval_users=len(test),
                       n_users_train_only=split.n_users_train_only)

    pop = popularity_scorer(split.train_items, inter.n_items)
    report.stages["itempop"] = {"val": evaluate(pop, val, cfg.k, full=False),
                                "test": evaluate(pop, test, cfg.k)}

    def stage(name: str, model, epochs: int, lr: float, optimizer: str = "adam",
              pretrained: bool = False) -> StageResult:
        sc = StageConfig(name=name, epochs=epochs, batch_size=cfg.batch_size, lr=lr,
                         optimizer=optimizer, momentum=cfg.momentum, num_neg=cfg.num_neg,
                         patience=cfg.patience, significance=cfg.significance if pretrained else 0.0,
                         warmup=cfg.warmup, thread_choices=thread_choices, seed=cfg.seed + len(report.stages))
        result = train_stage(model.to(device), data, val, sc, on_epoch, on_batch)
        report.stages[name] = {
            "val": result.val,
            "test": evaluate(torch_scorer(result.model), test, cfg.k),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history) - 1,
            "seconds": round(result.seconds, 2),
            "samples_per_s": round(result.samples_per_s),
            "history": result.history,
        }
        results[name] = result
        if on_stage:
            on_stage(name, result.model)
        return result

    def config(kind: str) -> ModelConfig:
        return ModelConfig(kind, inter.n_users, inter.n_items, cfg.factors,
                           tower_layers(cfg.factors, cfg.mlp_layers), cfg.activation)

    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.batch_size)
    neumf_lr = cfg.neumf_lr if cfg.neumf_lr is not None else lr / 4
    sgd_lr = cfg.sgd_lr if cfg.sgd_lr is not None else scaled_lr(cfg.batch_size)
    results: dict[str, StageResult] = {}
    if cfg.model == "neumf" and cfg.pretrain:
        gmf = stage("gmf", GMF(config("gmf")), cfg.epochs, lr).model
        mlp = stage("mlp", MLP(config("mlp")), cfg.epochs, lr).model
        neumf = NeuMF.from_pretrained(gmf.cpu(), mlp.cpu(), cfg.alpha)
        neumf = stage("neumf", neumf, cfg.epochs, neumf_lr, pretrained=True).model
        if cfg.sgd_epochs > 0:
            stage("neumf-sgd", copy.deepcopy(neumf), cfg.sgd_epochs, sgd_lr, optimizer="sgd", pretrained=True)
    else:
        name = cfg.model if cfg.model != "neumf" else "neumf-scratch"
        stage(name, build_model(config(cfg.model)), cfg.epochs, lr)

    report.selected = select_stage(results, cfg.k, cfg.significance)
    report.seconds = time.perf_counter() - started
    if out_dir is not None:
        save_model_dir(
            out_dir, results[report.selected].model.cpu(),
            user_ids=inter.user_ids, item_ids=inter.item_ids,
            seen_users=inter.users, seen_items=inter.items,
            config={"selected_stage": report.selected, "fit": asdict(cfg), "source": inter.source,
                    "n_interactions": len(inter)},
            metrics=asdict(report),
        )
    return report
