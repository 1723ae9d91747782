"""Parquet in and out for batch scoring (torch-free).

Input: a Parquet file, or a directory of Parquet parts, with an id column: `user_id`
(`item_id`) or a common spelling of it, or else the only column. Read in bounded batches.
Ids are cast to the model vocabulary's type only when that is lossless.

Output: `TopNWriter`, a streaming ParquetWriter with an explicit schema
  user_id (raw type, required) | rank int32 (required, 1..k) | item_id (raw type, required) |
  score float32 (nullable: null for popularity-fallback rows, see batch.score)
flushed in row groups of `row_group_rows` rows, written to a temporary name (default
`.<name>.tmp-<pid>` beside the target) and renamed into place on success; the temporary file
is removed on any failure.

`check_ids_upfront` validates a whole id input from the Parquet footers alone (no data read):
every file readable, the id column present with one type across the parts of a directory,
no nulls (from the row-group statistics, where the writer kept them; a null in a file
without statistics is still caught when its batch is read).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from ncf.errors import NcfError

ROW_GROUP_ROWS = 1 << 20
# Dictionary-encode only the repetitive columns: every user id repeats k times, items and
# ranks come from small sets; scores are nearly all distinct, and trying a dictionary on
# them made writing 3x slower and the file 30% larger (measured on 300k top-50 rows).
DICTIONARY_COLUMNS = ["user_id", "rank", "item_id"]
READ_BATCH_ROWS = 1 << 16

ID_SPELLINGS = {
    "user": ("user_id", "userid", "user", "uid", "users", "user_ids", "userids", "customer_id", "customerid"),
    "item": ("item_id", "itemid", "item", "iid", "items", "item_ids", "itemids", "movie_id", "movieid", "product_id", "productid"),
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def open_ids(path: Path, what: str, flag: str) -> tuple[ds.Dataset, str]:
    """(dataset, id column) for a Parquet file or directory of parts; NcfError if unreadable
    or without a usable id column."""
    path = Path(path)
    if not path.exists():
        raise NcfError(f"{what} file {path} not found ({flag})")
    try:
        dataset = ds.dataset(path, format="parquet")
        names = dataset.schema.names
        if path.is_dir() and not dataset.files:
            raise NcfError(f"{what} directory {path} holds no Parquet files ({flag})")
    except NcfError:
        raise
    except Exception as exc:
        raise NcfError(f"cannot read {what} file {path} as Parquet ({flag}): {_one_line(exc)}") from exc
    by_norm: dict[str, str] = {}
    for n in names:
        by_norm.setdefault(_norm(n), n)
    for spelling in ID_SPELLINGS[what]:
        if spelling in by_norm:
            return dataset, by_norm[spelling]
    if len(names) == 1:
        return dataset, names[0]
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    raise NcfError(
        f"{what} file {path} has no {what} id column (looked for {what}_id, {ID_SPELLINGS[what][1]}, {what}, ...; "
        f"columns: {shown or 'none'}); rename the id column to {what}_id ({flag})"
    )


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "floating-point"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)


def check_ids_upfront(dataset: ds.Dataset, column: str, path: Path, what: str, flag: str) -> int:
    """Footer-only validation of every file of an id input (see the module docstring);
    returns the number of rows. NcfError names the file and what to do."""
    want = dataset.schema.field(column).type
    total = 0
    first_file = None
    for frag in dataset.get_fragments():
        name = Path(frag.path).name if path.is_dir() else str(path)
        where = f"{path}/{name}" if path.is_dir() else str(path)
        try:
            md = frag.metadata
            phys = frag.physical_schema
        except Exception as exc:
            raise NcfError(f"cannot read {what} file {where} as Parquet ({flag}): {_one_line(exc)}; "
                           f"the file is damaged or truncated") from exc
        if column not in phys.names:
            raise NcfError(f"{what} file {where} has no column {column!r} (other parts of {path} have it) ({flag})")
        t = phys.field(column).type
        if _kind(t) != _kind(want):
            raise NcfError(
                f"{what} ids in {path} have more than one type: {column!r} is {want} in {first_file} but {t} in "
                f"{name}; write every part with the same id type ({flag})"
            )
        first_file = first_file or name
        paths = [md.schema.column(i).path for i in range(md.num_columns)]
        j = paths.index(column) if column in paths else None
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            total += rg.num_rows
            st = rg.column(j).statistics if j is not None else None
            if st is not None and st.has_null_count and st.null_count:
                raise NcfError(
                    f"{what} file {where}: column {column!r} has {st.null_count:,} null ids (row group {g}); "
                    f"drop those rows first ({flag})"
                )
    return total


def path_fingerprint(path: Path | None) -> list | None:
    """(name, size, mtime_ns) of a file or of every file under a directory: what a resumed
    run compares to know that its input did not change."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    return out


def check_id_type(t: pa.DataType, vocab_type: pa.DataType, path: Path, column: str, what: str) -> None:
    """Fail early, before any output exists, when the column cannot hold vocabulary ids."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    vocab_is_str = pa.types.is_string(vocab_type) or pa.types.is_large_string(vocab_type)
    col_is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
    col_is_num = pa.types.is_integer(t) or pa.types.is_floating(t)
    if vocab_is_str and not col_is_str:
        raise NcfError(
            f"{what} file {path}: column {column!r} is {t}, but the model's {what} ids are strings; "
            f"write the ids as strings (no silent conversion: 7 and '007' are different ids)"
        )
    if not vocab_is_str and not col_is_num:
        raise NcfError(f"{what} file {path}: column {column!r} is {t}, but the model's {what} ids are {vocab_type}")


def cast_ids(arr: pa.Array, vocab_type: pa.DataType, path: Path, column: str, what: str) -> pa.Array:
    """Cast a batch of raw ids to the vocabulary type, losslessly, else NcfError."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    check_id_type(arr.type, vocab_type, path, column, what)
    if arr.null_count:
        raise NcfError(f"{what} file {path}: column {column!r} has {arr.null_count} null ids in a batch; drop them first")
    if arr.type == vocab_type:
        return arr
    try:
        return arr.cast(vocab_type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise NcfError(
            f"{what} file {path}: column {column!r} ({arr.type}) cannot be converted to the model's id type "
            f"{vocab_type} without loss: {_one_line(exc)}"
        ) from exc


def iter_ids(dataset: ds.Dataset, column: str, batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.Array]:
    for batch in dataset.to_batches(columns=[column], batch_size=batch_rows, batch_readahead=2, fragment_readahead=1):
        if batch.num_rows:
            yield batch.column(0)


def read_all_ids(path: Path, what: str, flag: str, vocab_type: pa.DataType) -> pa.Array:
    """A whole (small) id file, e.g. the --items candidates."""
    dataset, column = open_ids(path, what, flag)
    check_id_type(dataset.schema.field(column).type, vocab_type, path, column, what)
    check_ids_upfront(dataset, column, Path(path), what, flag)
    try:
        parts = [cast_ids(a, vocab_type, path, column, what) for a in iter_ids(dataset, column)]
    except NcfError:
        raise
    except Exception as exc:
        raise NcfError(f"cannot read {what} file {path}: {_one_line(exc)}") from exc
    return pa.concat_arrays(parts) if parts else pa.array([], vocab_type)


def topn_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("user_id", user_type, nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("item_id", item_type, nullable=False),
            pa.field("score", pa.float32(), nullable=True),
        ]
    )


class TopNWriter:
    """Streams top-N rows into large row groups under a temporary name; `commit()` renames it
    into place; leaving the context without commit (an exception) removes it."""

    def __init__(self, out: Path, schema: pa.Schema, *, row_group_rows: int = ROW_GROUP_ROWS, compression: str = "snappy",
                 tmp: Path | None = None):
        self.out = Path(out)
        if self.out.exists() and self.out.is_dir():
            raise NcfError(f"output {self.out} is a directory; give a file name such as topn.parquet")
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.compression = compression
        # the temporary file must be on the target's file system (os.replace)
        self.tmp = Path(tmp) if tmp is not None else self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self.row_groups = 0
        self._writer = None
        self._done = False

    def __enter__(self):
        import pyarrow.parquet as pq

        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression=self.compression,
                                            use_dictionary=DICTIONARY_COLUMNS)
        except Exception as exc:
            self.tmp.unlink(missing_ok=True)
            raise NcfError(f"cannot write {self.out}: {_one_line(exc)}") from exc
        return self

    def write(self, user_ids: pa.Array, rank: np.ndarray, item_ids: pa.Array, score: np.ndarray | pa.Array) -> None:
        n = len(rank)
        if n == 0:
            return
        if not isinstance(score, pa.Array):
            score = np.asarray(score, np.float32)
            score = pa.array(score, pa.float32(), mask=np.isnan(score))
        table = pa.Table.from_arrays(
            [user_ids, pa.array(np.asarray(rank, np.int32)), item_ids, score], schema=self.schema
        )
        self._buf.append(table)
        self._buffered += n
        if self._buffered >= self.row_group_rows:
            self._flush()

    def write_table(self, table: pa.Table | pa.RecordBatch) -> None:
        """Rows already in the output schema (e.g. read back from a part file)."""
        if table.num_rows == 0:
            return
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._buf.append(table.cast(self.schema) if table.schema != self.schema else table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        """Write full row groups; the remainder waits for more rows unless `final`."""
        if not self._buffered or (not final and self._buffered < self.row_group_rows):
            return
        table = pa.concat_tables(self._buf)  # no combine_chunks: the writer takes chunked columns (no copy)
        self._buf, self._buffered = [], 0
        start = 0
        while table.num_rows - start >= self.row_group_rows or (final and start < table.num_rows):
            part = table.slice(start, self.row_group_rows)
            self._writer.write_table(part, row_group_size=part.num_rows)
            self.rows += part.num_rows
            self.row_groups += 1
            start += part.num_rows
        if start < table.num_rows:
            self._buf, self._buffered = [table.slice(start)], table.num_rows - start

    def commit(self) -> Path:
        self._flush(final=True)
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.out)
        self._done = True
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            if self._writer is not None:
                with contextlib.suppress(Exception):  # the failure that got us here matters more
                    self._writer.close()
            self.tmp.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
