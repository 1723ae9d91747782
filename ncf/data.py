"""Reading interaction files into contiguous indices plus raw-id vocabularies.

Accepted: CSV, TSV, Parquet, MovieLens `u.data` (tab, no header) and `ratings.dat`
(`::`, no header). Every row is a positive interaction; duplicate (user, item) pairs
count once (keeping the latest timestamp). Raw ids keep their type: integers stay
Int64, strings stay String. Vocabularies are the sorted unique raw ids, so indices do
not depend on the order of input rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ncf.errors import NcfError

# Column spellings, compared after lower-casing and dropping "_", "-" and spaces.
USER_NAMES = ("userid", "user", "uid", "users", "customerid", "customer", "visitorid", "reviewerid")
ITEM_NAMES = ("itemid", "item", "iid", "movieid", "movie", "productid", "product", "asin",
              "trackid", "track", "bookid", "isbn", "articleid", "items")
RATING_NAMES = ("rating", "ratings", "score", "stars", "value", "weight", "count", "playcount")
TIME_NAMES = ("timestamp", "ts", "time", "datetime", "date", "unixtime", "eventtime")
POSITIONAL = ("user", "item", "rating", "timestamp")  # MovieLens order for header-less files


@dataclass
class Interactions:
    """Unique (user, item) positives as indices into `user_ids` / `item_ids`."""

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    timestamps: np.ndarray | None  # int64 or None when the input has no time column
    user_ids: pl.Series  # raw ids, index = user index
    item_ids: pl.Series
    source: str = ""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.users)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_- ")


def _find(columns: list[str], names: tuple[str, ...], given: str | None, what: str) -> str | None:
    if given:
        if given not in columns:
            raise NcfError(f"column {given!r} for {what} not found; the file has {columns}")
        return given
    by_norm = {_norm(c): c for c in columns}
    for n in names:
        if n in by_norm:
            return by_norm[n]
    return None


def _sniff_separator(first_line: str) -> str:
    for sep in ("::", "\t", ",", ";", "|"):
        if sep in first_line:
            return sep
    if " " in first_line.strip():
        return " "
    return ","


def _sep_name(sep: str) -> str:
    return {"\t": "tabs", " ": "spaces", "::": "'::'"}.get(sep, repr(sep))


def _looks_like_header(fields: list[str]) -> bool:
    """A first line with no numeric field is a header; `196\t242\t3\t881250949` is not."""
    def numeric(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    return not any(numeric(f.strip().strip('"')) for f in fields if f.strip())


def read_table(path: Path) -> pl.DataFrame:
    """Read any supported file into a DataFrame with its own (or positional) column names."""
    path = Path(path)
    if not path.exists():
        raise NcfError(f"input file {path} not found")
    if path.is_dir():
        raise NcfError(f"{path} is a directory; give an interactions file (CSV, TSV, Parquet, u.data, ratings.dat)")
    if path.stat().st_size == 0:
        raise NcfError(f"input file {path} is empty")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            return pl.read_parquet(path)
        except Exception as exc:
            raise NcfError(f"cannot read Parquet file {path}: {_first_line(exc)}") from exc
    return _read_text(path)


def _read_text(path: Path) -> pl.DataFrame:
    raw = path.read_bytes()
    try:
        text_head = raw[:65536].decode("utf-8")
    except UnicodeDecodeError:
        text_head = raw[:65536].decode("latin-1")
    first = next((ln for ln in text_head.splitlines() if ln.strip()), "")
    if not first:
        raise NcfError(f"input file {path} has no rows")
    sep = _sniff_separator(first)
    has_header = _looks_like_header(first.split() if sep == " " else first.split(sep))
    if has_header:
        lines = [ln for ln in text_head.splitlines()[:50] if ln.strip()]
        row = lines[1] if len(lines) > 1 else ""
        if row and sep != " " and sep not in row and _sniff_separator(row) != sep:
            raise NcfError(
                f"{path}: the header is separated by {_sep_name(sep)} but the rows by {_sep_name(_sniff_separator(row))}; "
                "use one separator throughout"
            )
    if sep in ("::", " "):
        # polars takes a one-byte separator: map the multi-byte / whitespace one to a tab
        raw = b"\n".join(b"\t".join(line.split(sep.encode()) if sep == "::" else line.split())
                         for line in raw.splitlines())
        sep = "\t"
    try:
        df = pl.read_csv(
            io.BytesIO(raw),
            separator=sep,
            has_header=has_header,
            infer_schema_length=100_000,
            encoding="utf8-lossy",
            truncate_ragged_lines=False,
        )
    except Exception as exc:
        raise NcfError(f"cannot parse {path}: {_first_line(exc)}") from exc
    if not has_header:
        df.columns = [POSITIONAL[i] if i < len(POSITIONAL) else f"column_{i}" for i in range(df.width)]
    return df


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _id_column(df: pl.DataFrame, col: str, what: str, path: Path, text: bool = False) -> pl.Series:
    s = df[col]
    if s.null_count():
        raise NcfError(f"{path}: {s.null_count()} rows have an empty {what} id in column {col!r}")
    if s.dtype.is_integer():
        try:
            return s.cast(pl.Int64, strict=True)
        except Exception as exc:
            raise NcfError(
                f"{path}: {what} ids in column {col!r} do not fit in 64-bit integers (largest {s.max()}); "
                "store them as strings (a Parquet string column)"
            ) from exc
    if s.dtype == pl.String:
        if text:
            _check_not_mixed(s, col, what, path)
        return s
    if s.dtype.is_float():
        if (s != s.floor()).any():
            raise NcfError(f"{path}: {what} ids in column {col!r} are fractional numbers; ids must be integers or strings")
        return s.cast(pl.Int64)
    if s.dtype == pl.Categorical:
        return s.cast(pl.String)
    raise NcfError(f"{path}: {what} ids in column {col!r} have type {s.dtype}; ids must be integers or strings")


_MISSING = ("nan", "na", "n/a", "null", "none", "-", "?")


def _check_not_mixed(s: pl.Series, col: str, what: str, path: Path) -> None:
    """In a text file, a mostly numeric id column with a few other values (``nan``, ``NA``,
    ``-``, a stray header) is damaged input: reading it as strings would silently change
    the type of every id. A mostly non-numeric column is taken as string ids."""
    missing = s.str.strip_chars().str.to_lowercase().is_in(list(_MISSING))
    if missing.any():
        raise NcfError(
            f"{path}: {int(missing.sum()):,} rows have a missing {what} id ({s.filter(missing)[0]!r}) in column "
            f"{col!r}; drop them first"
        )
    num = s.str.strip_chars().cast(pl.Float64, strict=False)
    numeric = num.is_not_null() & num.is_finite()
    n_num = int(numeric.sum())
    n_other = len(s) - n_num
    if n_num and n_other and n_other < n_num:
        example = s.filter(~numeric)[0]
        raise NcfError(
            f"{path}: {what} ids in column {col!r} mix numbers with {n_other:,} other value(s) such as {example!r}; "
            "fix or drop those rows (to use string ids, write the column as strings in Parquet)"
        )


def _timestamp_column(df: pl.DataFrame, col: str, path: Path) -> pl.Series:
    s = df[col]
    if s.dtype.is_temporal():
        return s.cast(pl.Datetime("us")).cast(pl.Int64)
    if s.dtype == pl.String:
        parsed = s.str.to_datetime(strict=False)
        if parsed.null_count() > s.null_count():
            raise NcfError(f"{path}: column {col!r} holds timestamps that cannot be parsed")
        return parsed.cast(pl.Datetime("us")).cast(pl.Int64)
    if s.dtype.is_numeric():
        return s.cast(pl.Int64)
    raise NcfError(f"{path}: timestamp column {col!r} has unsupported type {s.dtype}")


def load_interactions(
    path: Path,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    time_col: str | None = None,
    min_rating: float | None = None,
) -> Interactions:
    path = Path(path)
    df = read_table(path)
    if df.height == 0:
        raise NcfError(f"input file {path} has a header but no rows")
    cols = df.columns
    ucol = _find(cols, USER_NAMES, user_col, "users")
    icol = _find(cols, ITEM_NAMES, item_col, "items")
    if ucol is None or icol is None:
        raise NcfError(
            f"{path}: no recognisable user/item columns in {cols}; name them user_id and item_id "
            "or pass --user-col / --item-col"
        )
    rcol = _find(cols, RATING_NAMES, rating_col, "ratings")
    tcol = _find(cols, TIME_NAMES, time_col, "timestamps")

    text = path.suffix.lower() not in (".parquet", ".pq")
    frame = pl.DataFrame({"user": _id_column(df, ucol, "user", path, text),
                          "item": _id_column(df, icol, "item", path, text)})
    if tcol is not None:
        frame = frame.with_columns(ts=_timestamp_column(df, tcol, path))
    if min_rating is not None:
        if rcol is None:
            raise NcfError(f"{path}: --min-rating given but no rating column found in {cols}")
        rating = df[rcol]
        if not rating.dtype.is_numeric():
            raise NcfError(f"{path}: rating column {rcol!r} is not numeric")
        frame = frame.filter(rating >= min_rating)
        if frame.height == 0:
            raise NcfError(f"{path}: no rows have a rating >= {min_rating}")
    return index_interactions(frame, source=str(path))


def index_interactions(frame: pl.DataFrame, source: str = "") -> Interactions:
    """Columns user, item and optionally ts -> unique pairs with sorted-vocabulary indices."""
    has_ts = "ts" in frame.columns
    if has_ts:
        frame = frame.group_by("user", "item").agg(pl.col("ts").max())
    else:
        frame = frame.unique(["user", "item"])
    user_ids = frame["user"].unique().sort()
    item_ids = frame["item"].unique().sort()
    frame = frame.with_columns(
        uidx=_positions(frame["user"], user_ids),
        iidx=_positions(frame["item"], item_ids),
    ).sort("uidx", "iidx")
    return Interactions(
        users=frame["uidx"].to_numpy().astype(np.int64),
        items=frame["iidx"].to_numpy().astype(np.int64),
        timestamps=frame["ts"].to_numpy().astype(np.int64) if has_ts else None,
        user_ids=user_ids.rename("user_id"),
        item_ids=item_ids.rename("item_id"),
        source=source,
    )


def _positions(values: pl.Series, sorted_vocab: pl.Series) -> pl.Series:
    return sorted_vocab.search_sorted(values, side="left").cast(pl.Int64)
