"""The `ncf` command line. Each command is annotated options plus a docstring and hands off
to one library function; heavy imports happen inside the command so `ncf --help` is instant
and scoring never loads torch. Domain errors print one line and exit 1 (`--verbose` shows
the traceback)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ncf.errors import NcfError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Neural Collaborative Filtering: train (fit), export to ONNX (export), batch top-N (score).",
)

DEFAULT_MODEL_DIR = Path("ncf-model")
DEFAULT_ONNX = Path("model.onnx")
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]


def _run(fn, verbose: bool):
    try:
        return fn()
    except NcfError as exc:
        if verbose:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted (`ncf score` can continue with --resume)", err=True)
        raise typer.Exit(130)


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Interactions: CSV, TSV, Parquet, u.data or ratings.dat.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")] = DEFAULT_MODEL_DIR,
    model: Annotated[str, typer.Option(help="gmf, mlp, neumf or fused (shared-embedding fusion).")] = "neumf",
    pretrain: Annotated[bool, typer.Option(help="NeuMF: pre-train GMF and MLP first (paper 3.4.1).")] = True,
    factors: Annotated[int, typer.Option(help="Predictive factors (GMF size, last MLP layer).")] = 8,
    mlp_layers: Annotated[int, typer.Option(help="Hidden MLP layers; sizes halve down to --factors.")] = 3,
    activation: Annotated[str, typer.Option(help="MLP activation: relu, tanh or sigmoid.")] = "relu",
    epochs: Annotated[int, typer.Option(help="Max epochs per stage (early-stopped on validation).")] = 40,
    sgd_epochs: Annotated[int, typer.Option(help="Max epochs of NeuMF's SGD+momentum stage.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Training batch size (the paper: 256).")] = 2048,
    lr: Annotated[float | None, typer.Option(
        help="Adam learning rate of GMF, MLP, NeuMF from scratch (default: 1e-3 * batch-size / 256).")] = None,
    neumf_lr: Annotated[float | None, typer.Option(
        help="Adam learning rate of the pre-trained NeuMF (default: lr / 4).")] = None,
    sgd_lr: Annotated[float | None, typer.Option(
        help="SGD+momentum learning rate of the last stage (default: 1e-3 * batch-size / 256).")] = None,
    alpha: Annotated[float, typer.Option(help="Pre-training trade-off: h = (a h_GMF, (1-a) h_MLP).")] = 0.5,
    num_neg: Annotated[int, typer.Option(help="Sampled negatives per positive, redrawn each epoch.")] = 4,
    patience: Annotated[int, typer.Option(help="Stop a stage after this many epochs without gain.")] = 5,
    min_rating: Annotated[float | None, typer.Option(help="Keep only rows rated at least this.")] = None,
    user_col: Annotated[str | None, typer.Option(help="User id column (default: detected).")] = None,
    item_col: Annotated[str | None, typer.Option(help="Item id column (default: detected).")] = None,
    time_col: Annotated[str | None, typer.Option(help="Timestamp column (default: detected).")] = None,
    rating_col: Annotated[str | None, typer.Option(help="Rating column (default: detected).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, sampling and initialisation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for training steps (default: 1 or 2, chosen by timing the steps).")] = None,
    test_rating: Annotated[Path | None, typer.Option(
        help="Use these test rows (authors' *.test.rating) instead of each user's latest.")] = None,
    remap_from: Annotated[Path | None, typer.Option(
        help="With --test-rating: rebuild the authors' 0-based ids from this ratings file.")] = None,
    verbose: Verbose = False,
):
    """Train NCF on an interactions file; write the model directory (default ncf-model/)."""

    def run():
        from ncf.checkpoint import check_model_dir_writable
        from ncf.data import load_interactions
        from ncf.pipeline import FitConfig
        from ncf.pipeline import fit as fit_model
        from ncf.report import FitProgress, print_fit_report

        for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--factors", factors),
                            ("--num-neg", num_neg), ("--patience", patience), ("--threads", threads)):
            if value is not None and value < 1:
                raise NcfError(f"{name} must be at least 1 (got {value})")
        if not 0.0 <= alpha <= 1.0:
            raise NcfError(f"--alpha must be between 0 and 1 (got {alpha})")
        cfg = FitConfig(model=model, pretrain=pretrain, factors=factors, mlp_layers=mlp_layers,
                        activation=activation, epochs=epochs, sgd_epochs=sgd_epochs,
                        batch_size=batch_size, lr=lr, neumf_lr=neumf_lr, sgd_lr=sgd_lr, alpha=alpha,
                        num_neg=num_neg, patience=patience, seed=seed, device=device, threads=threads)
        if model not in ("gmf", "mlp", "neumf", "fused"):
            raise NcfError(f"--model must be gmf, mlp, neumf or fused (got {model!r})")
        if activation not in ("relu", "tanh", "sigmoid"):
            raise NcfError(f"--activation must be relu, tanh or sigmoid (got {activation!r})")
        check_model_dir_writable(out)  # fail now, not after training
        inter = load_interactions(data, user_col=user_col, item_col=item_col, rating_col=rating_col,
                                  time_col=time_col, min_rating=min_rating)
        typer.echo(f"{data}: {len(inter):,} interactions, {inter.n_users:,} users, {inter.n_items:,} items "
                   f"(ids: {inter.user_ids.dtype} / {inter.item_ids.dtype})")
        fixed_test = None
        if test_rating is not None:
            from ncf.official import official_test_pairs

            fixed_test = official_test_pairs(test_rating, inter.user_ids, inter.item_ids, remap_from)
            typer.echo(f"{test_rating}: {len(fixed_test[0]):,} test rows used as held-out items")
        with FitProgress() as progress:
            report = fit_model(inter, cfg, out, on_epoch=progress.epoch, on_batch=progress.batch,
                               fixed_test=fixed_test)
        print_fit_report(report)
        typer.echo(f"wrote {out}/ (selected stage: {report.selected}) in {report.seconds:.1f}s")

    _run(run, verbose)


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `ncf fit`.")] = DEFAULT_MODEL_DIR,
    test_rating: Annotated[Path | None, typer.Option(help="Authors' *.test.rating file.")] = None,
    test_negative: Annotated[Path | None, typer.Option(help="Authors' *.test.negative file.")] = None,
    remap_from: Annotated[Path | None, typer.Option(
        help="Original ratings file: rebuild the authors' 0-based id remapping from it.")] = None,
    k: Annotated[int, typer.Option(help="Cut-off for HR@K and NDCG@K.")] = 10,
    verbose: Verbose = False,
):
    """Show a model's test metrics, or evaluate it on the NCF authors' test files."""

    def run():
        from ncf.report import evaluate_official, print_stored_metrics

        if k < 1:
            raise NcfError(f"--k must be at least 1 (got {k})")
        if (test_rating is None) != (test_negative is None):
            raise NcfError("give both --test-rating and --test-negative, or neither")
        if test_rating is None:
            print_stored_metrics(model_dir)
        else:
            evaluate_official(model_dir, test_rating, test_negative, remap_from, k)

    _run(run, verbose)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="ONNX file to write (the grid graph `ncf score` runs).")] = DEFAULT_ONNX,
    model_dir: Annotated[Path, typer.Option("--model-dir", "-m", help="Model directory from `ncf fit`.")] = DEFAULT_MODEL_DIR,
    pair_out: Annotated[Path | None, typer.Option(
        help="Where the per-pair graph goes (default: OUT with suffix .pair.onnx).")] = None,
    verbose: Verbose = False,
):
    """Export the trained model to ONNX (grid graph + classic per-pair graph), verified against torch."""

    def run():
        from export.onnx_export import export_model

        s = export_model(model_dir, out, pair_out=pair_out)
        typer.echo(f"wrote {s['grid']} (grid graph for `ncf score`, {s['grid_bytes'] / 1e6:.1f} MB) and "
                   f"{s['pair']} (per-pair graph, {s['pair_bytes'] / 1e6:.1f} MB): {s['kind']}, "
                   f"{s['n_users']:,} users x {s['n_items']:,} items, opset {s['opset']}; "
                   f"ONNX Runtime vs torch max |diff| {s.get('max_abs_diff', float('nan')):.1e}")

    _run(run, verbose)


@app.command()
def score(
    users: Annotated[Path, typer.Option(help="Parquet file (or directory of parts) of user ids to score.")],
    k: Annotated[int, typer.Option(help="Items per user.")] = 50,
    model: Annotated[Path, typer.Option(help="ONNX model from `ncf export`.")] = DEFAULT_ONNX,
    out: Annotated[Path, typer.Option(help="Top-N Parquet to write (a directory of parts with --engine ray).")] = Path("topn.parquet"),
    items: Annotated[Path | None, typer.Option(help="Parquet of candidate item ids (default: all).")] = None,
    include_seen: Annotated[bool, typer.Option(help="Keep items the user has in the training input.")] = False,
    unknown: Annotated[str, typer.Option(help="Users the model never saw: popular or skip.")] = "popular",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    chunk_users: Annotated[int | None, typer.Option(help="Users per ONNX Runtime call.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same --out.")] = False,
    engine: Annotated[str, typer.Option(help="local, or ray (Ray Data, pip install 'ncf[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="--engine ray: cluster address (auto, ray://host:port); default: a local Ray instance.")] = None,
    actors: Annotated[int | None, typer.Option(help="--engine ray: scoring actors (default: from resources).")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="--engine ray: CPUs per actor.")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="--engine ray: GPUs per actor.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Verbose = False,
):
    """Score users against candidate items and write the top-k per user as Parquet."""

    def run():
        common = {"k": k, "items_path": items, "include_seen": include_seen, "unknown": unknown,
                  "device": device, "progress": progress and sys.stderr.isatty()}
        if engine == "local":
            from batch.score import score_users

            summary = score_users(model, users, out, chunk_users=chunk_users, resume=resume, **common)
        elif engine == "ray":
            if resume:
                raise NcfError("--resume is not supported with --engine ray; rerun the job")
            from batch.ray_engine import score_users_ray

            summary = score_users_ray(model, users, out, address=address, actors=actors,
                                      cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                                      chunk_users=chunk_users, **common)
        else:
            raise NcfError(f"--engine must be local or ray (got {engine!r})")
        typer.echo(summary["line"])

    _run(run, verbose)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="CSV file to write.")] = Path("demo.csv"),
    users: Annotated[int, typer.Option(help="Number of users.")] = 800,
    items: Annotated[int, typer.Option(help="Number of items.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    users_out: Annotated[Path | None, typer.Option(help="Also write the user ids as Parquet.")] = None,
    verbose: Verbose = False,
):
    """Write a SYNTHETIC implicit-feedback CSV (popularity skew + latent tastes) for trying ncf."""

    def run():
        import polars as pl

        from ncf.synthetic import write_demo_csv

        write_demo_csv(out, n_users=users, n_items=items, seed=seed)
        typer.echo(f"wrote {out} (synthetic data)")
        if users_out is not None:
            pl.read_csv(out).select(pl.col("user_id").unique().sort()).write_parquet(users_out)
            typer.echo(f"wrote {users_out}")

    _run(run, verbose)


if __name__ == "__main__":
    app()
