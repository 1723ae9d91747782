"""`ncf score`: top-k items for every user of a Parquet file, streamed through ONNX Runtime.

Policies (what a run does with unusual input):
* Seen items: every item a user has in the training input is excluded, unless
  include_seen=True. A user with fewer than k unexcluded candidates gets fewer than k rows
  (excluded items never come out).
* Unknown users (ids the model never saw) are counted and reported, never a crash:
  - unknown="popular" (default): they get the k most popular candidates of the training
    input (interaction count, ties by item index), ranks 1..k, and score = null, because the
    model has no probability for a user it never saw; a null says so instead of inventing one.
  - unknown="skip": they get no rows.
* Duplicate users in the users file are scored once: the first occurrence is kept, later ones
  are counted (`duplicate_users`) and dropped, so (user_id, rank) is a key of the output.
* Candidates: every item, or with items_path only those items (ids the model does not know
  are counted in `unknown_items` and ignored; none known is an error).
* Rows come out grouped by user, ranks ascending; users keep the input order within each read
  batch, the fallback rows of that batch's unknown users follow its scored users.
* An empty users file (no rows) is an error (exit 1), like the other bad inputs; nothing is
  written. A file whose users are all skipped gives a valid output file with zero rows.
* Output goes to a temporary name and is renamed into place only when complete.
Memory is bounded by the read batch and the scoring chunk, not by the number of users
(the duplicate filter keeps one bit per model user plus the distinct unknown ids).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch import io as bio
from batch.scorer import GridScorer
from ncf.errors import NcfError

UNKNOWN_POLICIES = ("popular", "skip")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:  # pragma: no cover - rich comes with typer
        return None
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    return Progress(
        TextColumn("scoring"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("users | {task.fields[users_s]:,.0f} users/s | {task.fields[pairs_s]:,.2f} M pairs/s |"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def score_users(
    model_path: Path,
    users_path: Path,
    out: Path,
    *,
    k: int = 50,
    items_path: Path | None = None,
    include_seen: bool = False,
    unknown: str = "popular",
    device: str = "auto",
    chunk_users: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    resume: bool = False,
) -> dict:
    """Write the top-k items of every user in `users_path` to `out` (Parquet; see the module
    docstring for the policies) and return a summary dict. NcfError for bad input, with no
    output file left behind."""
    if resume:
        raise NcfError("--resume is not available yet")
    t0 = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise NcfError(f"--k must be an integer, got {k!r}")
    if k <= 0:
        raise NcfError(f"--k must be at least 1, got {k}")
    if unknown not in UNKNOWN_POLICIES:
        raise NcfError(f"unknown-user policy must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    if chunk_users is not None and chunk_users < 1:
        raise NcfError(f"chunk size must be at least 1 user, got {chunk_users}")
    out, users_path = Path(out), Path(users_path)
    if out.exists() and out.is_dir():
        raise NcfError(f"output {out} is a directory; give a file name such as topn.parquet")

    # Everything that can be checked is checked before an output file exists.
    users_ds, users_col = bio.open_ids(users_path, "user", "--users")
    scorer = GridScorer(Path(model_path), device=device, threads=threads, chunk_users=chunk_users)
    try:
        user_type, item_type = scorer.user_ids.type, scorer.item_ids.type
        bio.check_id_type(users_ds.schema.field(users_col).type, user_type, users_path, users_col, "user")
        total = bio.count_rows(users_ds, users_path, "user")
        if total == 0:
            raise NcfError(f"users file {users_path} has no rows; nothing to score (no output written)")
        unknown_items = 0
        if items_path is not None:
            raw_items = bio.read_all_ids(Path(items_path), "item", "--items", item_type)
            idx = scorer.item_index(raw_items)
            unknown_items = len(set(raw_items.filter(pa.array(idx < 0)).to_pylist()))
            known = np.unique(idx[idx >= 0])
            if len(known) == 0:
                raise NcfError(f"none of the {len(raw_items)} ids in --items {items_path} are items the model knows")
            scorer.set_candidates(known)
        if k > scorer.n_candidates:
            raise NcfError(f"--k {k} is larger than the number of candidate items ({scorer.n_candidates})")
        pop_items, _ = scorer.popular(k)
        pop_ids = scorer.item_ids.take(pa.array(pop_items))
        n_c = scorer.n_candidates

        seen_user = np.zeros(scorer.n_users, bool)
        seen_unknown: set = set()
        stats = {"users_in": 0, "scored": 0, "unknown": 0, "duplicates": 0, "short": 0, "pairs": 0}
        # Users scored per topk call: enough chunks to keep every thread busy, bounded memory.
        super_users = max(scorer.chunk_users * scorer.threads * 8, (1 << 22) // n_c)
        super_users = min(super_users, 1 << 16)
        super_users -= super_users % scorer.chunk_users or 0
        super_users = max(super_users, scorer.chunk_users)
        bar = _progress(progress, total)
        schema = bio.topn_schema(user_type, item_type)

        with bio.TopNWriter(out, schema) as writer:
            task = bar.add_task("score", total=total, users_s=0.0, pairs_s=0.0) if bar else None

            def tick(n_users: int) -> None:
                if bar:
                    el = max(time.perf_counter() - t1, 1e-9)
                    bar.update(task, advance=n_users, users_s=stats["scored"] / el, pairs_s=stats["pairs"] / el / 1e6)

            if bar:
                bar.start()
            t1 = time.perf_counter()  # setup (model, vocabularies, checks) ends here
            try:
                pend_idx: list[np.ndarray] = []
                pend_ids: list[pa.Array] = []
                pend_n = 0

                def flush_known(final: bool = True) -> None:
                    """Score the pending users in whole super-chunks; the rest waits unless final."""
                    nonlocal pend_idx, pend_ids, pend_n
                    take = pend_n if final else pend_n - pend_n % super_users
                    if not take:
                        return
                    idx = np.concatenate(pend_idx)
                    ids = pa.concat_arrays(pend_ids)
                    pend_idx, pend_ids, pend_n = [idx[take:]], [ids.slice(take)], pend_n - take
                    for lo in range(0, take, super_users):
                        hi = min(lo + super_users, take)
                        res = scorer.topk(idx[lo:hi], k, exclude_seen=not include_seen)
                        _write_topk(writer, ids.slice(lo, hi - lo), res, scorer.item_ids)
                        stats["scored"] += len(res.counts)
                        stats["short"] += int((res.counts < k).sum())
                        stats["pairs"] += len(res.counts) * n_c
                        tick(len(res.counts))

                for raw in bio.iter_ids(users_ds, users_col):
                    ids = bio.cast_ids(raw, user_type, users_path, users_col, "user")
                    n = len(ids)
                    stats["users_in"] += n
                    idx = scorer.user_index(ids)
                    known = idx >= 0
                    # first occurrence of each known user, input order kept
                    kpos = np.flatnonzero(known)
                    if len(kpos):
                        _, first = np.unique(idx[kpos], return_index=True)
                        keep = kpos[np.sort(first)]
                        keep = keep[~seen_user[idx[keep]]]
                        stats["duplicates"] += len(kpos) - len(keep)
                        seen_user[idx[keep]] = True
                        if len(keep):
                            pend_idx.append(idx[keep])
                            pend_ids.append(ids.take(pa.array(keep)))
                            pend_n += len(keep)
                    flush_known(final=False)
                    upos = np.flatnonzero(~known)
                    if len(upos):
                        new = []
                        for p, v in zip(upos, ids.take(pa.array(upos)).to_pylist()):
                            if v in seen_unknown:
                                stats["duplicates"] += 1
                            else:
                                seen_unknown.add(v)
                                new.append(p)
                        stats["unknown"] += len(new)
                        if unknown == "popular" and new:
                            flush_known()  # keep the batch's scored users ahead of its fallbacks
                            u = ids.take(pa.array(np.repeat(np.asarray(new, np.int64), len(pop_items))))
                            reps = len(new)
                            writer.write(
                                u,
                                np.tile(np.arange(1, len(pop_items) + 1, dtype=np.int32), reps),
                                pop_ids.take(pa.array(np.tile(np.arange(len(pop_items)), reps))),
                                pa.nulls(reps * len(pop_items), pa.float32()),
                            )
                    tick(n - len(keep) if len(kpos) else n)  # unknown and duplicate rows; scored ones tick when scored
                flush_known()
                if bar:
                    bar.update(task, completed=total)
            finally:
                if bar:
                    bar.stop()
            writer.commit()
    except NcfError:
        raise
    except Exception as exc:  # a damaged users file mid-stream and the like: one line
        raise NcfError(f"scoring failed: {type(exc).__name__}: {bio._one_line(exc)}") from exc
    finally:
        scorer.close()

    t2 = time.perf_counter()
    seconds, scoring = t2 - t0, t2 - t1
    summary = {
        "out": str(out),
        "model": str(model_path),
        "kind": scorer.kind,
        "provider": scorer.provider,
        "device_note": scorer.device_note,
        "users_in": stats["users_in"],
        "users_scored": stats["scored"],
        "unknown_users": stats["unknown"],
        "unknown_handling": "popular items, score null" if unknown == "popular" else "skipped",
        "duplicate_users": stats["duplicates"],
        "users_short": stats["short"],  # users with fewer than k candidates left after masking
        "candidates": n_c,
        "unknown_items": unknown_items,
        "k": k,
        "include_seen": include_seen,
        "rows": writer.rows,
        "row_groups": writer.row_groups,
        "chunk_users": scorer.chunk_users,
        "threads": scorer.threads,
        "seconds": seconds,  # whole run, including loading the model
        "scoring_seconds": scoring,  # reading, scoring and writing
        "users_per_s": stats["scored"] / scoring if scoring else 0.0,
        "pairs_per_s": stats["pairs"] / scoring if scoring else 0.0,
    }
    summary["line"] = (
        f"{summary['users_scored']:,} users scored, {summary['unknown_users']:,} unknown ({summary['unknown_handling']}), "
        f"{summary['rows']:,} rows -> {out} in {seconds:.1f}s ({seconds - scoring:.1f}s loading) on {scorer.provider} "
        f"({summary['users_per_s']:,.0f} users/s, {summary['pairs_per_s']:,.0f} pairs/s)"
    )
    return summary


def _write_topk(writer: bio.TopNWriter, user_ids: pa.Array, res, item_vocab: pa.Array) -> None:
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
    writer.write(user_ids.take(pa.array(rows_u)), rank, item_vocab.take(pa.array(items)), pa.array(score, pa.float32()))
