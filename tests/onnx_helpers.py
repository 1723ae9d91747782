"""Shared helpers for the export and score tests: small random-weight model directories
(written with the real save_model_dir) and their exports, cached for the whole session
because the torch exporter takes a couple of seconds per model."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ncf.checkpoint import save_model_dir
from ncf.models import ModelConfig, build_model

_ROOT = Path(tempfile.mkdtemp(prefix="ncf-onnx-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)

CONFIGS = {
    "gmf": {"factors": 8},
    "mlp": {"factors": 8, "layers": (32, 16, 8)},
    "neumf": {"factors": 8, "layers": (64, 32, 16, 8)},
    "fused": {"factors": 6, "activation": "tanh"},
    # the grid graph's tower without the ReLU max trick
    "neumf-sigmoid": {"kind": "neumf", "factors": 4, "layers": (16, 8, 4), "activation": "sigmoid"},
    # towers the fused kernel covers through its remainder paths: widths 7, 5, 3 (not multiples
    # of its 4-output blocks), and one layer after the split (no weights at all)
    "neumf-odd": {"kind": "neumf", "factors": 3, "layers": (22, 7, 5, 3)},
    "mlp-one": {"kind": "mlp", "factors": 4, "layers": (16, 8)},
}


@dataclass
class Case:
    model_dir: Path
    grid: Path
    pair: Path
    model: torch.nn.Module
    user_ids: list
    item_ids: list
    seen: dict  # user index -> set of item indices
    summary: dict


def random_model(kind: str, n_users: int, n_items: int, seed: int = 0, dup_items: bool = False, **cfg):
    torch.manual_seed(seed)
    cfg = {**CONFIGS[kind], **cfg}
    model = build_model(ModelConfig(cfg.pop("kind", kind), n_users, n_items, **cfg)).eval()
    with torch.no_grad():  # spread the logits like a trained model (the init gives ~0)
        for name, p in model.named_parameters():
            if "emb" in name or name.startswith(("user_", "item_")):
                p.normal_(0, 0.6)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        if dup_items:  # item j and item j + n/2 identical: every score appears twice
            half = n_items // 2
            tables = [p for name, p in model.named_parameters() if name.startswith("item_")]
            if hasattr(model, "mlp_embedding"):
                tables.append(model.mlp_embedding.items)
            for p in tables:
                p[half:2 * half] = p[:half]
    return model


@functools.cache
def case(kind: str = "neumf", ids: str = "int", n_users: int = 40, n_items: int = 60, seen_per_user: int = 9,
         seed: int = 0, dup_items: bool = False) -> Case:
    from export.onnx_export import export_model

    model = random_model(kind, n_users, n_items, seed, dup_items)
    rng = np.random.default_rng(seed)
    su = np.repeat(np.arange(n_users), seen_per_user)
    si = np.concatenate([rng.choice(n_items, seen_per_user, replace=False) for _ in range(n_users)])
    if ids == "int":
        user_ids = [int(x) for x in rng.choice(10**12, n_users, replace=False)]
        item_ids = [int(x) for x in rng.choice(10**12, n_items, replace=False) * -1]  # negative ids too
    else:
        user_ids = [f"u-{i:03d}-é" for i in range(n_users)]
        item_ids = [f"item/{i}" for i in range(n_items)]
    name = f"{kind}-{ids}-{n_users}x{n_items}-{seen_per_user}-{seed}-{int(dup_items)}"
    d = _ROOT / name
    save_model_dir(
        d / "ncf-model", model,
        user_ids=pl.Series("user_id", user_ids, dtype=pl.Int64 if ids == "int" else pl.String),
        item_ids=pl.Series("item_id", item_ids, dtype=pl.Int64 if ids == "int" else pl.String),
        seen_users=su.astype(np.int32), seen_items=si.astype(np.int32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = export_model(d / "ncf-model", d / "model.onnx")
    seen: dict[int, set] = {}
    for u, i in zip(su, si):
        seen.setdefault(int(u), set()).add(int(i))
    return Case(d / "ncf-model", d / "model.onnx", d / "model.pair.onnx", model, user_ids, item_ids, seen, summary)


def pair_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def brute_force_topk(c: Case, users: np.ndarray, k: int, *, exclude_seen: bool, candidates: np.ndarray | None = None):
    """Per-pair ONNX graph over every (user, candidate) pair, numpy top-k with ties by item
    index ascending: (items [n, <=k] as lists, probabilities, logits)."""
    sess = pair_session(c.pair)
    n_items = len(c.item_ids)
    cand = np.arange(n_items) if candidates is None else np.sort(np.asarray(candidates))
    out = []
    for u in users:
        items = cand
        if exclude_seen:
            items = np.array([i for i in cand if i not in c.seen.get(int(u), set())], dtype=np.int64)
        score, logit = sess.run(["score", "logit"], {"user": np.full(len(items), u, np.int64), "item": items.astype(np.int64)})
        order = np.lexsort((items, -logit))[:k]
        out.append((items[order], score[order], logit[order]))
    return out
