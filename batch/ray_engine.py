"""`ncf score --engine ray`: the same top-N scoring on Ray Data, for users files that no longer
fit one machine's time budget. Torch-free; Ray is imported lazily (`pip install 'ncf[ray]'`).

Pipeline (one Ray Data job, scheduled by Ray, not by us):

    read_parquet(users) -> driver: cast ids, map to user indices, drop duplicates
      -> from_arrow(blocks of users) -> map_batches(TopNActor, actor pool) -> write_parquet(out/)

* One `TopNActor` holds one `GridScorer` (one ONNX Runtime session: the class of the local
  path) built from the model *bytes*, which reach every actor through the object store
  (`ray.put` once in the driver); no actor reads the driver's model path, which need not exist
  on other nodes. CPU actors run `ceil(cpus_per_actor)` scoring threads; a GPU actor runs its
  session on the CUDA provider (strict: an actor holding a GPU never falls back to the CPU).
* Policies are those of the local engine (see batch.score): seen items excluded unless
  include_seen, unknown users get the popular items with score null (or are skipped),
  candidates from --items. Duplicate users are removed *in the driver*, globally and before
  scoring, with the local engine's code path (first occurrence kept, one byte per model user
  plus the distinct unknown ids), so (user_id, rank) is a key of the output no matter how the
  users are split into blocks. The ids stream through the driver for that (8 bytes per
  integer user, negligible against the scoring: one user is n_items pairs of the model).
* Output: a directory of Parquet parts with the local engine's explicit schema (every block is
  built against `topn_schema`), written by Ray Data into `.<name>.tmp-<pid>/` beside `out` and
  renamed into place only after the row count in the part footers matched the count the
  driver expects (which also catches an `--out` that is not on storage shared by all nodes).
  A run whose users are all skipped still leaves one empty part, so the schema is readable.
* Resources: actors and CPUs per actor default from the cluster's resources; a configuration
  that cannot make progress (actors that take every CPU, so Ray Data's write tasks never run;
  an actor larger than any node; GPUs asked of a cluster without any) is refused with an
  NcfError before anything runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch import io as bio
from batch.score import FirstOccurrence, check_options, restrict_to_items
from batch.scorer import CPU_EP, CUDA_EP, DEVICES, GridScorer, cpu_count, read_model_bytes
from ncf.errors import NcfError

INSTALL_HINT = "pip install 'ncf[ray]' (in this repo: .venv/bin/pip install -e '.[ray]')"
WRITE_CPUS = 0.5  # logical CPUs each Ray Data write task asks for; kept free next to the actors
BLOCK_PAIRS = 1 << 26  # users per actor call: about this many (user, candidate) pairs...
MAX_BLOCK_USERS = 1 << 16  # ... and never more users than this
MIN_BLOCK_USERS = 1024  # below this, per-call overhead shows
BLOCKS_PER_ACTOR = 4  # enough blocks to balance the actors
TOPN_COLUMNS = ["user_id", "rank", "item_id", "score"]
ACTOR_START_TIMEOUT_S = int(os.environ.get("NCF_RAY_ACTOR_START_TIMEOUT_S", "600"))


# --------------------------------------------------------------------------- the actor
class TopNActor:
    """A callable class for `Dataset.map_batches`: one GridScorer per actor, built once from
    the model bytes in the object store. Input batch: user_id (the vocabulary's raw type)
    and uidx (user index, -1 for an unknown user). Output: rows of `topn_schema`."""

    def __init__(self, model_ref, *, device: str, threads: int, chunk_users: int | None, candidates_ref,
                 k: int, include_seen: bool, unknown: str):
        data = _get(model_ref)
        candidates = _get(candidates_ref)
        self.scorer = GridScorer.from_bytes(data, device=device, threads=threads, chunk_users=chunk_users,
                                            source="model.onnx (from the object store)")
        if candidates is not None:
            self.scorer.set_candidates(candidates)
        self.k, self.include_seen, self.unknown = k, include_seen, unknown
        pop_items, _ = self.scorer.popular(k)
        self.pop_ids = self.scorer.item_ids.take(pa.array(pop_items))
        self.schema = bio.topn_schema(self.scorer.user_ids.type, self.scorer.item_ids.type)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("user_id").combine_chunks()
        idx = batch.column("uidx").to_numpy(zero_copy_only=False).astype(np.int64)
        known = idx >= 0
        parts = []
        if known.any():
            res = self.scorer.topk(idx[known], self.k, exclude_seen=not self.include_seen)
            parts.append(topk_table(ids.filter(pa.array(known)), res, self.scorer.item_ids, self.schema))
        if self.unknown == "popular" and not known.all():
            parts.append(popular_table(ids.filter(pa.array(~known)), self.pop_ids, self.schema))
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def __del__(self):
        with contextlib.suppress(Exception):
            self.scorer.close()


def _get(ref):
    if ref is None or isinstance(ref, (bytes, bytearray, memoryview, np.ndarray)):
        return ref
    import ray

    return ray.get(ref)


def topk_table(user_ids: pa.Array, res, item_vocab: pa.Array, schema: pa.Schema) -> pa.Table:
    """The rows the local engine writes for a scored batch (batch.score._write_topk)."""
    n, k = res.items.shape
    valid = res.items >= 0
    if valid.all():
        rows_u = np.repeat(np.arange(n), k)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), n)
        items = res.items.reshape(-1)
        score = res.scores.reshape(-1)
    else:  # users with fewer than k unexcluded candidates: drop the empty slots
        rows_u = np.repeat(np.arange(n), res.counts)
        rank = (np.arange(len(rows_u)) - np.repeat(np.cumsum(res.counts) - res.counts, res.counts) + 1).astype(np.int32)
        items = res.items[valid]
        score = res.scores[valid]
    return pa.Table.from_arrays(
        [user_ids.take(pa.array(rows_u)), pa.array(rank, pa.int32()), item_vocab.take(pa.array(items)),
         pa.array(score, pa.float32())],
        schema=schema,
    )


def popular_table(user_ids: pa.Array, pop_ids: pa.Array, schema: pa.Schema) -> pa.Table:
    """Fallback rows of unknown users: the popular items, ranks 1..k, score null."""
    n, m = len(user_ids), len(pop_ids)
    return pa.Table.from_arrays(
        [user_ids.take(pa.array(np.repeat(np.arange(n), m))), pa.array(np.tile(np.arange(1, m + 1, dtype=np.int32), n)),
         pop_ids.take(pa.array(np.tile(np.arange(m), n))), pa.nulls(n * m, pa.float32())],
        schema=schema,
    )


# --------------------------------------------------------------------------- resources
@dataclass
class Plan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # scoring threads per actor
    device: str  # what each actor's GridScorer is asked for: cpu or cuda
    write_cpus: float = WRITE_CPUS

    def describe(self) -> str:
        gpu = f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return f"{self.actors} actor{'s' * (self.actors != 1)} x ({self.cpus_per_actor:g} CPU{gpu}, {self.threads} thread{'s' * (self.threads != 1)})"


def _cluster_text(node_cpus: list[float], node_gpus: list[float]) -> str:
    nodes = f"{len(node_cpus)} node{'s' * (len(node_cpus) != 1)}"
    per = ", ".join(f"{c:g}" for c in node_cpus[:8]) + (" ..." if len(node_cpus) > 8 else "")
    gpus = f", {sum(node_gpus):g} GPUs" if sum(node_gpus) else ", no GPUs"
    return f"the Ray cluster has {sum(node_cpus):g} CPUs on {nodes} ({per}){gpus}"


def max_actors(node_cpus: list[float], node_gpus: list[float], cpa: float, gpa: float, write_cpus: float = WRITE_CPUS) -> int:
    """The most actors of (cpa CPUs, gpa GPUs) that fit the nodes while one node keeps
    `write_cpus` CPUs free for Ray Data's write tasks (without them the pipeline stalls once
    the actors' outputs fill the object store)."""
    eps = 1e-9

    def cap(c: float, g: float) -> int:
        n = math.floor((c + eps) / cpa) if cpa > 0 else 1 << 30
        if gpa > 0:
            n = min(n, math.floor((g + eps) / gpa))
        return max(0, n)

    full = [cap(c, g) for c, g in zip(node_cpus, node_gpus)]
    best = 0
    for m, (c, g) in enumerate(zip(node_cpus, node_gpus)):
        if c + eps < write_cpus:
            continue
        best = max(best, sum(full) - full[m] + cap(c - write_cpus, g))
    return best


def plan_resources(node_cpus: list[float], node_gpus: list[float], *, device: str = "auto", actors: int | None = None,
                   cpus_per_actor: float | None = None, gpus_per_actor: float | None = None) -> Plan:
    """Actors and their resources from what the user asked and what the cluster has; NcfError
    for a configuration that cannot make progress."""
    if device not in DEVICES:
        raise NcfError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if actors is not None and (isinstance(actors, bool) or int(actors) != actors or actors < 1):
        raise NcfError(f"--actors must be a whole number of at least 1, got {actors}")
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise NcfError(f"--cpus-per-actor must be more than 0, got {cpus_per_actor}")
    if gpus_per_actor is not None and not gpus_per_actor >= 0:
        raise NcfError(f"--gpus-per-actor must be 0 or more, got {gpus_per_actor}")
    total_c, total_g = sum(node_cpus), sum(node_gpus)
    where = _cluster_text(node_cpus, node_gpus)
    if gpus_per_actor is not None:
        use_gpu = gpus_per_actor > 0
        if use_gpu and device == "cpu":
            raise NcfError(f"--device cpu contradicts --gpus-per-actor {gpus_per_actor:g}; drop one of them")
    else:
        use_gpu = total_g > 0 and device != "cpu"
    if device == "cuda" and not use_gpu:
        why = "--gpus-per-actor 0" if gpus_per_actor == 0 else "the Ray cluster has no GPUs"
        raise NcfError(f"--device cuda needs GPU actors, but {why}; use --device cpu (or auto) to score on CPUs")
    if use_gpu and total_g == 0:
        raise NcfError(f"--gpus-per-actor {gpus_per_actor:g}, but {where}; drop --gpus-per-actor or use a cluster with GPUs")
    if total_c < WRITE_CPUS:
        raise NcfError(f"{where}: Ray Data needs at least {WRITE_CPUS:g} CPU for its write tasks")

    if use_gpu:
        gpa = float(gpus_per_actor or 1.0)
        cpa = float(cpus_per_actor or 1.0)
    else:
        gpa = 0.0
        cpa = float(cpus_per_actor) if cpus_per_actor is not None else min(1.0, max(node_cpus) - WRITE_CPUS)
        if cpa <= 0:
            raise NcfError(f"{where}: no CPU left for an actor next to Ray Data's write tasks")

    fit = max_actors(node_cpus, node_gpus, cpa, gpa)
    if actors is None:
        if fit < 1:
            raise NcfError(
                f"one actor of {cpa:g} CPU{f' + {gpa:g} GPU' if gpa else ''} does not fit any node while leaving "
                f"{WRITE_CPUS:g} CPU for Ray Data's write tasks ({where}); lower --cpus-per-actor"
                + (" or --gpus-per-actor" if gpa else "")
            )
        actors = fit
    actors = int(actors)
    if not use_gpu and cpus_per_actor is None:
        # spread what the actors leave over them (one machine: 1 actor x 1.5 CPU on 2 CPUs), or
        # share the CPUs when more actors were asked than whole CPUs allow, if that still fits
        wide = math.floor((total_c - WRITE_CPUS) / actors * 100) / 100
        if wide > 0 and max_actors(node_cpus, node_gpus, wide, 0.0) >= actors and (wide > cpa or fit < actors):
            cpa = wide
        fit = max_actors(node_cpus, node_gpus, cpa, gpa)
    if actors > fit:
        asked = f"{actors} actors x {cpa:g} CPU{f' + {gpa:g} GPU' if gpa else ''}"
        lower = "--cpus-per-actor" + (" or --gpus-per-actor" if gpa else "")
        hint = f"Use --actors {fit} or fewer, or lower {lower}" if fit >= 1 else f"Lower {lower}"
        raise NcfError(
            f"{asked} cannot all run while {WRITE_CPUS:g} CPU stays free for Ray Data's write tasks ({where}); "
            f"the job would hang. {hint}"
        )
    threads = 1 if use_gpu else max(1, math.ceil(cpa - 1e-9))
    return Plan(actors, cpa, gpa, threads, "cuda" if use_gpu else "cpu")


def _node_resources(ray) -> tuple[list[float], list[float]]:
    cpus, gpus = [], []
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", True)):
            res = node.get("Resources", {}) or {}
            cpus.append(float(res.get("CPU", 0.0)))
            gpus.append(float(res.get("GPU", 0.0)))
    if not cpus:  # pragma: no cover - a connected cluster always lists its nodes
        res = ray.cluster_resources()
        cpus, gpus = [float(res.get("CPU", 0.0))], [float(res.get("GPU", 0.0))]
    return cpus, gpus


# --------------------------------------------------------------------------- Ray session
def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise NcfError(f"--engine ray needs Ray (Ray Data), which is not installed: {INSTALL_HINT}") from exc
    return ray


@contextlib.contextmanager
def _ray_session(address: str | None, progress: bool):
    """Connect to `address`, or start a local instance sized to this machine; reuse a session
    this process already has. Yields (ray, started: bool); shuts down what it started."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": progress}
        try:
            if address is None:
                ray.init(address="local", num_cpus=cpu_count(), **kwargs)
            else:
                import batch
                import ncf

                # ship this checkout's scoring code, so every node runs the driver's version of it
                ray.init(address=address, runtime_env={"py_modules": [batch, ncf]}, **kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise NcfError(f"cannot start or reach {where}: {type(exc).__name__}: {bio._one_line(exc)}") from exc
        started = True
    try:
        yield ray, started
    finally:
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()


@contextlib.contextmanager
def _data_context(progress: bool):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
             "wait_for_min_actors_s", "raise_original_map_exception")
    saved = {n: getattr(ctx, n) for n in names if hasattr(ctx, n)}
    order = ctx.execution_options.preserve_order
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    values = {"enable_progress_bars": progress, "enable_operator_progress_bars": progress,
              "print_on_execution_start": progress, "wait_for_min_actors_s": ACTOR_START_TIMEOUT_S,
              "raise_original_map_exception": True}
    for n in saved:
        setattr(ctx, n, values[n])
    if not progress:  # errors reach us as exceptions; the rest is noise in a one-line CLI
        data_log.setLevel(logging.ERROR)
    try:
        yield ctx
    finally:
        for n, v in saved.items():
            setattr(ctx, n, v)
        ctx.execution_options.preserve_order = order
        data_log.setLevel(level)


def _error_line(exc: BaseException) -> str:
    """One line for a failure inside Ray: the NcfError an actor raised, if there was one
    (Ray wraps it, with the remote traceback in its text)."""
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            break
        if type(e) is NcfError:
            return bio._one_line(e)
        e = getattr(e, "cause", None) or e.__cause__
    found = re.findall(r"NcfError: ([^\n]+)", str(exc))
    if found:
        return found[-1].strip()
    return f"{type(exc).__name__}: {bio._one_line(exc)}"


# --------------------------------------------------------------------------- output directory
def _check_out(out: Path, inputs: list[Path | None]) -> None:
    """`out` may be new, or an earlier output of this command (Parquet parts with the top-N
    columns), which a successful run replaces; anything else is refused, and so is an `out`
    that is, or contains, one of the inputs."""
    import pyarrow.parquet as pq

    for p in inputs:
        if p is not None:
            p = Path(p).absolute()
            if out == p or out in p.parents:
                raise NcfError(f"--out {out} would replace the input {p}; choose another --out")
    if out.exists() and not out.is_dir():
        raise NcfError(f"output {out} exists and is a file; --engine ray writes a directory of Parquet parts, "
                       f"give a directory name (e.g. topn/)")
    if out.is_dir():
        for f in sorted(out.iterdir()):
            try:
                ours = f.is_file() and f.suffix == ".parquet" and pq.read_schema(f).names == TOPN_COLUMNS
            except (OSError, pa.ArrowException):
                ours = False
            if not ours:
                raise NcfError(f"output directory {out} exists and is not an earlier top-N output ({f.name}); "
                               f"remove it or choose another --out")


def _part_rows(directory: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    files = sorted(p for p in directory.glob("*.parquet") if p.is_file())
    return len(files), sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _expected_counts(scorer: GridScorer, users: np.ndarray, k: int, include_seen: bool) -> np.ndarray:
    """Rows each scored user gets: k, or fewer when fewer unexcluded candidates are left."""
    if include_seen:
        return np.full(len(users), k, np.int64)
    indptr, seen = scorer.meta.seen_indptr, scorer.meta.seen_items
    if scorer.candidates is None:
        n_seen = indptr[users + 1] - indptr[users]
    else:
        inside = np.concatenate([[0], np.cumsum(scorer._pos_of_item[seen] >= 0)])
        n_seen = inside[indptr[users + 1]] - inside[indptr[users]]
    return np.minimum(k, scorer.n_candidates - n_seen).astype(np.int64)


# --------------------------------------------------------------------------- the job
def score_users_ray(
    model_path: Path,
    users_path: Path,
    out: Path,
    *,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    chunk_users: int | None = None,
    k: int = 50,
    items_path: Path | None = None,
    include_seen: bool = False,
    unknown: str = "popular",
    device: str = "auto",
    progress: bool = False,
    block_users: int | None = None,
) -> dict:
    """Write the top-k items of every user in `users_path` as a directory of Parquet parts at
    `out`, scored by an actor pool on Ray Data (see the module docstring); the rows equal those
    of `batch.score.score_users` for the same inputs. Returns a summary dict with a `line`.
    `block_users` overrides the users per actor call (default: from the grid size)."""
    t0 = time.perf_counter()
    check_options(k, unknown, chunk_users)
    if device not in DEVICES:
        raise NcfError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if block_users is not None and block_users < 1:
        raise NcfError(f"block size must be at least 1 user, got {block_users}")
    out, users_path, model_path = Path(out).absolute(), Path(users_path).absolute(), Path(model_path)
    _check_out(out, [users_path, model_path, items_path])
    _import_ray()  # say how to install it before any work

    # Everything that can be checked is checked in the driver before Ray starts.
    users_ds, users_col = bio.open_ids(users_path, "user", "--users")
    model_bytes = read_model_bytes(model_path)
    # the driver only reads metadata and checks inputs: no fused operators to build for it
    scorer = GridScorer.from_bytes(model_bytes, device="cpu", threads=1, source=str(model_path), fuse=False)
    try:
        user_type, item_type = scorer.user_ids.type, scorer.item_ids.type
        bio.check_id_type(users_ds.schema.field(users_col).type, user_type, users_path, users_col, "user")
        total = bio.check_ids_upfront(users_ds, users_col, users_path, "user", "--users")
        if total == 0:
            raise NcfError(f"users file {users_path} has no rows; nothing to score (no output written)")
        unknown_items = restrict_to_items(scorer, items_path, item_type) if items_path is not None else 0
        candidates = scorer.candidates  # None: every item
        if k > scorer.n_candidates:
            raise NcfError(f"--k {k} is larger than the number of candidate items ({scorer.n_candidates})")
        n_c = scorer.n_candidates
        schema = bio.topn_schema(user_type, item_type)
    except BaseException:
        scorer.close()
        raise
    t_loaded = time.perf_counter()

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with _ray_session(address, progress) as (ray, started):
        t_ray = time.perf_counter()
        try:
            node_cpus, node_gpus = _node_resources(ray)
            plan = plan_resources(node_cpus, node_gpus, device=device, actors=actors,
                                  cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
            with _data_context(progress) as ctx:
                # 1. read with Ray Data; drop duplicates and sort out unknown users in the driver
                ctx.execution_options.preserve_order = True  # first occurrence = the local engine's
                stats = {"users_in": 0, "unknown": 0, "duplicates": 0}
                ids_parts, idx_parts = _read_users(ray, users_ds.files, users_col, scorer, users_path,
                                                   unknown, stats)
                ctx.execution_options.preserve_order = False
                t_read = time.perf_counter()
                uidx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
                ids = pa.concat_arrays(ids_parts) if ids_parts else pa.array([], user_type)
                known_idx = uidx[uidx >= 0]
                counts = _expected_counts(scorer, known_idx, k, include_seen)
                expected_rows = int(counts.sum()) + (int((uidx < 0).sum()) * k if unknown == "popular" else 0)

                # 2. blocks of users -> actor pool -> Parquet parts
                n = len(uidx)
                if block_users is None:
                    hi = max(1, min(MAX_BLOCK_USERS, BLOCK_PAIRS // n_c))
                    block = min(hi, max(min(MIN_BLOCK_USERS, hi), -(-n // (plan.actors * BLOCKS_PER_ACTOR))))
                else:
                    block = block_users
                n_blocks = -(-n // block) if n else 0
                plan.actors = max(1, min(plan.actors, n_blocks))
                tmp.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                if n_blocks:
                    table = pa.table({"user_id": ids, "uidx": pa.array(uidx, pa.int64())})
                    blocks = [table.slice(lo, block) for lo in range(0, n, block)]
                    model_ref = ray.put(model_bytes)
                    cand_ref = ray.put(candidates) if candidates is not None else None
                    actor_kwargs = {"model_ref": model_ref, "device": plan.device, "threads": plan.threads,
                                    "chunk_users": chunk_users, "candidates_ref": cand_ref, "k": int(k),
                                    "include_seen": include_seen, "unknown": unknown}
                    ds = ray.data.from_arrow(blocks).map_batches(
                        TopNActor,
                        fn_constructor_kwargs=actor_kwargs,
                        batch_format="pyarrow",
                        batch_size=None,  # one block per call: the blocks are sized above
                        compute=ray.data.ActorPoolStrategy(size=plan.actors),
                        num_cpus=plan.cpus_per_actor,
                        num_gpus=plan.gpus_per_actor or None,
                    )
                    write_kwargs = {"schema": schema, "ray_remote_args": {"num_cpus": plan.write_cpus}}
                    if "min_rows_per_file" in inspect.signature(ds.write_parquet).parameters:
                        write_kwargs["min_rows_per_file"] = bio.ROW_GROUP_ROWS  # parts of >= 1 row group
                    ds.write_parquet(str(tmp), **write_kwargs)
                files, rows = _part_rows(tmp)
                if rows != expected_rows:
                    raise NcfError(
                        f"the parts in {tmp} hold {rows:,} rows, {expected_rows:,} were expected; is --out on storage "
                        f"that every Ray node shares? (no output written)"
                    )
                if files == 0:  # every user skipped: one empty part keeps the schema readable
                    import pyarrow.parquet as pq

                    pq.write_table(schema.empty_table(), tmp / "part-00000.parquet")
                    files = 1
                _replace_dir(tmp, out)
        except NcfError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise NcfError(f"scoring on Ray failed: {_error_line(exc)}") from exc
        finally:
            scorer.close()
    t_end = time.perf_counter()

    seconds = t_end - t0
    startup = t_ray - t_loaded  # starting (or connecting to) Ray
    scoring = t_end - t_ray  # read, dedupe, actors start, score, write, check
    scored = len(known_idx)
    pairs = scored * n_c
    provider = CUDA_EP if plan.device == "cuda" else CPU_EP
    summary = {
        "engine": "ray",
        "address": address or "local instance",
        "ray_started": started,
        "out": str(out),
        "files": files,
        "model": str(model_path),
        "kind": scorer.kind,
        "provider": provider,
        "actors": plan.actors,
        "cpus_per_actor": plan.cpus_per_actor,
        "gpus_per_actor": plan.gpus_per_actor,
        "threads": plan.threads,
        "block_users": block,
        "blocks": n_blocks,
        "users_in": stats["users_in"],
        "users_scored": scored,
        "unknown_users": stats["unknown"],
        "unknown_handling": "popular items, score null" if unknown == "popular" else "skipped",
        "duplicate_users": stats["duplicates"],
        "users_short": int((counts < k).sum()),
        "candidates": n_c,
        "unknown_items": unknown_items,
        "k": k,
        "include_seen": include_seen,
        "rows": rows,
        "seconds": seconds,  # whole run
        "loading_seconds": t_loaded - t0,  # model and input checks in the driver
        "startup_seconds": startup,  # Ray start-up (or connection)
        "read_seconds": t_read - t_ray,  # users read with Ray Data, duplicates dropped
        "scoring_seconds": scoring,  # read + actors + score + write
        "users_per_s": scored / scoring if scoring else 0.0,
        "pairs_per_s": pairs / scoring if scoring else 0.0,
    }
    summary["line"] = (
        f"{scored:,} users scored, {stats['unknown']:,} unknown ({summary['unknown_handling']}), "
        f"{rows:,} rows -> {out}/ ({files} part{'s' * (files != 1)}) in {seconds:.1f}s "
        f"({startup:.1f}s Ray start-up, {t_loaded - t0:.1f}s loading) on Ray, {plan.describe()} on {provider} "
        f"({summary['users_per_s']:,.0f} users/s, {summary['pairs_per_s']:,.0f} pairs/s)"
    )
    return summary


def _read_users(ray, files: list[str], column: str, scorer: GridScorer, users_path: Path, unknown: str,
                stats: dict) -> tuple[list[pa.Array], list[np.ndarray]]:
    """Users in input order, cast to the vocabulary type, duplicates dropped (first occurrence,
    exactly as batch.score does), unknown ones kept with index -1 unless skipped."""
    user_type = scorer.user_ids.type
    first_seen = FirstOccurrence(scorer, unknown, stats)
    ids_parts: list[pa.Array] = []
    idx_parts: list[np.ndarray] = []
    ds = ray.data.read_parquet(list(files)).select_columns([column])
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=bio.READ_BATCH_ROWS):
        if batch.num_rows == 0:
            continue
        ids = bio.cast_ids(batch.column(column), user_type, users_path, column, "user")
        keep, idx = first_seen.keep(ids)
        if len(keep):
            ids_parts.append(ids.take(pa.array(keep)))
            idx_parts.append(idx[keep])
    return ids_parts, idx_parts


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished parts into place; a previous output directory is replaced."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
