"""GridScorer: one ONNX Runtime session on the grid graph of `model.onnx`, plus the
vocabularies, seen items and popularity that the file carries. Torch-free.

The same class serves the local `ncf score` path and one actor of a distributed path
(build it from the model bytes with `GridScorer.from_bytes`).

Execution:
* CPU: the graph with its ReLU tower and its masked top-k as custom operators where the
  operator library can be built (`batch.fused`), else the plain graph; one session with
  intra-op threads = 1, run concurrently from `threads` Python threads (ONNX Runtime releases
  the GIL), each on its own chunk of `chunk_users` users against all candidates. Running whole
  chunks in parallel avoids the per-operator fork/join of intra-op threading, which was
  measured to cost more than it gives on these small operators. The plain graph wants small
  chunks that keep its [B, L1, N] intermediates near the cache; the fused one larger chunks.
* CUDA: one session, larger chunks, I/O binding: the item tables stay on the device (an
  OrtValue made once), inputs are tiny and the outputs are bound to host memory because only
  B x k values leave.
Chunk shapes are steady: the last chunk is padded with user 0 and the excluded pairs are
padded (with a repeated pair) to a power-of-two count, so ONNX Runtime sees a handful of
shapes and its memory does not grow with new ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch import modelfile as mf
from batch.fused import fused_session
from ncf.cpus import cpu_count
from ncf.errors import NcfError

DEVICES = ("auto", "cpu", "cuda")
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_PAIRS_PER_CHUNK = 24_576  # plain graph, measured on a 2-core EPYC: 6-9 users x 3,706 items, 1-2 x 20,000 best
# fused graph: its tower intermediates stay in registers, so larger calls only spread the per-call
# cost thinner (2-core EPYC, 2 threads: 8 -> 64 users x 3,706 items +11%, 1 -> 8 x 20,000 +46%)
FUSED_PAIRS_PER_CHUNK = 1 << 17
CUDA_PAIRS_PER_CHUNK = 1 << 22


@dataclass
class TopK:
    """Per user row: `items` item indices (-1 where fewer than k candidates were left after
    masking), `scores` probabilities (NaN there), `logits`, `counts` valid entries per row."""

    items: np.ndarray  # int64 [n, k]
    scores: np.ndarray  # float32 [n, k]
    logits: np.ndarray  # float32 [n, k]
    counts: np.ndarray  # int64 [n]


def _ort():
    import onnxruntime as ort

    return ort


def make_session(data: bytes, device: str, *, intra_threads: int = 1, source: str = "model"):
    """(session, provider, note). `cuda` raises NcfError unless the CUDA provider really
    attached (ONNX Runtime falls back to CPU silently: only get_providers() tells);
    `auto` tries CUDA when this onnxruntime build has it and says what ran."""
    if device not in DEVICES:
        raise NcfError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = intra_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def create(providers):
        try:
            return ort.InferenceSession(data, so, providers=providers)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NcfError(f"cannot load {source} with ONNX Runtime: {msg}") from exc

    available = ort.get_available_providers()
    note = ""
    if device in ("cuda", "auto"):
        if CUDA_EP in available:
            with _captured_stderr() as captured:  # ORT logs why CUDA failed; keep it for our one line
                sess = create([CUDA_EP, CPU_EP])
            if sess.get_providers()[0] == CUDA_EP:
                return sess, CUDA_EP, "CUDA provider attached"
            reason = _cuda_reason(captured.text())
            note = f"CUDA provider did not attach ({reason})"
            if device == "cuda":
                raise NcfError(
                    f"--device cuda: the CUDA provider did not attach ({reason}); ONNX Runtime would silently "
                    f"run on CPU instead. Use --device cpu or auto, or install what onnxruntime-gpu needs"
                )
            return sess, CPU_EP, note + "; ran on CPU"
        note = "this onnxruntime build has no CUDA provider"
        if device == "cuda":
            raise NcfError(
                f"--device cuda: {note} (available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        note += "; ran on CPU"
    sess = create([CPU_EP])
    return sess, CPU_EP, note or "CPU requested"


class _captured_stderr:
    """Redirect file descriptor 2 (where ONNX Runtime's C++ logger writes) to a temporary
    file for the duration of a session creation."""

    def __enter__(self):
        import tempfile

        self._file = tempfile.TemporaryFile(mode="w+b")
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: just do not capture
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False

    def text(self) -> str:
        self._file.seek(0)
        data = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return data


def _cuda_reason(log: str) -> str:
    """The useful part of ONNX Runtime's complaint, e.g. the missing library."""
    import re

    m = re.search(r"error: ([^\n\x1b]*?cannot open shared object file)", log)
    if m:
        return "missing library: " + m.group(1).split(":")[0].strip()
    m = re.search(r"Require ([^\n\x1b.]*)", log)
    if m:
        return "needs " + m.group(1).strip()
    return "no GPU, or the CUDA/cuDNN libraries are missing"


def _open_session(data: bytes, device: str, *, fuse: bool, source: str):
    """(session, provider, device note, kernel note, fused): on CPU the fused graph where it
    can run (`batch.fused`), else the plain graph of `make_session`."""
    note = "plain graph (fusion not requested)"
    if fuse and device == "cpu":  # certain to run on CPU: no plain session to build first
        session, note = fused_session(data, source=source)
        if session is not None:
            return session, CPU_EP, "CPU requested", note, True
    session, provider, device_note = make_session(data, device, intra_threads=1, source=source)
    if provider != CPU_EP:
        return session, provider, device_note, "plain graph on CUDA", False
    if fuse and device != "cpu":  # auto that ended on CPU: try the fused graph now,
        del session  # without holding the plain session's memory meanwhile
        fused, note = fused_session(data, source=source)
        if fused is not None:
            return fused, CPU_EP, device_note, note, True
        session = make_session(data, "cpu", intra_threads=1, source=source)[0]
    return session, provider, device_note, note, False


def _bucket(n: int) -> int:
    return 0 if n == 0 else max(16, 1 << (n - 1).bit_length())


def read_model_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise NcfError(f"model file {path} not found; create it with `ncf export`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NcfError(f"cannot read model file {path}: {exc}") from exc


class VocabLookup:
    """Raw ids -> vocabulary positions (-1 if absent), with the search structure built once:
    `pc.index_in` hashes the whole vocabulary on every call, which for blocks of a few hundred
    users against 100,000 known ones cost 7% of a scoring run."""

    def __init__(self, vocab: pa.Array):
        self.numeric = pa.types.is_integer(vocab.type)
        if self.numeric:
            keys = vocab.to_numpy(zero_copy_only=False).astype(np.int64)
            self.order = np.argsort(keys, kind="stable")
            self.keys = keys[self.order]
        else:
            self.positions = {v: i for i, v in enumerate(vocab.to_pylist())}

    def __call__(self, ids: pa.Array) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        if not self.numeric:
            get = self.positions.get
            return np.fromiter((get(v, -1) for v in ids.to_pylist()), np.int64, len(ids))
        out = np.full(len(ids), -1, np.int64)
        if len(self.keys) == 0:
            return out
        q = (ids.fill_null(0) if ids.null_count else ids).to_numpy(zero_copy_only=False).astype(np.int64)
        at = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        hit = self.keys[at] == q
        if ids.null_count:
            hit &= ids.is_valid().to_numpy(zero_copy_only=False)
        out[hit] = self.order[at[hit]]
        return out


class GridScorer:
    """Top-k of a batch of user indices against the candidate items, on the grid graph."""

    def __init__(
        self,
        model: bytes | str | Path,
        *,
        device: str = "auto",
        threads: int | None = None,
        chunk_users: int | None = None,
        source: str | None = None,
        fuse: bool = True,
    ):
        if isinstance(model, (str, Path)):
            source = source or str(model)
            data = read_model_bytes(Path(model))
        else:
            data = bytes(model)
            source = source or "model bytes"
        self.source = source
        (self.session, self.provider, self.device_note, self.kernel_note, self.fused) = _open_session(
            data, device, fuse=fuse, source=source)
        try:
            props = self.session.get_modelmeta().custom_metadata_map
        except Exception as exc:  # pragma: no cover - ORT always has a meta object
            raise NcfError(f"{source}: cannot read ONNX metadata: {exc}") from exc
        self.meta = mf.decode_metadata(props, source=source, expect_graph="grid")
        names_in = {i.name for i in self.session.get_inputs()}
        names_out = {o.name for o in self.session.get_outputs()}
        if not set(mf.GRID_INPUTS) <= names_in or not set(mf.GRID_OUTPUTS) <= names_out:
            raise NcfError(f"{source}: the grid graph lacks the expected inputs/outputs; re-export it")
        if self.meta.seen_indptr is None:
            raise NcfError(f"{source}: the grid graph carries no seen-item table; re-export it")
        self.item_table_names = [i.name for i in self.session.get_overridable_initializers() if i.name.startswith("item_")]
        self._data = data if not isinstance(model, (str, Path)) else None
        self._path = Path(model) if isinstance(model, (str, Path)) else None
        self.cuda = self.provider == CUDA_EP
        self.threads = 1 if self.cuda else max(1, threads or cpu_count())
        self._chunk_override = chunk_users
        self._pool: ThreadPoolExecutor | None = None
        self._user_lookup: VocabLookup | None = None
        self.set_candidates(None)

    @classmethod
    def from_bytes(cls, data: bytes, **kwargs) -> GridScorer:
        return cls(data, **kwargs)

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> GridScorer:
        return cls(Path(path), **kwargs)

    # ------------------------------------------------------------------ vocabularies
    @property
    def n_users(self) -> int:
        return self.meta.n_users

    @property
    def n_items(self) -> int:
        return self.meta.n_items

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def user_ids(self) -> pa.Array:
        return self.meta.user_ids

    @property
    def item_ids(self) -> pa.Array:
        return self.meta.item_ids

    def user_index(self, ids: pa.Array) -> np.ndarray:
        """Raw user ids (already of the vocabulary's type) -> user indices, -1 if unknown."""
        if self._user_lookup is None:
            self._user_lookup = VocabLookup(self.meta.user_ids)
        return self._user_lookup(ids)

    def item_index(self, ids: pa.Array) -> np.ndarray:
        return VocabLookup(self.meta.item_ids)(ids)

    def seen_items(self, user: int) -> np.ndarray:
        a, b = self.meta.seen_indptr[user], self.meta.seen_indptr[user + 1]
        return self.meta.seen_items[a:b]

    # ------------------------------------------------------------------ candidates
    def set_candidates(self, items: np.ndarray | None) -> None:
        """Restrict scoring to these item indices (None: every item). Stored sorted and
        unique, so positions in the candidate list follow item index order (tie order)."""
        self._feeds_tables: dict = {}
        self._ort_tables: dict = {}
        if items is None:
            self.candidates = None
            self.n_candidates = self.n_items
            self._pos_of_item = None
        else:
            items = np.unique(np.asarray(items, np.int64))
            if len(items) == 0:
                raise NcfError("the candidate item set is empty")
            if items[0] < 0 or items[-1] >= self.n_items:
                raise NcfError("candidate item indices outside the model's vocabulary")
            self.candidates = items
            self.n_candidates = len(items)
            self._pos_of_item = np.full(self.n_items, -1, np.int64)
            self._pos_of_item[items] = np.arange(len(items))
            if len(items) < self.n_items:
                self._feeds_tables = {n: np.ascontiguousarray(t[..., items]) for n, t in self._item_tables().items()}
            else:
                self.candidates, self._pos_of_item = None, None
        if self.cuda and self._feeds_tables:
            ort = _ort()
            self._ort_tables = {n: ort.OrtValue.ortvalue_from_numpy(t, "cuda", 0) for n, t in self._feeds_tables.items()}
        pairs = CUDA_PAIRS_PER_CHUNK if self.cuda else FUSED_PAIRS_PER_CHUNK if self.fused else CPU_PAIRS_PER_CHUNK
        self.chunk_users = int(self._chunk_override or max(1, min(4096, round(pairs / self.n_candidates))))
        self._popular = None

    def _item_tables(self) -> dict[str, np.ndarray]:
        """The full item-side tables (initializers whose last axis is the item), read from the
        model once, only when candidates are restricted (the session does not expose them)."""
        import onnx
        from onnx import numpy_helper

        data = self._data if self._data is not None else self._path.read_bytes()
        graph = onnx.load_from_string(data).graph
        tables = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in self.item_table_names}
        if set(tables) != set(self.item_table_names):
            raise NcfError(f"{self.source}: item tables missing from the grid graph; re-export it")
        return tables

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular candidates (interactions in the training input; ties by item
        index ascending): (item indices, counts)."""
        if self._popular is None:
            cand = self.candidates if self.candidates is not None else np.arange(self.n_items)
            pop = self.meta.popularity[cand]
            order = np.lexsort((cand, -pop))
            self._popular = (cand[order], pop[order])
        return self._popular[0][:k], self._popular[1][:k]

    # ------------------------------------------------------------------ scoring
    def _feed(self, users: np.ndarray, k: int, exclude: np.ndarray) -> dict:
        feed = {"users": users, "k": np.array([k], np.int64), "exclude": exclude}
        feed.update(self._feeds_tables)
        return feed

    def _exclusions(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, candidate position) of every seen item of `users`, sorted by row."""
        indptr, seen = self.meta.seen_indptr, self.meta.seen_items
        starts, lens = indptr[users], indptr[users + 1] - indptr[users]
        total = int(lens.sum())
        rows = np.repeat(np.arange(len(users), dtype=np.int64), lens)
        first = np.repeat(np.cumsum(lens) - lens, lens)
        pos = seen[np.repeat(starts, lens) + (np.arange(total, dtype=np.int64) - first)].astype(np.int64)
        if self._pos_of_item is not None:
            pos = self._pos_of_item[pos]
            keep = pos >= 0
            rows, pos = rows[keep], pos[keep]
        return rows, pos

    def _run(self, users: np.ndarray, k: int, exclude: np.ndarray):
        if not self.cuda:
            return self.session.run(list(mf.GRID_OUTPUTS), self._feed(users, k, exclude))
        io = self.session.io_binding()
        io.bind_cpu_input("users", users)
        io.bind_cpu_input("k", np.array([k], np.int64))
        io.bind_cpu_input("exclude", exclude)
        for name, value in self._ort_tables.items():
            io.bind_ortvalue_input(name, value)
        for name in mf.GRID_OUTPUTS:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def topk(self, users: np.ndarray, k: int, *, exclude_seen: bool = True) -> TopK:
        """Top-k candidates of each user index in `users` (any length: split into steady
        chunks of `chunk_users`, padded). Items in the user's training input are excluded
        unless exclude_seen=False; a user with fewer than k unexcluded candidates gets
        fewer valid entries (the rest: item -1, score NaN)."""
        return self.topk_start(users, k, exclude_seen=exclude_seen)()

    def topk_start(self, users: np.ndarray, k: int, *, exclude_seen: bool = True) -> Callable[[], TopK]:
        """`topk`, started on the worker threads: returns at once with a function that waits
        for the result, so that the caller can write the previous block meanwhile. Bad
        arguments raise here. With one thread the work is done before this returns."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        k = int(k)
        if k <= 0 or k > self.n_candidates:
            raise NcfError(f"k must be between 1 and the number of candidate items ({self.n_candidates}), got {k}")
        n = len(users)
        if n == 0:
            e = np.zeros((0, k))
            empty_result = TopK(e.astype(np.int64), e.astype(np.float32), e.astype(np.float32), np.zeros(0, np.int64))
            return lambda: empty_result
        if users.min() < 0 or users.max() >= self.n_users:  # never hand a bad index to a session
            raise NcfError(f"user indices must lie in [0, {self.n_users}); got {users.min()}..{users.max()}")
        b = self.chunk_users
        n_chunks = -(-n // b)
        padded = np.zeros(n_chunks * b, np.int64)
        padded[:n] = users
        if exclude_seen:
            rows, pos = self._exclusions(users)
            bounds = np.searchsorted(rows, np.arange(n_chunks + 1) * b)
        empty = np.zeros((0, 2), np.int64)
        results: list = [None] * n_chunks

        def one(c: int):
            ex = empty
            if exclude_seen and bounds[c + 1] > bounds[c]:
                lo, hi = bounds[c], bounds[c + 1]
                s = int(hi - lo)
                ex = np.empty((_bucket(s), 2), np.int64)
                ex[:s, 0] = rows[lo:hi] - c * b
                ex[:s, 1] = pos[lo:hi]
                ex[s:] = ex[0]  # padding repeats a pair: ScatterND writes the same -inf again
            results[c] = self._run(padded[c * b:(c + 1) * b], k, ex)

        if self.threads == 1 or n_chunks == 1:
            for c in range(n_chunks):
                one(c)
            return lambda: self._merge(results, n, k)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ncf-score")
        # one task per thread over every threads-th chunk: no future and no wake-up of the
        # calling thread per chunk (about 7% of the wall time with a task per chunk)
        share = min(self.threads, n_chunks)

        def worker(first: int) -> None:
            for c in range(first, n_chunks, share):
                one(c)

        tasks = [self._pool.submit(worker, t) for t in range(share)]

        def finish() -> TopK:
            for task in tasks:
                task.result()
            return self._merge(results, n, k)

        return finish

    def _merge(self, results: list, n: int, k: int) -> TopK:
        """The chunks' (score, logit, position) -> one TopK of the first n rows."""
        score = np.concatenate([r[0] for r in results])[:n]
        logit = np.concatenate([r[1] for r in results])[:n]
        position = np.concatenate([r[2] for r in results])[:n]
        # Deterministic order: logit descending, candidate position (= item index order)
        # ascending. ONNX TopK already guarantees this; re-sort only if a provider did not.
        if k > 1:
            ok = (logit[:, :-1] > logit[:, 1:]) | ((logit[:, :-1] == logit[:, 1:]) & (position[:, :-1] < position[:, 1:]))
            if not ok.all():
                order = np.lexsort((position, -logit), axis=-1)
                score, logit, position = (np.take_along_axis(a, order, 1) for a in (score, logit, position))
        valid = logit > -np.inf
        items = position if self.candidates is None else self.candidates[position]
        items = np.where(valid, items, -1)
        score = np.where(valid, score, np.float32(np.nan)).astype(np.float32)
        return TopK(items.astype(np.int64), score, logit, valid.sum(axis=1))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
