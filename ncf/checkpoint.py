"""The model directory written by `ncf fit` and read by `ncf export` / `ncf evaluate`.

Layout (every file plain data, nothing pickled):
  config.json          format version, the selected model's config, training settings
  weights.pt           {"format_version", "config", "state_dict"}: loads with weights_only=True
  users.parquet        column user_id: raw user ids in their original type; row = user index
  items.parquet        column item_id: raw item ids; row = item index
  interactions.parquet user_idx, item_idx (int32): every input interaction, for seen-item masking
  metrics.json         per-stage validation and test metrics

The directory is built under a temporary name beside the target and renamed into place,
so a crash leaves either the old complete directory or the new complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ncf.errors import NcfError
from ncf.models import ModelConfig, NCFModel, build_model
from ncf.paths import check_writable_location

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the MLP's user and item embeddings were two tables
REQUIRED_FILES = ("config.json", "weights.pt", "users.parquet", "items.parquet", "interactions.parquet")


@dataclass
class ModelDir:
    model: NCFModel
    config: dict
    user_ids: pl.Series
    item_ids: pl.Series
    seen_users: np.ndarray  # int32 user index of every known interaction
    seen_items: np.ndarray  # int32 item index, aligned with seen_users
    metrics: dict


def model_state(model: NCFModel) -> dict:
    """A plain self-describing dict: the config rebuilds the module, tensors fill it."""
    return {
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def model_from_state(state: dict) -> NCFModel:
    model = build_model(ModelConfig(**state["config"]))
    sd = state["state_dict"]
    model.load_state_dict(_upgrade_v1(sd) if state.get("format_version") == 1 else sd)
    return model.eval()


def _upgrade_v1(state_dict: dict) -> dict:
    """Format 1 kept the MLP embeddings as user_mlp and item_mlp; format 2 stacks them."""
    sd = dict(state_dict)
    if "user_mlp.weight" in sd or "item_mlp.weight" in sd:
        if "user_mlp.weight" not in sd or "item_mlp.weight" not in sd:
            raise NcfError("format-1 weights hold only one of the MLP embedding tables (user_mlp, item_mlp)")
        sd["mlp_embedding.weight"] = torch.cat([sd.pop("user_mlp.weight"), sd.pop("item_mlp.weight")])
    return sd


def save_model_dir(
    path: Path,
    model: NCFModel,
    *,
    user_ids: pl.Series,
    item_ids: pl.Series,
    seen_users: np.ndarray,
    seen_items: np.ndarray,
    config: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NcfError(f"{path} exists and is not a directory")
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as exc:
        raise NcfError(f"cannot write the model directory {path}: {exc.strerror or exc}") from exc
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is ordinary output
    try:
        torch.save(model_state(model), tmp / "weights.pt")
        full_config = {"format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), **(config or {})}
        (tmp / "config.json").write_text(json.dumps(full_config, indent=2) + "\n")
        pl.DataFrame({"user_id": user_ids}).write_parquet(tmp / "users.parquet")
        pl.DataFrame({"item_id": item_ids}).write_parquet(tmp / "items.parquet")
        pl.DataFrame(
            {"user_idx": np.asarray(seen_users, np.int32), "item_idx": np.asarray(seen_items, np.int32)}
        ).write_parquet(tmp / "interactions.parquet")
        (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise NcfError(f"cannot write the model directory {path}: {exc.strerror or exc}") from exc
        raise
    return path


def check_model_dir_writable(path: Path) -> None:
    """NcfError now, before a long training run, if `path` could not be written at the end:
    it is an existing file, an ancestor is a file, or the parent is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NcfError(f"{path} exists and is not a directory")
    check_writable_location(path, f"the model directory {path}")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`; the old directory is removed only after the swap."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_model_dir(path: Path) -> ModelDir:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NcfError(f"{path} is a file, not a model directory; give the directory written by `ncf fit`")
    if not path.is_dir():
        raise NcfError(f"model directory {path} not found; train one with `ncf fit DATA`")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise NcfError(f"{path} is not a complete ncf model directory (missing {', '.join(missing)})")
    try:
        config = json.loads((path / "config.json").read_text())
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files (or a pickled object weights_only refuses): one line
        raise NcfError(f"cannot read model in {path}: {_first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise NcfError(f"{path}/config.json is not an ncf model config; retrain the model")
    version = state.get("format_version") if isinstance(state, dict) else None
    if version not in READABLE_VERSIONS or config.get("format_version") != version:
        raise NcfError(
            f"{path} was written by another ncf version (format {version}, this ncf reads "
            f"{' or '.join(map(str, READABLE_VERSIONS))}); retrain it"
        )
    try:
        model = model_from_state(state)
        users = pl.read_parquet(path / "users.parquet")["user_id"]
        items = pl.read_parquet(path / "items.parquet")["item_id"]
        inter = pl.read_parquet(path / "interactions.parquet")
    except Exception as exc:
        raise NcfError(f"cannot read model in {path}: {_first_line(exc)}") from exc
    if (len(users), len(items)) != (model.cfg.n_users, model.cfg.n_items):
        raise NcfError(f"{path}: vocabulary sizes do not match the weights; the directory is inconsistent")
    if not {"user_idx", "item_idx"} <= set(inter.columns):
        raise NcfError(f"{path}/interactions.parquet lacks user_idx/item_idx; the directory is inconsistent")
    su, si = inter["user_idx"].to_numpy(), inter["item_idx"].to_numpy()
    if len(su) and (su.min() < 0 or su.max() >= len(users) or si.min() < 0 or si.max() >= len(items)):
        raise NcfError(f"{path}/interactions.parquet refers to users or items outside the vocabularies; "
                       "the directory is inconsistent")
    metrics_file = path / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise NcfError(f"cannot read {metrics_file}: {_first_line(exc)}") from exc
    return ModelDir(
        model=model,
        config=config,
        user_ids=users,
        item_ids=items,
        seen_users=su,
        seen_items=si,
        metrics=metrics,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
