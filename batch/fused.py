"""The fused CPU path of `ncf score`: two ONNX Runtime custom operators (source `fused_ops.c`),
`ai.ncf.ReluTower` (the grid graph's ReLU MLP tower in one pass) and `ai.ncf.MaskedTopK`
(masking of seen items + TopK in one pass).

The exported `model.onnx` stays plain, portable ONNX. On CPU, `GridScorer` asks this module for
a rewritten copy of it: the chain Max -> MatMul -> Max -> ... -> MatMul(h_M) of the tower
becomes one ReluTower node (ReLU towers only), ScatterND -> TopK becomes one MaskedTopK node
(every grid graph); it registers the operator library with the session and runs that. The
GMF product and the small operators stay ONNX Runtime's own. Why: each operator of the plain
tower chain streams a [B, L, N] intermediate through memory; the fused kernel keeps a block of
16 candidates in registers and writes one float per pair (measured in `make bench-score`).

The operator library is built and self-checked by `batch.oplib` (on first use, with the
machine's C compiler); the self-check runs this module's `__main__` against the numpy
references below. Without a compiler, or with `NCF_FUSED=0`, the plain graph runs: same
results within float rounding, slower. The note returned with a session always says which ran
and why.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from batch.oplib import library, session_options

DOMAIN = "ai.ncf"
OP = "ReluTower"
TOPK_OP = "MaskedTopK"
MAX_WIDTH = 256  # MAX_WIDTH in fused_ops.c


class _Graph:
    """Producers and consumers of a graph's values, and node replacement in place."""

    def __init__(self, model):
        self.model, self.g = model, model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {out: n for n in self.g.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def only_consumer(self, name: str):
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 else None

    def replace(self, old: list, new: list) -> None:
        """Put `new` where the first of `old` was (their inputs are graph inputs, initializers
        or outputs of earlier nodes), drop `old` and the initializers no node reads any more."""
        gone = {id(n) for n in old}
        at = min(i for i, n in enumerate(self.g.node) if id(n) in gone)
        kept = [n for n in self.g.node if id(n) not in gone]
        del self.g.node[:]
        self.g.node.extend(kept[:at] + new + kept[at:])
        used = {i for n in self.g.node for i in n.input} | {i.name for i in self.g.input}
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        self.__init__(self.model)


def fuse_grid(data: bytes) -> tuple[bytes | None, str]:
    """The grid graph `data` with its ReLU tower as one ReluTower node and its masking + TopK
    as one MaskedTopK node, or (None, why neither applies). The parts are recognised by the
    names `export.onnx_export.grid_graph` gives them."""
    import onnx
    from onnx import helper as oh

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - not ONNX: the plain session's loader says why
        return None, f"not an ONNX model ({type(exc).__name__})"
    graph = _Graph(model)
    tower_why, topk_why = _fuse_tower(graph), _fuse_topk(graph)
    if tower_why and topk_why:
        return None, f"{tower_why}; {topk_why}"
    model.opset_import.append(oh.make_opsetid(DOMAIN, 1))
    fused = [op for op, why in ((OP, tower_why), (TOPK_OP, topk_why)) if not why]
    note = " + ".join(f"{DOMAIN}.{op}" for op in fused) + (f" (tower: {tower_why})" if tower_why else "")
    return model.SerializeToString(), note


def _fuse_topk(graph: _Graph) -> str | None:
    """ScatterND(logits, exclude, -inf) -> TopK(k) as one MaskedTopK; None when done, else why not."""
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    topk = next((n for n in graph.g.node if n.op_type == "TopK" and list(n.output) == ["logit", "position"]), None)
    scatter = graph.producer.get(topk.input[0]) if topk is not None else None
    if scatter is None or scatter.op_type != "ScatterND" or scatter.input[1] != "exclude" or topk.input[1] != "k":
        return "unexpected masking/top-k structure"
    attrs = {a.name: a.i for a in topk.attribute}
    if attrs.get("axis", -1) not in (1, -1) or attrs.get("largest", 1) != 1 or attrs.get("sorted", 1) != 1:
        return "unexpected top-k attributes"
    if graph.only_consumer(scatter.output[0]) is not topk or any(a.name == "reduction" and a.s not in (b"", b"none") for a in scatter.attribute):
        return "unexpected masking/top-k structure"
    expand = graph.producer.get(scatter.input[2])  # the -inf updates: Expand(neginf, Shape(exclude))
    fill = graph.inits.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
    if fill is None or not np.all(nh.to_array(fill) == -np.inf):
        return "the masked entries are not set to -inf"
    feeding = [expand] if graph.only_consumer(scatter.input[2]) is scatter else []
    shape = graph.producer.get(expand.input[1]) if feeding else None
    if shape is not None and graph.only_consumer(expand.input[1]) is expand:
        feeding.append(shape)
    node = oh.make_node(TOPK_OP, [scatter.input[0], "exclude", "k"], ["logit", "position"], name="masked_topk", domain=DOMAIN)
    graph.replace([scatter, topk, *feeding], [node])
    return None


def _fuse_tower(graph: _Graph) -> str | None:
    """The chain Max(item_mlp, Gather(user_mlp)) -> [MatMul(W{j}) -> Max(Gather(user_c{j}))]*
    -> MatMul(hM) as one ReluTower; None when done, else why not."""
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    inits, producer = graph.inits, graph.producer

    def gathered_table(name: str) -> str | None:
        """The [n_users, L, 1] table of Gather(table, users, axis 0) feeding only `name`'s user."""
        n = producer.get(name)
        if n is None or n.op_type != "Gather" or n.input[1] != "users" or n.input[0] not in inits:
            return None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        dims = list(inits[n.input[0]].dims)
        return n.input[0] if axis == 0 and len(dims) == 3 and dims[2] == 1 and graph.only_consumer(name) is not None else None

    first = next((n for n in graph.consumers.get("item_mlp", []) if n.op_type == "Max"), None)
    if first is None or gathered_table(first.input[1]) != "user_mlp":
        return "no ReLU MLP tower (GMF, fused or tanh/sigmoid model)"
    chain, floors, weights = [first], ["user_mlp"], []
    node = graph.only_consumer(first.output[0])
    while node is not None and node.op_type == "MatMul" and node.input[1] == chain[-1].output[0] and node.input[0] in inits:
        chain.append(node)
        if node.input[0] == "hM":
            break
        weights.append(node.input[0])
        nxt = graph.only_consumer(node.output[0])
        table = gathered_table(nxt.input[1]) if nxt is not None and nxt.op_type == "Max" else None
        if table is None:
            return "unexpected tower structure"
        chain.append(nxt)
        floors.append(table)
        node = graph.only_consumer(nxt.output[0])
    if chain[-1].op_type != "MatMul" or chain[-1].input[0] != "hM":
        return "unexpected tower structure"

    floor_tables = [nh.to_array(inits[t])[:, :, 0] for t in floors]  # [n_users, L_j] each
    dims = [t.shape[1] for t in floor_tables]
    ws = [nh.to_array(inits[w]) for w in weights]
    h = nh.to_array(inits["hM"])
    if max(dims) > MAX_WIDTH or h.shape != (1, dims[-1]) or any(w.shape != (b, a) for w, a, b in zip(ws, dims[:-1], dims[1:])):
        return f"tower widths {dims} not covered by the fused kernel"
    gathers = [producer[n.input[1]] for n in chain if n.op_type == "Max"]
    graph.g.initializer.extend([
        nh.from_array(np.ascontiguousarray(np.concatenate(floor_tables, axis=1), dtype=np.float32), "tower_floors"),
        nh.from_array(np.array(dims, np.int64), "tower_dims"),
        # a tower of one layer has no weights: one unused zero keeps the tensor non-empty
        nh.from_array(np.concatenate([w.ravel() for w in ws] + [np.zeros(1)]).astype(np.float32), "tower_weights"),
        nh.from_array(h.ravel().astype(np.float32), "tower_h"),
    ])
    graph.replace(chain + gathers, [
        oh.make_node("Gather", ["tower_floors", "users"], ["tower_user_floors"], name="tower_floors_of_users", axis=0),
        oh.make_node(OP, ["item_mlp", "tower_user_floors", "tower_dims", "tower_weights", "tower_h"], [chain[-1].output[0]],
                     name="relu_tower", domain=DOMAIN),
    ])
    return None


def _reference(item, floors, dims, weights, h) -> np.ndarray:
    """What ReluTower computes, in numpy float64 (the self-check's and the tests' reference)."""
    x = np.maximum(item[None].astype(np.float64), floors[:, : dims[0], None])
    at, off = 0, dims[0]
    for din, dout in itertools.pairwise(dims):
        w = weights[at : at + din * dout].reshape(dout, din).astype(np.float64)
        x = np.maximum(np.einsum("oj,bjn->bon", w, x), floors[:, off : off + dout, None])
        at, off = at + din * dout, off + dout
    return np.einsum("j,bjn->bn", h.astype(np.float64), x)[:, None, :]


def tower_node_graph(dims: list[int]):
    """A one-node graph around ReluTower (self-check and tests)."""
    from onnx import TensorProto
    from onnx import helper as oh

    f = int(sum(dims))
    node = oh.make_node(OP, ["item", "floors", "dims", "weights", "h"], ["out"], domain=DOMAIN)
    inputs = [
        oh.make_tensor_value_info("item", TensorProto.FLOAT, [dims[0], "n"]),
        oh.make_tensor_value_info("floors", TensorProto.FLOAT, ["b", f]),
        oh.make_tensor_value_info("dims", TensorProto.INT64, [len(dims)]),
        oh.make_tensor_value_info("weights", TensorProto.FLOAT, ["w"]),
        oh.make_tensor_value_info("h", TensorProto.FLOAT, [dims[-1]]),
    ]
    out = [oh.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 1, "n"])]
    model = oh.make_model(oh.make_graph([node], "relu_tower", inputs, out), opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def fused_session(data: bytes, *, source: str = "model"):
    """(CPU session on the fused graph, note) or (None, why not)."""
    fused, what = fuse_grid(data)  # first: a graph with nothing to fuse needs no compiler
    if fused is None:
        return None, f"plain graph: {what}"
    lib = library()
    if lib.path is None:
        return None, f"plain graph: {lib.note}"
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(fused, session_options(lib.path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the plain graph still runs; say why the fused one did not
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"plain graph: the fused graph of {source} failed to load ({msg})"
    return session, f"fused {what}" + (f", {lib.note}" if lib.note else "")


def _topk_reference(logits: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What MaskedTopK computes: -inf at the excluded (row, position) pairs, then per row the k
    largest, equal values by lower position first."""
    masked = logits.astype(np.float32).copy()
    masked[exclude[:, 0], exclude[:, 1]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(masked.shape[1]), masked.shape), -masked), axis=1)[:, :k]
    return np.take_along_axis(masked, order, axis=1), order.astype(np.int64)


def topk_node_graph():
    """A one-node graph around MaskedTopK (self-check and tests)."""
    from onnx import TensorProto
    from onnx import helper as oh

    node = oh.make_node(TOPK_OP, ["logits", "exclude", "k"], ["logit", "position"], domain=DOMAIN)
    inputs = [
        oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "n"]),
        oh.make_tensor_value_info("exclude", TensorProto.INT64, ["s", 2]),
        oh.make_tensor_value_info("k", TensorProto.INT64, [1]),
    ]
    outputs = [oh.make_tensor_value_info("logit", TensorProto.FLOAT, ["b", "k"]),
               oh.make_tensor_value_info("position", TensorProto.INT64, ["b", "k"])]
    model = oh.make_model(oh.make_graph([node], "masked_topk", inputs, outputs), opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def _check_main(lib: str) -> int:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    worst = 0.0
    for dims, b, n in (([32, 16, 8], 3, 37), ([8, 4], 1, 16), ([20, 10, 5, 3], 2, 5)):
        sess = ort.InferenceSession(tower_node_graph(dims).SerializeToString(), session_options(Path(lib)), providers=["CPUExecutionProvider"])
        item = rng.standard_normal((dims[0], n)).astype(np.float32)
        floors = rng.standard_normal((b, sum(dims))).astype(np.float32)
        weights = rng.standard_normal(sum(a * c for a, c in itertools.pairwise(dims))).astype(np.float32)
        h = rng.standard_normal(dims[-1]).astype(np.float32)
        (out,) = sess.run(None, {"item": item, "floors": floors, "dims": np.array(dims, np.int64), "weights": weights, "h": h})
        ref = _reference(item, floors, dims, weights, h)
        if out.shape != ref.shape:
            print(f"shape {out.shape} != {ref.shape}", file=sys.stderr)
            return 1
        worst = max(worst, float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max())))
    if not worst <= 1e-5:
        print(f"ReluTower differs from numpy by {worst:.1e}", file=sys.stderr)
        return 1
    sess = ort.InferenceSession(topk_node_graph().SerializeToString(), session_options(Path(lib)), providers=["CPUExecutionProvider"])
    for rows, n, k in ((3, 40, 7), (2, 9, 9), (1, 1, 1)):
        logits = rng.integers(-3, 4, (rows, n)).astype(np.float32)  # many exact ties
        exclude = np.stack([rng.integers(0, rows, 5), rng.integers(0, n, 5)], axis=1).astype(np.int64)
        value, position = sess.run(None, {"logits": logits, "exclude": exclude, "k": np.array([k], np.int64)})
        want_value, want_position = _topk_reference(logits, exclude, k)
        if not (np.array_equal(value, want_value) and np.array_equal(position, want_position)):
            print(f"MaskedTopK differs from numpy for {rows} x {n}, k={k}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_check_main(sys.argv[1]))
