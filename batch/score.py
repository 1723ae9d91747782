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
  are counted in `unknown_items` and ignored; none known, or an empty file, is an error).
* Rows come out grouped by user in the order of each user's first occurrence in the users
  file (unknown users' fallback rows in their place too), ranks ascending. This order does
  not depend on chunk sizes, threads, read batches or on a run being resumed.
* Bad input is an NcfError (one line, exit 1) raised before any work where it can be seen
  from the files' metadata: missing or unreadable files, no id column, ids of another type
  than the model's or of several types across the parts of a directory, null ids, k or
  --chunk-users out of range, an output path that is a directory or one of the inputs, a
  model file not made by `ncf export`. An empty users file (no rows) is an error too; a file
  whose users are all skipped gives a valid output file with zero rows.

Interruption and --resume. Finished work goes into a hidden work directory beside the
output, `.<out name>.parts/`:
  manifest.json   the run's fingerprint (model file size/mtime and vocabulary hash, users
                  and items files' sizes/mtimes, k, include_seen, unknown policy, provider,
                  users per ONNX Runtime call and per scoring block) and the finished parts
  part-NNNNNN.arrow  the rows of the users-file positions [start, end) of one part (Arrow
                  IPC, uncompressed: written and read back at memory speed, so the rows are
                  encoded as Parquet once, into the final file),
                  written under a .tmp name, fsync'ed and renamed, then recorded in the
                  manifest (also replaced atomically): a part is complete or not listed
  lock            flock'ed while a run writes, so two runs cannot share one output
A part is closed every PART_SECONDS (env NCF_SCORE_PART_SECONDS, default 5) or PART_ROWS
rows. When all users are done, the parts are streamed in order into the final file (written
inside the work directory, renamed onto `out`), and the work directory is removed. So a run
stopped at any point (Ctrl-C, SIGTERM, SIGKILL, power loss) never leaves a complete-looking
`out`: only the work directory (and, untouched, an older `out` from an earlier finished run).
* `--resume` checks the fingerprint (a different input or setting is an error that says
  what changed), keeps the listed parts that are intact, replays the duplicate filter over
  the users-file positions they cover without scoring them, and continues from there with
  the same users per scoring block, so the result equals an uninterrupted run row for row,
  scores included. With no work directory `--resume` simply starts from the beginning, so
  a retry loop can always pass it.
* Without `--resume`, a leftover work directory of an interrupted run is discarded and the
  run starts over (the summary line says so); a work directory locked by a running process
  is an error.
* Bad input found mid-stream removes the work directory (a resume could not help); a
  failure to write (disk full, permissions) keeps it and says to rerun with --resume.
Scoring blocks are pipelined: while the worker threads score block j + 1, this thread
writes block j and reads on (blocks of a few hundred users against 20,000 items lost 10-14%
of the run to writing and id lookups done between blocks).
Memory is bounded by the read batch and two scoring blocks, not by the number of users: the
duplicate filter keeps one byte per model user plus the distinct unknown ids (these, and
only these, grow with the input: a few tens of bytes per distinct unknown user).
"""


from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch import io as bio
from batch.scorer import GridScorer, TopK
from ncf.errors import NcfError
from ncf.paths import check_writable_location

UNKNOWN_POLICIES = ("popular", "skip")
WORK_VERSION = 2  # 2: parts are Arrow IPC files (1: Parquet)
PART_ROWS = 1 << 22
MAX_PAIRS_PER_CALL = 1 << 25  # users per ONNX Runtime call x candidates: the intermediates' size
BLOCK_PAIRS = 1 << 22  # at least this many pairs per scoring block (the unit of writing and resuming)


def _part_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("NCF_SCORE_PART_SECONDS", "5")))
    except ValueError:
        return 5.0


PART_SECONDS = _part_seconds()


class _WriteError(NcfError):
    """Writing the output failed (disk full, permissions): the work directory is kept."""


def work_dir_for(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.parts")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class _WorkDir:
    """The hidden directory of finished parts beside the output (module docstring)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = work_dir_for(out)
        self._lock = None

    def read_manifest(self) -> dict | None:
        try:
            m = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) and m.get("work_version") == WORK_VERSION else None

    def acquire(self) -> None:
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / "lock", "a+b")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise NcfError(f"cannot write {self.out}: {exc.strerror or exc} ({self.path.parent})") from exc
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            self._lock = None
            raise NcfError(
                f"another `ncf score` is writing {self.out} right now (lock {self.path / 'lock'}); "
                f"wait for it to finish or choose another --out"
            ) from exc

    def entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != "lock"]

    def reset(self, manifest: dict) -> bool:
        """Empty the directory (an interrupted run's parts) and write a fresh manifest;
        True if there was something to discard."""
        old = self.entries()
        for p in old:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        self.write_manifest(manifest)
        return any(p.name.startswith("part-") for p in old)

    def write_manifest(self, manifest: dict) -> None:
        tmp = self.path / "manifest.json.tmp"
        try:
            _fsync_write(tmp, (json.dumps(manifest, indent=1) + "\n").encode())
            os.replace(tmp, self.path / "manifest.json")
        except OSError as exc:
            raise _WriteError(f"cannot write {self.path}: {exc.strerror or exc}; fix that and rerun with --resume") from exc

    def intact_parts(self, manifest: dict) -> list[dict]:
        """The manifest's parts that are contiguous from position 0 and readable with the
        recorded row count; anything else in the directory is removed."""
        kept: list[dict] = []
        end = 0
        for part in manifest.get("parts", []):
            f = self.path / str(part.get("file", ""))
            try:
                ok = part["start"] == end and f.is_file() and _part_rows(f) == part["rows"]
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
                ok = False
            if not ok:
                break
            kept.append(part)
            end = part["end"]
        names = {p["file"] for p in kept} | {"manifest.json"}
        for p in self.entries():
            if p.name not in names:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if len(kept) != len(manifest.get("parts", [])):
            manifest["parts"] = kept
            self.write_manifest(manifest)
        return kept

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()


class _Parts:
    """Finished rows go to part files; `cut` closes the current one and records it."""

    def __init__(self, wd: _WorkDir, manifest: dict, schema: pa.Schema, start: int):
        self.wd, self.manifest, self.schema = wd, manifest, schema
        self.seq = len(manifest["parts"])
        self.start = start
        self.rows = 0
        self.stats = {"scored": 0, "short": 0}
        self._writer = None
        self._fh = None
        self.t0 = time.perf_counter()

    def _name(self) -> str:
        return f"part-{self.seq:06d}.arrow"

    def write(self, table: pa.Table, scored: int, short: int) -> None:
        try:
            if self._writer is None:
                self._fh = open(self.wd.path / (self._name() + ".tmp"), "wb")  # noqa: SIM115
                self._writer = pa.ipc.new_file(self._fh, self.schema)
            if table.num_rows:
                self._writer.write_table(table)
        except OSError as exc:
            raise _WriteError(f"cannot write {self.wd.path}: {exc.strerror or exc}; fix that and rerun with --resume") from exc
        self.rows += table.num_rows
        self.stats["scored"] += scored
        self.stats["short"] += short

    def due(self, part_seconds: float) -> bool:
        return self.rows > 0 and (self.rows >= PART_ROWS or time.perf_counter() - self.t0 >= part_seconds)

    def cut(self, end: int) -> None:
        """Close the current part as covering users-file positions [start, end)."""
        if self._writer is None:  # no rows since the last cut: nothing to record
            return
        name = self._name()
        try:
            self._writer.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.wd.path / (name + ".tmp"), self.wd.path / name)
        except OSError as exc:
            raise _WriteError(f"cannot write {self.wd.path}: {exc.strerror or exc}; fix that and rerun with --resume") from exc
        self._writer = self._fh = None
        self.manifest["parts"].append({"file": name, "start": self.start, "end": end, "rows": self.rows, **self.stats})
        self.wd.write_manifest(self.manifest)
        self.seq += 1
        self.start, self.rows, self.stats, self.t0 = end, 0, {"scored": 0, "short": 0}, time.perf_counter()

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._fh.close()
            (self.wd.path / (self._name() + ".tmp")).unlink(missing_ok=True)
            self._writer = self._fh = None


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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the run like Ctrl-C (temporaries removed, finished parts kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _same_file(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def check_options(k, unknown: str, chunk_users: int | None) -> None:
    """The option checks both engines make before any work."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise NcfError(f"--k must be an integer, got {k!r}")
    if k <= 0:
        raise NcfError(f"--k must be at least 1, got {k}")
    if unknown not in UNKNOWN_POLICIES:
        raise NcfError(f"unknown-user policy must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    if chunk_users is not None and chunk_users < 1:
        raise NcfError(f"chunk size must be at least 1 user, got {chunk_users}")


class FirstOccurrence:
    """The users-file policy both engines share: each user is scored at its first occurrence
    in the stream, later ones are counted as duplicates; unknown users are counted once and
    kept only under "popular". Memory: one byte per model user plus the distinct unknown ids."""

    def __init__(self, scorer: GridScorer, unknown: str, stats: dict):
        self.scorer, self.unknown, self.stats = scorer, unknown, stats
        self.seen_user = np.zeros(scorer.n_users, bool)
        self.seen_unknown: set = set()

    def keep(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(positions in this batch that produce output, ascending; user index of every row,
        -1 if unknown)."""
        stats = self.stats
        stats["users_in"] += len(ids)
        idx = self.scorer.user_index(ids)
        known = idx >= 0
        kpos = np.flatnonzero(known)
        keep = kpos[:0]
        if len(kpos):
            _, first = np.unique(idx[kpos], return_index=True)
            keep = kpos[np.sort(first)]
            keep = keep[~self.seen_user[idx[keep]]]
            stats["duplicates"] += len(kpos) - len(keep)
            self.seen_user[idx[keep]] = True
        upos = np.flatnonzero(~known)
        if len(upos):
            new = []
            for p, v in zip(upos, ids.take(pa.array(upos)).to_pylist()):
                if v in self.seen_unknown:
                    stats["duplicates"] += 1
                else:
                    self.seen_unknown.add(v)
                    new.append(p)
            stats["unknown"] += len(new)
            if self.unknown == "popular" and new:
                keep = np.sort(np.concatenate([keep, np.asarray(new, np.int64)]))
        return keep, idx


def restrict_to_items(scorer: GridScorer, items_path: Path, item_type: pa.DataType) -> int:
    """`--items`: make the known ids of the file the candidates; returns how many distinct
    ids the model does not know (ignored). Both engines use it."""
    raw_items = bio.read_all_ids(Path(items_path), "item", "--items", item_type)
    if len(raw_items) == 0:
        raise NcfError(f"--items {items_path} has no rows: the candidate set is empty; "
                       f"leave --items out to score every item")
    idx = scorer.item_index(raw_items)
    known = np.unique(idx[idx >= 0])
    if len(known) == 0:
        raise NcfError(f"none of the {len(raw_items)} ids in --items {items_path} are items the model knows")
    scorer.set_candidates(known)
    return len(set(raw_items.filter(pa.array(idx < 0)).to_pylist()))


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
    part_seconds: float | None = None,
) -> dict:
    """Write the top-k items of every user in `users_path` to `out` (Parquet; see the module
    docstring for the policies, interruption and `resume`) and return a summary dict.
    NcfError for bad input, with no output file left behind."""
    t0 = time.perf_counter()
    part_seconds = PART_SECONDS if part_seconds is None else part_seconds
    check_options(k, unknown, chunk_users)
    out, users_path, model_path = Path(out), Path(users_path), Path(model_path)
    items_path = Path(items_path) if items_path is not None else None
    if out.exists() and out.is_dir():
        raise NcfError(f"output {out} is a directory; give a file name such as topn.parquet")
    for given, flag in ((users_path, "--users"), (model_path, "--model"), (items_path, "--items")):
        if _same_file(out, given):
            raise NcfError(f"--out {out} is the {flag} input; the output would replace it: choose another --out")
    check_writable_location(out)
    if model_path.is_dir():
        raise NcfError(f"--model {model_path} is a directory; give the model.onnx file written by `ncf export`")

    # Everything that can be checked is checked before an output file exists.
    users_ds, users_col = bio.open_ids(users_path, "user", "--users")
    total = bio.check_ids_upfront(users_ds, users_col, users_path, "user", "--users")
    wd = _WorkDir(out)
    prior = wd.read_manifest() if resume else None
    if chunk_users is None and prior is not None:
        chunk_users = prior.get("fingerprint", {}).get("chunk_users")  # same grouping as the first run
    scorer = GridScorer(model_path, device=device, threads=threads, chunk_users=chunk_users)
    try:
        user_type, item_type = scorer.user_ids.type, scorer.item_ids.type
        bio.check_id_type(users_ds.schema.field(users_col).type, user_type, users_path, users_col, "user")
        if total == 0:
            raise NcfError(f"users file {users_path} has no rows; nothing to score (no output written)")
        unknown_items = restrict_to_items(scorer, items_path, item_type) if items_path is not None else 0
        if k > scorer.n_candidates:
            raise NcfError(f"--k {k} is larger than the number of candidate items ({scorer.n_candidates})")
        n_c = scorer.n_candidates
        if chunk_users is not None and scorer.chunk_users * n_c > MAX_PAIRS_PER_CALL:
            raise NcfError(
                f"--chunk-users {scorer.chunk_users} x {n_c:,} candidates = {scorer.chunk_users * n_c:,} pairs per "
                f"ONNX Runtime call is too much memory; use at most {max(1, MAX_PAIRS_PER_CALL // n_c):,}"
            )
        pop_items, _ = scorer.popular(k)

        # Users per scoring block: enough chunks to keep every thread busy, bounded memory.
        super_users = max(scorer.chunk_users * scorer.threads * 8, BLOCK_PAIRS // n_c)
        super_users = min(super_users, 1 << 16)
        super_users -= super_users % scorer.chunk_users or 0
        super_users = max(super_users, scorer.chunk_users)
        fingerprint = {
            "model": {"file": bio.path_fingerprint(model_path)[0][1:], "vocab_hash": scorer.meta.vocab_hash},
            "users": bio.path_fingerprint(users_path),
            "items": bio.path_fingerprint(items_path),
            "k": int(k),
            "include_seen": bool(include_seen),
            "unknown": unknown,
            "provider": scorer.provider,
            "chunk_users": int(scorer.chunk_users),
        }
        schema = bio.topn_schema(user_type, item_type)

        wd.acquire()
        keep_work = False
        discarded = False
        parts = None
        try:
            manifest = wd.read_manifest() if resume else None
            if manifest is not None:
                changed = [key for key, v in fingerprint.items() if manifest.get("fingerprint", {}).get(key) != v]
                if changed:
                    keep_work = True  # it belongs to another run: leave it for the user to decide
                    names = {"model": "model file", "users": "users file", "items": "items file", "k": "--k",
                             "include_seen": "--include-seen", "unknown": "--unknown", "provider": "execution provider",
                             "chunk_users": "--chunk-users"}
                    raise NcfError(
                        f"--resume: the interrupted run into {out} used other inputs or settings "
                        f"({', '.join(names[c] for c in changed)} changed); rerun without --resume to start over"
                    )
                super_users = int(manifest["super_users"])
                done_parts = wd.intact_parts(manifest)
            else:
                manifest = {"work_version": WORK_VERSION, "fingerprint": fingerprint, "super_users": super_users,
                            "total_rows": total, "parts": []}
                discarded = wd.reset(manifest)
                done_parts = []
            done = done_parts[-1]["end"] if done_parts else 0
            parts = _Parts(wd, manifest, schema, done)
            stats = {"users_in": 0, "scored": 0, "unknown": 0, "duplicates": 0, "short": 0, "pairs": 0}
            for p in done_parts:
                stats["scored"] += p["scored"]
                stats["short"] += p["short"]
            stats["pairs"] = stats["scored"] * n_c
            scored_before = stats["scored"]

            first_seen = FirstOccurrence(scorer, unknown, stats)

            def classify(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
                """(positions kept in this batch, their user indices: -1 if unknown)"""
                keep, idx = first_seen.keep(ids)
                return keep, idx[keep]

            bar = _progress(progress, total)
            task = bar.add_task("score", total=total, users_s=0.0, pairs_s=0.0) if bar else None
            t1 = time.perf_counter()  # setup (model, vocabularies, checks) ends here

            def start(ids: pa.Array, idx: np.ndarray, first: int) -> _Block:
                """Start scoring one block of kept rows (the worker threads run it while this
                thread writes the previous block and reads on); `first`: its first position."""
                known = idx >= 0
                result = scorer.topk_start(idx[known], k, exclude_seen=not include_seen) if known.any() else None
                return _Block(ids, idx, known, result, first)

            def finish(block: _Block) -> None:
                """Wait for a started block and write its output rows to the current part."""
                ids, idx, known = block.ids, block.idx, block.known
                n = len(idx)
                items = np.full((n, k), -1, np.int64)
                scores = np.full((n, k), np.nan, np.float32)
                n_known = int(known.sum())
                short = 0
                if n_known:
                    res = block.result()
                    items[known], scores[known] = res.items, res.scores
                    short = int((res.counts < k).sum())
                if n_known < n:
                    items[~known] = pop_items
                parts.write(_rows_table(schema, ids, items, scores, scorer.item_ids), n_known, short)
                stats["scored"] += n_known
                stats["short"] += short
                stats["pairs"] += n_known * n_c

            pend_pos = np.zeros(0, np.int64)  # kept rows not scored yet: users-file position,
            pend_idx = np.zeros(0, np.int64)  # user index (-1: unknown)
            pend_ids = pa.array([], user_type)  # and raw id
            read_pos = 0
            in_flight = None  # the block being scored, written once the next one has started
            with _sigterm_as_interrupt():
                if bar:
                    bar.start()
                    bar.update(task, completed=done)
                try:
                    if done < total:
                        for raw in bio.iter_ids(users_ds, users_col):
                            ids = bio.cast_ids(raw, user_type, users_path, users_col, "user")
                            n = len(ids)
                            if read_pos + n <= done:  # covered by finished parts: replay the filter only
                                classify(ids)
                                read_pos += n
                                continue
                            if read_pos < done:
                                classify(ids.slice(0, done - read_pos))
                                ids = ids.slice(done - read_pos)
                                read_pos = done
                            keep, keep_idx = classify(ids)
                            if len(keep):
                                pend_pos = np.concatenate([pend_pos, keep + read_pos])
                                pend_idx = np.concatenate([pend_idx, keep_idx])
                                pend_ids = pa.concat_arrays([pend_ids, ids.take(pa.array(keep))])
                            read_pos += len(ids)
                            while len(pend_pos) >= super_users:
                                block = start(pend_ids.slice(0, super_users), pend_idx[:super_users], int(pend_pos[0]))
                                pend_pos, pend_idx = pend_pos[super_users:], pend_idx[super_users:]
                                pend_ids = pend_ids.slice(super_users)
                                if in_flight is not None:
                                    finish(in_flight)
                                in_flight = block
                                covered = block.first  # everything before the block in flight is written
                                if parts.due(part_seconds):
                                    parts.cut(covered)
                                if bar:
                                    el = max(time.perf_counter() - t1, 1e-9)
                                    bar.update(task, completed=covered, users_s=(stats["scored"] - scored_before) / el,
                                               pairs_s=(stats["scored"] - scored_before) * n_c / el / 1e6)
                            if len(pend_ids) and pend_ids.offset:  # keep the remainder compact
                                pend_ids = pa.concat_arrays([pend_ids])
                        if read_pos != total:
                            raise NcfError(f"users file {users_path} changed while it was read "
                                           f"({read_pos:,} rows, its metadata says {total:,})")
                        if in_flight is not None:
                            finish(in_flight)
                        if len(pend_pos):
                            finish(start(pend_ids, pend_idx, int(pend_pos[0])))
                        parts.cut(total)
                    if bar:
                        bar.update(task, completed=total)
                finally:
                    if bar:
                        bar.stop()
                rows = _assemble(wd, manifest, out, schema)
            wd.remove()
        except BaseException as exc:
            if parts is not None:
                parts.abort()
            (wd.path / "final.parquet.tmp").unlink(missing_ok=True)
            if isinstance(exc, Exception) and not keep_work and not isinstance(exc, _WriteError):
                wd.remove()  # bad input: a resume could not help; leave nothing behind
            wd.release()
            raise
    except NcfError:
        raise
    except Exception as exc:  # a damaged users file mid-stream and the like: one line
        raise NcfError(f"scoring failed: {type(exc).__name__}: {bio._one_line(exc)}") from exc
    finally:
        scorer.close()

    t2 = time.perf_counter()
    seconds, scoring = t2 - t0, t2 - t1
    new_scored = stats["scored"] - scored_before
    summary = {
        "out": str(out),
        "model": str(model_path),
        "kind": scorer.kind,
        "provider": scorer.provider,
        "device_note": scorer.device_note,
        "kernel": scorer.kernel_note,
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
        "rows": rows,
        "row_groups": -(-rows // bio.ROW_GROUP_ROWS) if rows else 0,
        "chunk_users": scorer.chunk_users,
        "threads": scorer.threads,
        "parts": len(manifest["parts"]),
        "resumed_from": done,  # users-file rows already done by an interrupted run
        "discarded_partial": discarded,
        "seconds": seconds,  # whole run, including loading the model
        "scoring_seconds": scoring,  # reading, scoring and writing
        "users_per_s": new_scored / scoring if scoring else 0.0,
        "pairs_per_s": new_scored * n_c / scoring if scoring else 0.0,
    }
    note = ""
    if done:
        note = f" (resumed: {done:,} of {total:,} input rows were already done)"
    elif discarded:
        note = " (discarded the parts of an earlier interrupted run; pass --resume to continue one)"
    summary["line"] = (
        f"{summary['users_scored']:,} users scored, {summary['unknown_users']:,} unknown ({summary['unknown_handling']}), "
        f"{summary['rows']:,} rows -> {out} in {seconds:.1f}s ({seconds - scoring:.1f}s loading) on {scorer.provider} "
        f"[{scorer.kernel_note}]; scoring {summary['users_per_s']:,.0f} users/s, {summary['pairs_per_s']:,.0f} pairs/s{note}"
    )
    return summary


@dataclass
class _Block:
    """A scoring block in flight: its rows' raw ids and user indices (-1: unknown), which
    are known, the pending top-k of the known ones, and its first users-file position."""

    ids: pa.Array
    idx: np.ndarray
    known: np.ndarray
    result: Callable[[], TopK] | None
    first: int


def _assemble(wd: _WorkDir, manifest: dict, out: Path, schema: pa.Schema) -> int:
    """Stream the finished parts, in order, into `out` (temporary name inside the work
    directory, renamed onto `out` when complete). Returns the number of rows."""
    want = sum(p["rows"] for p in manifest["parts"])
    try:
        with bio.TopNWriter(out, schema, tmp=wd.path / "final.parquet.tmp") as writer:
            for p in manifest["parts"]:
                with pa.OSFile(str(wd.path / p["file"])) as source:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):  # one scoring block each
                        writer.write_table(reader.get_batch(i))
            if writer.rows + writer._buffered != want:
                raise NcfError(f"work directory {wd.path} is inconsistent; rerun without --resume")
            writer.commit()
    except OSError as exc:
        raise _WriteError(f"cannot write {out}: {exc.strerror or exc}; fix that and rerun with --resume") from exc
    return writer.rows


def _part_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).count_rows()


def _rows_table(schema: pa.Schema, user_ids: pa.Array, items: np.ndarray, scores: np.ndarray,
                item_vocab: pa.Array) -> pa.Table:
    """Output rows of n users: `items` [n, k] item indices (-1: no item), `scores` [n, k]
    (NaN: null)."""
    n, k = items.shape
    valid = items >= 0
    if valid.all():
        rows_u = np.repeat(np.arange(n), k)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), n)
        it = items.reshape(-1)
        sc = scores.reshape(-1)
    else:  # users with fewer than k unexcluded candidates: drop the empty slots
        counts = valid.sum(axis=1)
        rows_u = np.repeat(np.arange(n), counts)
        rank = (np.arange(len(rows_u)) - np.repeat(np.cumsum(counts) - counts, counts) + 1).astype(np.int32)
        it = items[valid]
        sc = scores[valid]
    return pa.Table.from_arrays(
        [user_ids.take(pa.array(rows_u)), pa.array(rank), item_vocab.take(pa.array(it)),
         pa.array(sc, pa.float32(), mask=np.isnan(sc))],
        schema=schema,
    )


def _write_topk(writer: bio.TopNWriter, user_ids: pa.Array, res, item_vocab: pa.Array) -> None:
    """Write a GridScorer.topk result for `user_ids` (kept for other engines)."""
    writer.write_table(_rows_table(writer.schema, user_ids, res.items, res.scores, item_vocab))
