"""The fused CPU tower of `ncf score`: the grid graph's ReLU MLP tower as one ONNX Runtime
custom operator (`ai.ncf.ReluTower`, source `relu_tower.c`).

The exported `model.onnx` stays plain, portable ONNX. On CPU, `GridScorer` asks this module for
a rewritten copy of it in which the chain Max -> MatMul -> Max -> ... -> MatMul(h_M) of the
tower is one ReluTower node, registers the operator library with the session, and runs that.
The rest of the graph (GMF product, masking, TopK) is unchanged and runs on ONNX Runtime's own
operators. Why: each operator of the plain chain streams a [B, L, N] intermediate through
memory; the fused kernel keeps a block of 16 candidates in registers and writes one float per
pair (measured in `make bench-score`).

The library is compiled on first use with the machine's C compiler (`$CC`, else `cc`) and
`-march=native`, into a cache directory (`$NCF_CACHE_DIR`, else `~/.cache/ncf`) keyed by the
source, the compiler, the CPU and the ONNX Runtime version, and is
used only after a self-check in a separate process (a crash there cannot take the caller
down) has compared it with numpy. Without a compiler, or with `NCF_FUSED=0`, or for towers it
does not cover (tanh/sigmoid activations, layers wider than 256), the plain graph runs: same
results within float rounding, slower. `note` always says which ran and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("relu_tower.c")
DOMAIN = "ai.ncf"
OP = "ReluTower"
MAX_WIDTH = 256  # MAX_WIDTH in relu_tower.c
_TIMEOUT_S = 120


@dataclass(frozen=True)
class Library:
    path: Path | None
    note: str


_library: Library | None = None


def cache_dir() -> Path:
    if os.environ.get("NCF_CACHE_DIR"):
        return Path(os.environ["NCF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ncf"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> tuple[list[str] | None, str]:
    """(command, version line) of $CC (which may carry arguments, e.g. "ccache cc") or cc."""
    cc = shlex.split(os.environ.get("CC") or "cc") or ["cc"]
    path = shutil.which(cc[0])
    if path is None:
        return None, f"no C compiler ({cc[0]}) on PATH"
    command = [path, *cc[1:]]
    try:
        version = subprocess.run([*command, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cc[0]} --version failed: {exc}"
    return command, version.splitlines()[0] if version else " ".join(cc)


def library() -> Library:
    """The compiled operator library (built and self-checked once per machine), or the reason
    there is none. Cached in-process."""
    global _library
    if _library is None:
        try:
            _library = _build()
        except (OSError, RuntimeError) as exc:  # no home directory, unreadable cache, ...
            _library = Library(None, f"fused tower unavailable: {exc}")
    return _library


class _Failure(Exception):
    """Building failed; `lasting` failures (the compiler rejects the source, the self-check
    disagrees with numpy or crashes) are remembered, passing ones (timeouts) are not."""

    def __init__(self, reason: str, lasting: bool):
        super().__init__(reason)
        self.lasting = lasting


def _private_folder(folder: Path) -> None:
    """Create the cache folder for this user only, and refuse one that others could write to:
    a library found there is loaded into the process."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise OSError(f"cache folder {folder} is not private to this user (owner or group/world write)")


def _build() -> Library:
    if os.environ.get("NCF_FUSED", "1") == "0":
        return Library(None, "fused tower disabled (NCF_FUSED=0)")
    cc, version = _compiler()
    if cc is None:
        return Library(None, f"fused tower unavailable: {version}")
    import onnxruntime as ort

    # a new source, compiler, CPU or runtime gets its own build and its own self-check
    signature = f"{version}\n{_cpu_signature()}\n{ort.__version__}".encode()
    key = hashlib.sha256(SOURCE.read_bytes() + signature).hexdigest()[:16]
    folder = cache_dir()
    _private_folder(folder)
    target = folder / f"relu_tower-{key}.so"
    bad = target.with_suffix(".bad")
    with _lock(folder / f"relu_tower-{key}.lock"):  # one builder per machine; the others wait
        if bad.exists():
            return Library(None, f"fused tower unavailable: {bad.read_text().strip()} (delete {bad} to retry)")
        if target.exists():
            return Library(target, "fused tower (ai.ncf.ReluTower)")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            try:
                _compile(cc, built)
                _self_check(built)
            except _Failure as failure:
                if failure.lasting:
                    bad.write_text(f"{failure}\n")
                return Library(None, f"fused tower unavailable: {failure}")
            os.replace(built, target)
    return Library(target, "fused tower (ai.ncf.ReluTower, compiled now)")


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders still each install a complete file
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compile(cc: list[str], out: Path) -> None:
    errors = ""
    for flags in (["-march=native"], []):  # some compilers (or CPUs) lack -march=native
        try:
            run = subprocess.run([*cc, *flags, "-O3", "-shared", "-fPIC", "-o", str(out), str(SOURCE)], check=False,
                                 capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _Failure(f"the compiler ran longer than {_TIMEOUT_S}s", lasting=False) from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise _Failure(f"compiler failed to run: {exc}", lasting=False) from exc
        if run.returncode == 0:
            return
        errors = (run.stderr.strip().splitlines() or ["?"])[-1]
    raise _Failure(f"compile error: {errors}", lasting=True)


def _self_check(lib: Path) -> None:
    """Run the operator on small random towers in a child process (a crash there cannot take
    the caller down) and compare with numpy."""
    try:
        run = subprocess.run([sys.executable, "-m", "batch.fused", str(lib)], check=False, capture_output=True, text=True,
                             timeout=_TIMEOUT_S, cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        raise _Failure(f"the self-check ran longer than {_TIMEOUT_S}s", lasting=False) from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Failure(f"self-check did not run: {exc}", lasting=False) from exc
    if run.returncode != 0:
        last = (run.stderr.strip() or run.stdout.strip() or f"exit code {run.returncode}").splitlines()[-1]
        raise _Failure(f"self-check failed: {last}", lasting=True)


# --------------------------------------------------------------------------- the graph rewrite


def fuse_grid(data: bytes) -> tuple[bytes | None, str]:
    """The grid graph `data` with its ReLU tower as one ReluTower node, or (None, why not).
    The tower is recognised by the names `export.onnx_export.grid_graph` gives it: a Max of
    `item_mlp` and the gathered `user_mlp`, then per layer j a MatMul with `W{j}` and a Max
    with the gathered `user_c{j}`, then the MatMul with `hM`."""
    import onnx
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - not ONNX: the plain session's loader says why
        return None, f"not an ONNX model ({type(exc).__name__})"
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {out: n for n in g.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_consumer(name: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 else None

    def gathered_table(name: str) -> str | None:
        """The [n_users, L, 1] table of Gather(table, users, axis 0) feeding only `name`'s user."""
        n = producer.get(name)
        if n is None or n.op_type != "Gather" or n.input[1] != "users" or n.input[0] not in inits:
            return None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        dims = list(inits[n.input[0]].dims)
        return n.input[0] if axis == 0 and len(dims) == 3 and dims[2] == 1 and only_consumer(name) is not None else None

    first = next((n for n in consumers.get("item_mlp", []) if n.op_type == "Max"), None)
    if first is None or gathered_table(first.input[1]) != "user_mlp":
        return None, "no ReLU MLP tower in this graph (GMF, fused or tanh/sigmoid model)"
    chain, floors, weights = [first], ["user_mlp"], []
    node = only_consumer(first.output[0])
    while node is not None and node.op_type == "MatMul" and node.input[1] == chain[-1].output[0] and node.input[0] in inits:
        chain.append(node)
        if node.input[0] == "hM":
            break
        weights.append(node.input[0])
        nxt = only_consumer(node.output[0])
        table = gathered_table(nxt.input[1]) if nxt is not None and nxt.op_type == "Max" else None
        if table is None:
            return None, "unexpected tower structure"
        chain.append(nxt)
        floors.append(table)
        node = only_consumer(nxt.output[0])
    if chain[-1].op_type != "MatMul" or chain[-1].input[0] != "hM":
        return None, "unexpected tower structure"

    floor_tables = [nh.to_array(inits[t])[:, :, 0] for t in floors]  # [n_users, L_j] each
    dims = [t.shape[1] for t in floor_tables]
    ws = [nh.to_array(inits[w]) for w in weights]
    h = nh.to_array(inits["hM"])
    if max(dims) > MAX_WIDTH or h.shape != (1, dims[-1]) or any(w.shape != (b, a) for w, a, b in zip(ws, dims[:-1], dims[1:])):
        return None, f"tower widths {dims} not covered by the fused kernel"
    gathers = [producer[n.input[1]] for n in chain if n.op_type == "Max"]
    removed = {id(n) for n in chain + gathers}
    at = min(i for i, n in enumerate(g.node) if id(n) in removed)
    new_nodes = [
        oh.make_node("Gather", ["tower_floors", "users"], ["tower_user_floors"], name="tower_floors_of_users", axis=0),
        oh.make_node(OP, ["item_mlp", "tower_user_floors", "tower_dims", "tower_weights", "tower_h"], [chain[-1].output[0]],
                     name="relu_tower", domain=DOMAIN),
    ]
    kept = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(kept[:at] + new_nodes + kept[at:])
    still_used = {i for n in g.node for i in n.input}
    graph_inputs = {i.name for i in g.input}
    dropped = [t for t in g.initializer if t.name not in still_used and t.name not in graph_inputs]
    for t in dropped:
        g.initializer.remove(t)
    g.initializer.extend([
        nh.from_array(np.ascontiguousarray(np.concatenate(floor_tables, axis=1), dtype=np.float32), "tower_floors"),
        nh.from_array(np.array(dims, np.int64), "tower_dims"),
        # a tower of one layer has no weights: one unused zero keeps the tensor non-empty
        nh.from_array(np.concatenate([w.ravel() for w in ws] + [np.zeros(1)]).astype(np.float32), "tower_weights"),
        nh.from_array(h.ravel().astype(np.float32), "tower_h"),
    ])
    model.opset_import.append(oh.make_opsetid(DOMAIN, 1))
    return model.SerializeToString(), "fused"


def _reference(item, floors, dims, weights, h) -> np.ndarray:
    """What ReluTower computes, in numpy float64 (the self-check's and the tests' reference)."""
    x = np.maximum(item[None].astype(np.float64), floors[:, : dims[0], None])
    at, off = 0, dims[0]
    for din, dout in itertools.pairwise(dims):
        w = weights[at : at + din * dout].reshape(dout, din).astype(np.float64)
        x = np.maximum(np.einsum("oj,bjn->bon", w, x), floors[:, off : off + dout, None])
        at, off = at + din * dout, off + dout
    return np.einsum("j,bjn->bn", h.astype(np.float64), x)[:, None, :]


def tower_node_graph(dims: list[int], n_users: int | None = None):
    """A one-node graph around ReluTower (self-check and tests)."""
    from onnx import TensorProto
    from onnx import helper as oh

    f = int(sum(dims))
    node = oh.make_node(OP, ["item", "floors", "dims", "weights", "h"], ["out"], domain=DOMAIN)
    inputs = [
        oh.make_tensor_value_info("item", TensorProto.FLOAT, [dims[0], "n"]),
        oh.make_tensor_value_info("floors", TensorProto.FLOAT, [n_users or "b", f]),
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
    fused, why = fuse_grid(data)  # first: a graph without a ReLU tower needs no compiler
    if fused is None:
        return None, f"plain graph: {why}"
    lib = library()
    if lib.path is None:
        return None, f"plain graph: {lib.note}"
    import onnxruntime as ort

    try:
        return ort.InferenceSession(fused, session_options(lib.path), providers=["CPUExecutionProvider"]), lib.note
    except Exception as exc:  # noqa: BLE001 - the plain graph still runs; say why the fused one did not
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"plain graph: the fused graph of {source} failed to load ({msg})"


def session_options(lib: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(str(lib))
    return so


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
        print(f"differs from numpy by {worst:.1e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_check_main(sys.argv[1]))
