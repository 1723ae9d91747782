"""`ncf export`: the trained model as two ONNX graphs, each verified against torch.

* The per-pair graph (`model.pair.onnx`): the classic NeuMF/GMF/MLP graph, inputs `user` and
  `item` (int64 [batch]), outputs `score` (sigmoid probability) and `logit` (float32 [batch]).
  It is produced by torch's own exporter, chosen explicitly: `torch.onnx.export(dynamo=True)`
  with `dynamic_shapes` for the batch dimension and `external_data=False` (so the weights stay
  inside the file). The TorchScript exporter is deprecated from torch 2.9 and its
  `dynamic_axes` path goes through a conversion; the dynamo exporter is the supported one and
  its graph (Gather, Mul, Concat, Gemm, Relu, Sigmoid) is what other runtimes expect.
  The example batch has 3 rows so the batch dimension cannot be specialised to 0 or 1.

* The grid graph (`model.onnx`, what `ncf score` runs) is built directly with `onnx.helper`
  because it is not the torch forward: it scores a batch of B users against N candidate items
  using exact identities computed here in float64 and cast once to float32:
    - first MLP layer split: W1 [p; q] + b1 = (W1_u p + b1) + W1_i q, so the user half U1
      (n_users x L1) and the item half I1 (n_items x L1) are tables; per pair only the add
      and the activation remain;
    - GMF as a matrix product: h_G . (p * q) = (h_G * p) . q; the per-user logit offset
      rides along as one more column, [h_G * p_u, offset_u] . [q_i; 1], so GMF and offset
      are one [B, 1, F+1] x [F+1, N] MatMul;
    - layout [B, L, N] (user, feature, candidate): a per-user term is [B, L, 1] and an item
      table [L, N], so every broadcast walks contiguous spans of N (a rows-first [B, N, L]
      layout was measured 3x slower for them: spans of L), and each tower layer is one MatMul
      W_j [L_j, L_{j-1}] x [B, L_{j-1}, N] with W broadcast over the users: no Reshape, Shape
      or Concat per call (about 15 nodes in all; fewer nodes and larger chunks measured
      ~13% faster on a 2-core EPYC than the earlier [L, B*N] layout with 30 nodes);
    - with ReLU, relu(z + c) = max(z, -c) + c moves every per-user term out of the pair loop:
      layer 1 is one broadcast Max(I1, -U1_u) (no separate Add and Relu), each further layer
      a bias-free MatMul W_j m and a broadcast Max with -c_j (c_j = W_j c_{j-1} + b_j, a user
      table), and hM . c_last + h_b is the per-user offset; measured ~10% faster per call
      than Add + Relu + Gemm(bias, ReLU);
    - otherwise (tanh, sigmoid) each layer is MatMul, Add of the bias [L, 1], activation;
    - already-seen items are masked by ScatterND of -inf at (row, candidate position) pairs,
      TopK (k is an input) runs on logits (the sigmoid saturates in float32, logits do not),
      and the sigmoid is applied to the B x k result only.
  ONNX TopK orders equal values by lower index first (opset >= 11), candidates are kept in
  ascending item index, so ties come out by item index ascending; the scorer re-sorts the
  B x k result the same way so a provider that breaks ties otherwise still gives that order.
  The item tables (`item_*`, shape [D, N]) are initializers that are also graph
  inputs: fed with a subset of columns they restrict the candidates without any per-chunk
  gather (a scorer cuts that subset once from the initializers).

Opset 18 is pinned for both graphs. Both files carry the metadata of `batch.modelfile`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from batch import modelfile as mf
from ncf.checkpoint import ModelDir, load_model_dir
from ncf.errors import NcfError
from ncf.models import NCFModel
from ncf.paths import check_writable_location

OPSET = mf.OPSET
IR_VERSION = 10
PROB_TOL = 1e-5  # max |p_onnx - p_torch| accepted at export time
LOGIT_RTOL = 1e-5  # max |l_onnx - l_torch| / max(1, |l_torch|)
VERIFY_BATCHES = (1, 7, 4097)
SUPPORTED_KINDS = ("gmf", "mlp", "neumf", "fused")

_ACT_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


# --------------------------------------------------------------------------- per-pair graph


class _PairWrapper(torch.nn.Module):
    def __init__(self, model: NCFModel):
        super().__init__()
        self.model = model

    def forward(self, user: torch.Tensor, item: torch.Tensor):
        # An index outside its vocabulary goes beyond every table, so that Gather rejects it:
        # in the stacked MLP table (users, then items) user n_users would otherwise read item
        # 0's row, and ONNX Gather wraps negative indices round to the other end.
        cfg = self.model.cfg
        beyond = cfg.n_users + cfg.n_items
        user = torch.where((user >= 0) & (user < cfg.n_users), user, beyond)
        item = torch.where((item >= 0) & (item < cfg.n_items), item, beyond)
        logit = self.model(user, item)
        return torch.sigmoid(logit), logit


def pair_graph(model: NCFModel) -> onnx.ModelProto:
    """The classic per-pair graph: user, item (int64 [batch]) -> score, logit (float32 [batch])."""
    model = model.eval()
    example = torch.tensor([0, 1, 0], dtype=torch.int64) % max(1, min(model.cfg.n_users, model.cfg.n_items))
    batch = torch.export.Dim("batch")
    quiet = logging.getLogger("torch")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _PairWrapper(model),
                (example, example.clone()),
                dynamo=True,
                input_names=list(mf.PAIR_INPUTS),
                output_names=list(mf.PAIR_OUTPUTS),
                dynamic_shapes={"user": {0: batch}, "item": {0: batch}},
                opset_version=OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as exc:
        raise NcfError(f"torch.onnx export of the {model.cfg.kind} model failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 1 or dims[0].dim_value:  # a fixed size here would freeze the batch
            raise NcfError(f"exported per-pair graph has a fixed shape for {vi.name}: {dims}")
        dims[0].dim_param = "batch"
    proto.producer_name = "ncf export (torch.onnx dynamo)"
    return proto


# --------------------------------------------------------------------------- grid graph


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _w(m: torch.nn.Module) -> np.ndarray:
    return _np(m.weight)


def _b(m: torch.nn.Module) -> np.ndarray:
    return m.bias.detach().cpu().double().numpy()


def grid_tables(model: NCFModel) -> dict:
    """The exact identities of the grid graph, computed in float64 from the torch weights."""
    cfg = model.cfg
    kind = cfg.kind
    if kind not in SUPPORTED_KINDS:
        raise NcfError(f"model kind {kind!r} cannot be exported; supported: {', '.join(SUPPORTED_KINDS)}")
    t: dict = {"kind": kind, "act": cfg.activation}
    h = _w(model.h)[0]
    t["hb"] = float(_b(model.h)[0])
    if kind in ("gmf", "neumf"):
        f = cfg.factors
        t["G"] = _w(model.user_gmf) * h[:f]  # h_G * p_u: GMF logit part = G_u . q_i
        t["QG"] = _w(model.item_gmf)
    if kind in ("mlp", "neumf"):
        half = cfg.layers[0] // 2
        lin = list(model.tower.linears)
        w1, b1 = _w(lin[0]), _b(lin[0])
        t["U1"] = _np(model.mlp_embedding.users) @ w1[:, :half].T + b1
        t["I1"] = _np(model.mlp_embedding.items) @ w1[:, half:].T
        t["tower"] = [(_w(m), _b(m)) for m in lin[1:]]
        t["hM"] = h[-cfg.layers[-1]:]
    if kind == "fused":
        f = cfg.factors
        w, b = _w(model.linear), _b(model.linear)
        p, q = _w(model.user_emb), _w(model.item_emb)
        t["P"], t["Q"] = p, q
        t["U1"] = p @ w[:, :f].T + b
        t["I1"] = q @ w[:, f:].T
        t["hM"] = h
    return t


class _G:
    """A tiny graph-building helper: named initializers and nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.item_tables: list[tuple[str, list]] = []
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(nh.from_array(np.ascontiguousarray(array), name))
        return name

    def item_table(self, name: str, array: np.ndarray) -> str:
        """An initializer that is also a graph input, so a caller may feed a candidate subset."""
        self.init(name, _f32(array))
        self.item_tables.append((name, list(array.shape[:-1]) + ["candidates"]))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self._n += 1
        out = out or f"{op.lower()}_{self._n}"
        self.nodes.append(oh.make_node(op, inputs, [out], name=f"{op}_{self._n}", **attrs))
        return out


def grid_graph(model: NCFModel) -> onnx.ModelProto:
    """The grid graph: users (int64 [B]), k (int64 [1]), exclude (int64 [S, 2] of (row,
    candidate position)) -> score, logit (float32 [B, k]), position (int64 [B, k]).
    Rows of `exclude` may repeat; padding with a repeated row is how callers keep S steady.
    Layout [B, L, N] (user, feature, candidate): see the module docstring."""
    t = grid_tables(model)
    g = _G()
    kind, act = t["kind"], _ACT_OPS[t["act"]]

    def per_user(table: np.ndarray, name: str) -> str:  # [n_users, D] -> [B, D, 1] of the chunk
        g.init(name, _f32(table[:, :, None]))
        return g.node("Gather", [name, "users"], axis=0)

    def tower(x: str, c: np.ndarray | None) -> tuple[str, np.ndarray | None]:
        """Layers 2.. of the MLP tower on [B, L, N], then h_M. With ReLU, `c` is the per-user
        constant of the max trick (x holds a - c) and the last one is returned; else x holds
        the activations and c is None. -> ([B, 1, N] logits part, c_last)"""
        for j, (w, b) in enumerate(t.get("tower", []), start=2):
            z = g.node("MatMul", [g.init(f"W{j}", _f32(w)), x])  # W broadcast over the users
            if c is not None:
                c = c @ w.T + b
                x = g.node("Max", [z, per_user(-c, f"user_c{j}")])
            else:
                x = g.node(act, [g.node("Add", [z, g.init(f"b{j}", _f32(b[:, None]))])])
        return g.node("MatMul", [g.init("hM", _f32(t["hM"][None, :])), x]), c  # [B, 1, N]

    offset = np.full(model.cfg.n_users, t["hb"])  # per-user logit offset
    part = None  # the [B, 1, N] logits of the MLP tower (or the fused layer)
    if kind in ("mlp", "neumf"):
        i1 = g.item_table("item_mlp", t["I1"].T)  # [L1, N]
        if t["act"] == "relu":
            part, c = tower(g.node("Max", [i1, per_user(-t["U1"], "user_mlp")]), t["U1"])
            offset = offset + c @ t["hM"]
        else:
            part, _ = tower(g.node(act, [g.node("Add", [i1, per_user(t["U1"], "user_mlp")])]), None)
    if kind == "fused":
        pq = g.node("Mul", [per_user(t["P"], "user_emb"), g.item_table("item_emb", t["Q"].T)])
        pre = g.node("Add", [g.node("Add", [pq, per_user(t["U1"], "user_lin")]), g.item_table("item_lin", t["I1"].T)])
        part = g.node("MatMul", [g.init("hM", _f32(t["hM"][None, :])), g.node(act, [pre])])
    if kind in ("gmf", "neumf"):
        # GMF logits and the per-user offset in one product: [G_u, offset_u] . [q_i; 1]
        ug = g.init("user_gmf", _f32(np.concatenate([t["G"], offset[:, None]], axis=1)[:, None, :]))  # [n_users, 1, F+1]
        qg = g.item_table("item_gmf", np.concatenate([t["QG"].T, np.ones((1, model.cfg.n_items))], axis=0))  # [F+1, N]
        gmf = g.node("MatMul", [g.node("Gather", [ug, "users"], axis=0), qg])  # [B, 1, N]
        logits3 = g.node("Add", [part, gmf]) if part else gmf
    else:
        user_offset = g.init("user_offset", _f32(offset[:, None, None]))  # [n_users, 1, 1]
        logits3 = g.node("Add", [part, g.node("Gather", [user_offset, "users"], axis=0)])
    logits0 = g.node("Reshape", [logits3, g.init("rows_by_candidates", np.array([0, -1], np.int64))])  # [B, N]

    g.init("neginf", np.array([-np.inf], np.float32))
    n_excl = g.node("Shape", ["exclude"], start=0, end=1)
    upd = g.node("Expand", ["neginf", n_excl])
    logits = g.node("ScatterND", [logits0, "exclude", upd])
    g.nodes.append(oh.make_node("TopK", [logits, "k"], ["logit", "position"], name="topk", axis=1, largest=1, sorted=1))
    g.node("Sigmoid", ["logit"], "score")

    outputs = [
        oh.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", "k"]),
        oh.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch", "k"]),
        oh.make_tensor_value_info("position", TensorProto.INT64, ["batch", "k"]),
    ]
    inputs = [
        oh.make_tensor_value_info("users", TensorProto.INT64, ["batch"]),
        oh.make_tensor_value_info("k", TensorProto.INT64, [1]),
        oh.make_tensor_value_info("exclude", TensorProto.INT64, ["excluded", 2]),
    ] + [oh.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in g.item_tables]
    graph = oh.make_graph(g.nodes, f"ncf_{kind}_grid", inputs, outputs, g.inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)], producer_name="ncf export (onnx.helper)")
    proto.ir_version = IR_VERSION
    return proto


# --------------------------------------------------------------------------- verification


def _session(data: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _torch_logits(model: NCFModel, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(users.astype(np.int64)), torch.from_numpy(items.astype(np.int64))).double().numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def verify_pair(model: NCFModel, data: bytes, *, batches=VERIFY_BATCHES, seed: int = 0) -> dict:
    """ONNX Runtime vs torch on random pairs at each batch size; NcfError beyond tolerance."""
    sess = _session(data)
    rng = np.random.default_rng(seed)
    worst_p = worst_l = 0.0
    for n in batches:
        u = rng.integers(0, model.cfg.n_users, n, dtype=np.int64)
        i = rng.integers(0, model.cfg.n_items, n, dtype=np.int64)
        score, logit = sess.run(list(mf.PAIR_OUTPUTS), {"user": u, "item": i})
        ref = _torch_logits(model, u, i)
        if score.shape != (n,) or logit.shape != (n,):
            raise NcfError(f"per-pair graph returned shape {score.shape} for a batch of {n}")
        worst_p = max(worst_p, float(np.abs(score - _sigmoid(ref)).max()))
        worst_l = max(worst_l, float((np.abs(logit - ref) / np.maximum(1.0, np.abs(ref))).max()))
    if not (worst_p <= PROB_TOL and worst_l <= LOGIT_RTOL):
        raise NcfError(f"per-pair ONNX graph differs from torch (max |dp| {worst_p:.2e}, max rel |dlogit| {worst_l:.2e}); not written")
    return {"max_abs_diff_score": worst_p, "max_rel_diff_logit": worst_l, "batches": list(batches)}


def verify_grid(model: NCFModel, data: bytes, *, batches=(1, 7), k: int = 10, seed: int = 0) -> dict:
    """Grid top-k vs torch over every item for a few users: the top-k scores must match the
    torch top-k rank by rank (so only true ties may swap), each returned item's score must
    match torch's score of that item, and an excluded item must not come out."""
    sess = _session(data)
    cfg = model.cfg
    k = min(k, cfg.n_items)
    rng = np.random.default_rng(seed)
    items = np.arange(cfg.n_items, dtype=np.int64)
    worst_p = worst_l = 0.0
    for b in batches:
        users = rng.integers(0, cfg.n_users, b, dtype=np.int64)
        ref = _torch_logits(model, np.repeat(users, cfg.n_items), np.tile(items, b)).reshape(b, cfg.n_items)
        excl = np.zeros((0, 2), np.int64)
        if cfg.n_items > k:  # exclude each user's true best item: it must disappear
            excl = np.stack([np.arange(b), ref.argmax(axis=1)], axis=1).astype(np.int64)
            ref[np.arange(b), excl[:, 1]] = -np.inf
        score, logit, pos = sess.run(["score", "logit", "position"], {"users": users, "k": np.array([k], np.int64), "exclude": excl})
        want = -np.sort(-ref, axis=1)[:, :k]
        got = np.take_along_axis(ref, pos, axis=1)
        if not np.isfinite(got).all():
            raise NcfError("grid ONNX graph returned an excluded item; not written")
        worst_p = max(worst_p, float(np.abs(_sigmoid(got) - _sigmoid(want)).max()), float(np.abs(score - _sigmoid(got)).max()))
        worst_l = max(worst_l, float((np.abs(logit - got) / np.maximum(1.0, np.abs(got))).max()))
    if not (worst_p <= PROB_TOL and worst_l <= LOGIT_RTOL * 10):
        raise NcfError(f"grid ONNX graph differs from torch (max |dp| {worst_p:.2e}, max rel |dlogit| {worst_l:.2e}); not written")
    return {"max_abs_diff_score": worst_p, "max_rel_diff_logit": worst_l, "batches": list(batches), "k": k}


# --------------------------------------------------------------------------- files


def _with_metadata(proto: onnx.ModelProto, md: ModelDir, graph: str) -> onnx.ModelProto:
    cfg = md.model.cfg
    meta = mf.encode_metadata(
        graph=graph,
        kind=cfg.kind,
        n_users=cfg.n_users,
        n_items=cfg.n_items,
        factors=cfg.factors,
        layers=list(cfg.layers),
        activation=cfg.activation,
        user_ids=pa.array(md.user_ids.to_arrow()),
        item_ids=pa.array(md.item_ids.to_arrow()),
        seen_users=md.seen_users,
        seen_items=md.seen_items,
        include_seen=graph == "grid",
    )
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"ncf {graph} graph of a {cfg.kind} model ({cfg.n_users} users x {cfg.n_items} items)"
    return proto


def _checked_bytes(proto: onnx.ModelProto, what: str) -> bytes:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise NcfError(f"the {what} graph fails the ONNX checker: {exc}") from exc
    data = proto.SerializeToString()
    if len(data) >= 2**31:
        raise NcfError(f"the {what} graph is larger than 2 GB and cannot be one self-contained ONNX file")
    return data


def _write_atomic(files: list[tuple[Path, bytes]]) -> None:
    """Write every file under a temporary name, then rename them all; nothing is left behind
    on failure."""
    tmps: list[Path] = []
    path = files[0][0] if files else Path()
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmps.append(tmp)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise NcfError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def default_pair_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".pair" + (out.suffix or ".onnx"))


def export_model(model_dir: Path, out: Path, *, pair_out: Path | None = None, verify: bool = True) -> dict:
    """Export `model_dir` (written by `ncf fit`) as the grid graph `out` (what `ncf score`
    reads) and the per-pair graph `pair_out` (default: `out` with suffix `.pair.onnx`).
    Both are checked with the ONNX checker and verified against torch before anything is
    written; both are written under temporary names and renamed when complete."""
    out = Path(out)
    pair_out = Path(pair_out) if pair_out is not None else default_pair_path(out)
    if out.resolve() == pair_out.resolve():
        raise NcfError(f"the grid and the per-pair graph cannot both be written to {out}")
    for p in (out, pair_out):
        if p.exists() and p.is_dir():
            raise NcfError(f"{p} is a directory; give a file name such as model.onnx")
        check_writable_location(p)
    md = load_model_dir(Path(model_dir))
    model = md.model.eval()
    cfg = model.cfg
    if cfg.kind not in SUPPORTED_KINDS:
        raise NcfError(f"model kind {cfg.kind!r} cannot be exported; supported: {', '.join(SUPPORTED_KINDS)}")
    pair = _checked_bytes(_with_metadata(pair_graph(model), md, "pair"), "per-pair")
    grid = _checked_bytes(_with_metadata(grid_graph(model), md, "grid"), "grid")
    summary = {
        "grid": str(out),
        "pair": str(pair_out),
        "kind": cfg.kind,
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "opset": OPSET,
        "exporter": "per-pair: torch.onnx.export(dynamo=True); grid: onnx.helper",
        "grid_bytes": len(grid),
        "pair_bytes": len(pair),
    }
    if verify:
        pv = verify_pair(model, pair)
        gv = verify_grid(model, grid)
        summary["pair_check"] = pv
        summary["grid_check"] = gv
        summary["max_abs_diff"] = max(pv["max_abs_diff_score"], gv["max_abs_diff_score"])
    _write_atomic([(pair_out, pair), (out, grid)])
    return summary
