"""The metadata that makes an exported `model.onnx` self-contained (torch-free).

Both graphs written by `ncf export` carry ONNX `metadata_props` (string key -> string value),
which ONNX Runtime hands back through `session.get_modelmeta().custom_metadata_map`, so the
scorer never parses the file a second time:

  ncf.producer        "ncf"                        marks a file made by this tool
  ncf.format_version  "1"                          bumped on any incompatible change
  ncf.graph           "grid" | "pair"              which of the two graphs this file holds
  ncf.kind            gmf | mlp | neumf | fused
  ncf.n_users, ncf.n_items, ncf.factors, ncf.layers (JSON list), ncf.activation
  ncf.opset           the pinned ONNX opset
  ncf.vocab_hash      sha256 over the canonical bytes of both vocabularies (see vocab_hash)
  ncf.users           base64(Arrow IPC stream, zstd): user_id, row = user index, raw type
  ncf.items           base64(Arrow IPC stream, zstd): item_id (raw type), popularity (int64:
                      interactions in the training input), row = item index
  ncf.seen            grid graph only. base64(Arrow IPC, zstd): one row per user index, column
                      items: large_list<int32> of the item indices the user has in the training
                      input (sorted, unique); a list array is exactly CSR (offsets + values).

Arrow IPC keeps the raw id type (int64 stays int64, strings stay strings) and decodes
without copies; zstd keeps the file small; base64 makes it a valid protobuf string.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ncf.errors import NcfError

PRODUCER = "ncf"
FORMAT_VERSION = 1
OPSET = 18
PREFIX = "ncf."

# Graph interface of the grid graph (what `ncf score` runs).
GRID_INPUTS = ("users", "k", "exclude")
GRID_OUTPUTS = ("score", "logit", "position")
# Graph interface of the per-pair graph (for serving elsewhere).
PAIR_INPUTS = ("user", "item")
PAIR_OUTPUTS = ("score", "logit")


@dataclass
class ModelMeta:
    graph: str
    kind: str
    n_users: int
    n_items: int
    factors: int
    layers: list[int]
    activation: str
    opset: int
    vocab_hash: str
    user_ids: pa.Array
    item_ids: pa.Array
    popularity: np.ndarray  # int64 [n_items]
    seen_indptr: np.ndarray | None = None  # int64 [n_users + 1]
    seen_items: np.ndarray | None = None  # int32 [n_interactions]
    extra: dict = field(default_factory=dict)


def normalise_ids(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One canonical Arrow type per id kind: large strings become plain strings (what Spark
    and DuckDB read everywhere); integers keep their width; nothing else is accepted."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    t = ids.type
    if pa.types.is_dictionary(t):
        ids = ids.cast(t.value_type)
        t = ids.type
    if pa.types.is_large_string(t) or pa.types.is_string(t):
        return ids.cast(pa.string()) if ids.nbytes < 2**31 - 1 else ids
    if pa.types.is_integer(t):
        return ids
    raise NcfError(f"ids of type {t} are not supported: use integer or string ids")


def vocab_hash(user_ids: pa.Array, item_ids: pa.Array) -> str:
    """sha256 over a canonical encoding that does not depend on the Arrow version:
    per vocabulary its kind, length and either the little-endian int64 values or the
    UTF-8 lengths followed by the concatenated UTF-8 bytes."""
    h = hashlib.sha256()
    for name, ids in (("users", user_ids), ("items", item_ids)):
        ids = normalise_ids(ids)
        if pa.types.is_integer(ids.type):
            vals = ids.to_numpy(zero_copy_only=False).astype("<i8")
            h.update(f"{name}:int:{len(vals)}:".encode())
            h.update(vals.tobytes())
        else:
            encoded = [s.encode("utf-8") for s in ids.to_pylist()]
            h.update(f"{name}:str:{len(encoded)}:".encode())
            h.update(np.fromiter((len(e) for e in encoded), "<i8", len(encoded)).tobytes())
            h.update(b"".join(encoded))
    return h.hexdigest()


def _ipc_b64(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def _ipc_table(text: str) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(base64.b64decode(text))).read_all()


def seen_csr(n_users: int, seen_users: np.ndarray, seen_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, sorted unique item indices int32) of the seen interactions."""
    u = np.asarray(seen_users, np.int64)
    i = np.asarray(seen_items, np.int64)
    if len(u) != len(i):
        raise NcfError("seen users and items have different lengths")
    if len(u) and (u.min() < 0 or u.max() >= n_users):
        raise NcfError("seen interactions refer to user indices outside the vocabulary")
    key = np.unique(u * (2**31) + i)  # sorted by user then item, duplicates dropped
    users, items = key >> 31, (key & (2**31 - 1)).astype(np.int32)
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return indptr, items


def encode_metadata(
    *,
    graph: str,
    kind: str,
    n_users: int,
    n_items: int,
    factors: int,
    layers: list[int],
    activation: str,
    user_ids: pa.Array,
    item_ids: pa.Array,
    seen_users: np.ndarray,
    seen_items: np.ndarray,
    include_seen: bool,
    extra: dict | None = None,
) -> dict[str, str]:
    user_ids, item_ids = normalise_ids(user_ids), normalise_ids(item_ids)
    if (len(user_ids), len(item_ids)) != (n_users, n_items):
        raise NcfError("vocabulary sizes do not match the model")
    seen_items = np.asarray(seen_items)
    if len(seen_items) and (seen_items.min() < 0 or seen_items.max() >= n_items):
        raise NcfError("seen interactions refer to item indices outside the vocabulary")
    popularity = np.bincount(np.asarray(seen_items, np.int64), minlength=n_items).astype(np.int64)
    meta = {
        "producer": PRODUCER,
        "format_version": str(FORMAT_VERSION),
        "graph": graph,
        "kind": kind,
        "n_users": str(n_users),
        "n_items": str(n_items),
        "factors": str(factors),
        "layers": json.dumps([int(x) for x in layers]),
        "activation": activation,
        "opset": str(OPSET),
        "vocab_hash": vocab_hash(user_ids, item_ids),
        "users": _ipc_b64(pa.table({"user_id": user_ids})),
        "items": _ipc_b64(pa.table({"item_id": item_ids, "popularity": pa.array(popularity)})),
    }
    if include_seen:
        indptr, items = seen_csr(n_users, seen_users, seen_items)
        seen = pa.LargeListArray.from_arrays(pa.array(indptr), pa.array(items, pa.int32()))
        meta["seen"] = _ipc_b64(pa.table({"items": seen}))
    for key, value in (extra or {}).items():
        meta[key] = str(value)
    return {PREFIX + k: v for k, v in meta.items()}


def decode_metadata(props: dict[str, str], *, source: str, expect_graph: str | None = None) -> ModelMeta:
    """Read back what encode_metadata wrote; NcfError for anything not made by this tool,
    made by another format version, of the wrong graph, or internally inconsistent."""
    m = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    if m.get("producer") != PRODUCER:
        raise NcfError(f"{source} is an ONNX model but not one written by `ncf export` (no ncf metadata); export one with `ncf export`")
    if m.get("format_version") != str(FORMAT_VERSION):
        raise NcfError(
            f"{source} has ncf format version {m.get('format_version')}, this ncf reads {FORMAT_VERSION}; re-export it with `ncf export`"
        )
    graph = m.get("graph")
    if expect_graph and graph != expect_graph:
        hint = " (the per-pair graph, model.pair.onnx, is for serving elsewhere; `ncf score` reads the grid graph, model.onnx)" if graph == "pair" else ""
        raise NcfError(f"{source} holds the {graph!r} graph, expected the {expect_graph!r} graph{hint}")
    try:
        users = _ipc_table(m["users"]).column("user_id").combine_chunks()
        items_t = _ipc_table(m["items"])
        items = items_t.column("item_id").combine_chunks()
        popularity = items_t.column("popularity").to_numpy().astype(np.int64)
        indptr = seen_items = None
        if "seen" in m:
            seen = _ipc_table(m["seen"]).column("items").combine_chunks()
            indptr = seen.offsets.to_numpy().astype(np.int64)
            seen_items = seen.values.to_numpy().astype(np.int32)
        meta = ModelMeta(
            graph=graph,
            kind=m["kind"],
            n_users=int(m["n_users"]),
            n_items=int(m["n_items"]),
            factors=int(m["factors"]),
            layers=json.loads(m["layers"]),
            activation=m["activation"],
            opset=int(m["opset"]),
            vocab_hash=m["vocab_hash"],
            user_ids=users,
            item_ids=items,
            popularity=popularity,
            seen_indptr=indptr,
            seen_items=seen_items,
            extra={k: v for k, v in m.items() if k not in _KNOWN},
        )
    except NcfError:
        raise
    except Exception as exc:  # truncated or hand-edited metadata: one line
        raise NcfError(f"{source}: ncf metadata is damaged ({type(exc).__name__}: {exc}); re-export the model") from exc
    if (len(meta.user_ids), len(meta.item_ids)) != (meta.n_users, meta.n_items) or len(popularity) != meta.n_items:
        raise NcfError(f"{source}: vocabulary sizes in the metadata do not match the model; re-export it")
    if indptr is not None and (
        len(indptr) != meta.n_users + 1
        or indptr[-1] != len(seen_items)
        or (len(seen_items) and (seen_items.min() < 0 or seen_items.max() >= meta.n_items))
    ):
        raise NcfError(f"{source}: seen-item table does not match the model; re-export it")
    if vocab_hash(meta.user_ids, meta.item_ids) != meta.vocab_hash:
        raise NcfError(f"{source}: vocabulary hash mismatch (the metadata was altered); re-export the model")
    return meta


_KNOWN = {
    "producer", "format_version", "graph", "kind", "n_users", "n_items", "factors", "layers",
    "activation", "opset", "vocab_hash", "users", "items", "seen",
}
