"""What `ncf fit` and `ncf evaluate` show: a progress bar per epoch, one line per finished
epoch, and tables of metrics per stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ncf.errors import NcfError

console = Console(stderr=True)
out_console = Console()
if not out_console.is_terminal and out_console.width < 100:
    out_console = Console(width=100)  # logs and pipes: room for the metrics table's 8 columns


class FitProgress:
    """A bar over the batches of the current epoch; a printed line when the epoch ends."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=True, disable=not sys.stderr.isatty(),
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def batch(self, stage: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(stage, total=total)
        self.progress.update(self.task, description=f"{stage} epoch {self._epoch + 1}",
                             completed=done, total=total)

    _epoch = 0

    def epoch(self, record: dict) -> None:
        self._epoch = record["epoch"]
        loss = "   -   " if record["loss"] is None else f"{record['loss']:.4f}"
        mark = " *" if record.get("best") else ""
        speed = f"  {record['samples_per_s'] / 1e3:7.0f}k samples/s" if "samples_per_s" in record else ""
        console.print(f"{record['stage']:>10} epoch {record['epoch']:>3}  loss {loss}  "
                      f"val HR@10 {record['hr@10']:.4f}  NDCG@10 {record['ndcg@10']:.4f}{speed}{mark}",
                      highlight=False, soft_wrap=True)
        if self.task is not None:
            self.progress.reset(self.task)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def stage_table(stages: dict, k: int = 10, title: str = "test metrics (leave-one-out)") -> Table:
    table = Table(title=title)
    for col in ("stage", f"val HR@{k}", f"HR@{k}", f"NDCG@{k}", f"full HR@{k}", f"full NDCG@{k}",
                "best epoch", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col == "stage")
    for name, s in stages.items():
        t = s["test"]
        table.add_row(name, _fmt(s["val"].get(f"hr@{k}")), _fmt(t.get(f"hr@{k}")), _fmt(t.get(f"ndcg@{k}")),
                      _fmt(t.get(f"full_hr@{k}")), _fmt(t.get(f"full_ndcg@{k}")),
                      str(s.get("best_epoch", "-")), str(s.get("seconds", "-")))
    return table


def print_fit_report(report) -> None:
    out_console.print(stage_table(report.stages))
    out_console.print(
        f"{report.n_eval_users:,} users evaluated (held-out item ranked among 99 sampled "
        f"negatives, and among all {report.n_items:,} items minus the user's others); "
        f"{report.n_users_train_only:,} users with fewer than 3 interactions trained on but not "
        f"evaluated. Selected on validation: {report.selected}.", highlight=False)


def print_stored_metrics(model_dir: Path) -> None:
    if not Path(model_dir).is_dir():
        raise NcfError(f"model directory {model_dir} not found; train one with `ncf fit DATA`")
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise NcfError(f"no metrics in {model_dir}; train with `ncf fit DATA` first")
    try:
        metrics = json.loads(path.read_text())
    except ValueError as exc:
        raise NcfError(f"cannot read {path}: {exc}") from exc
    stages = metrics.get("stages") if isinstance(metrics, dict) else None
    if not stages:
        raise NcfError(f"no metrics in {model_dir} (its metrics.json has no stages); retrain with `ncf fit`")
    out_console.print(stage_table(stages))
    out_console.print(f"selected stage: {metrics['selected']}", highlight=False)


def evaluate_official(model_dir: Path, rating: Path, negative: Path, remap_from: Path | None, k: int) -> dict:
    """HR/NDCG@k on the authors' test rows and negatives, sampled and full ranking."""
    from ncf.checkpoint import load_model_dir
    from ncf.evaluation import torch_scorer
    from ncf.official import load_official_test, official_metrics

    md = load_model_dir(model_dir)
    test = load_official_test(rating, negative, md.user_ids, md.item_ids, remap_from)
    if len(test.users) == 0:
        raise NcfError("no test row refers to a user and item this model knows; check --remap-from")
    result = official_metrics(torch_scorer(md.model), test, md.seen_users, md.seen_items, len(md.item_ids), k)
    table = Table(title=f"{md.config.get('selected_stage', md.model.cfg.kind)} on {Path(negative).name}")
    for col in (f"HR@{k}", f"NDCG@{k}", f"full HR@{k}", f"full NDCG@{k}", "users"):
        table.add_column(col, justify="right")
    table.add_row(_fmt(result[f"hr@{k}"]), _fmt(result[f"ndcg@{k}"]), _fmt(result[f"full_hr@{k}"]),
                  _fmt(result[f"full_ndcg@{k}"]), f"{len(test.users):,}")
    out_console.print(table)
    n_unknown = int(test.unknown_negatives.sum())
    out_console.print(
        f"{test.n_rows:,} test rows: {test.n_unknown_users:,} users unknown to the model (skipped), "
        f"{test.n_unknown_test_items:,} test items unknown (skipped); test item listed among its own "
        f"negatives for {test.n_positive_in_negatives:,} users (counted once); {n_unknown:,} negatives "
        f"are items the model never saw (left out; if each outranked the test item: "
        f"HR@{k} {result[f'pessimistic_hr@{k}']:.4f}, NDCG@{k} {result[f'pessimistic_ndcg@{k}']:.4f}).",
        highlight=False)
    return result
