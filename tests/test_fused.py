"""The fused CPU path (batch.fused, batch/fused_ops.c): both operators against numpy, the graph
rewrite, and the fall-back to the plain graph when the library cannot be built."""

from __future__ import annotations

import itertools
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from batch import fused, oplib
from batch.scorer import GridScorer
from ncf.errors import NcfError
from tests.onnx_helpers import brute_force_topk, case

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_library = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the fused operators cannot be built here")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library state of its own (cache dir, environment); the real one is restored after."""
    monkeypatch.setenv("NCF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(oplib, "_library", None)
    return monkeypatch


@needs_library
def test_library_builds_where_a_compiler_exists():
    lib = oplib.library()
    assert lib.path is not None and lib.path.is_file(), lib.note


@needs_library
@pytest.mark.parametrize("dims", [[32, 16, 8], [7, 5, 3], [8], [33, 17], [4, 12, 1]])
@pytest.mark.parametrize(("users", "n"), [(1, 1), (3, 15), (2, 16), (1, 17), (5, 100)])
def test_relu_tower_operator_matches_numpy(dims, users, n):
    rng = np.random.default_rng(len(dims) * 100 + users * 10 + n)
    sess = ort.InferenceSession(fused.tower_node_graph(dims).SerializeToString(), oplib.session_options(oplib.library().path),
                                providers=["CPUExecutionProvider"])
    item = rng.standard_normal((dims[0], n)).astype(np.float32)
    floors = rng.standard_normal((users, sum(dims))).astype(np.float32)
    weights = rng.standard_normal(max(1, sum(a * b for a, b in itertools.pairwise(dims)))).astype(np.float32)
    h = rng.standard_normal(dims[-1]).astype(np.float32)
    (out,) = sess.run(None, {"item": item, "floors": floors, "dims": np.array(dims, np.int64), "weights": weights, "h": h})
    ref = fused._reference(item, floors, dims, weights, h)
    assert out.shape == (users, 1, n)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


@needs_library
@pytest.mark.parametrize(("rows", "n", "k", "n_excluded"), [(1, 1, 1, 0), (3, 50, 7, 20), (2, 9, 9, 30), (4, 33, 5, 0), (2, 1000, 50, 300)])
def test_masked_topk_operator_matches_numpy(rows, n, k, n_excluded):
    rng = np.random.default_rng(rows * 1000 + n + k)
    sess = ort.InferenceSession(fused.topk_node_graph().SerializeToString(), oplib.session_options(oplib.library().path),
                                providers=["CPUExecutionProvider"])
    logits = rng.integers(-4, 5, (rows, n)).astype(np.float32)  # exact ties everywhere
    exclude = np.stack([rng.integers(0, rows, n_excluded), rng.integers(0, n, n_excluded)], axis=1).astype(np.int64).reshape(-1, 2)
    value, position = sess.run(None, {"logits": logits, "exclude": exclude, "k": np.array([k], np.int64)})
    want_value, want_position = fused._topk_reference(logits, exclude, k)
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_array_equal(position, want_position)


@pytest.mark.parametrize("kind", ["gmf", "fused", "neumf-sigmoid"])
def test_rewrite_without_a_relu_tower_fuses_only_the_top_k(kind):
    data, note = fused.fuse_grid(case(kind).grid.read_bytes())
    assert data is not None and "no ReLU MLP tower" in note and "ReluTower" not in note
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ops.count("MaskedTopK") == 1 and not {"ReluTower", "TopK", "ScatterND"} & set(ops)


@pytest.mark.parametrize("kind", ["mlp", "neumf", "neumf-odd", "mlp-one"])
def test_rewrite_replaces_the_tower_chain_and_the_top_k(kind):
    plain = onnx.load(str(case(kind).grid))
    data, note = fused.fuse_grid(plain.SerializeToString())
    assert data is not None and note == "ai.ncf.ReluTower + ai.ncf.MaskedTopK"
    g = onnx.load_from_string(data).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("ReluTower") == 1 and ops.count("MaskedTopK") == 1
    assert not {"Max", "TopK", "ScatterND", "Expand"} & set(ops)
    assert ops.count("MatMul") == (1 if kind.startswith("neumf") else 0)  # only the GMF product is left
    inits = {t.name for t in g.initializer}
    assert not {"hM", "user_mlp", "W2", "neginf"} & inits and {"tower_floors", "item_mlp"} <= inits
    # what the scorer relies on: same inputs (item tables still overridable), outputs, metadata
    assert [i.name for i in g.input] == [i.name for i in plain.graph.input]
    assert [o.name for o in g.output] == [o.name for o in plain.graph.output]
    assert {p.key: p.value for p in onnx.load_from_string(data).metadata_props} == {p.key: p.value for p in plain.metadata_props}


@needs_library
def test_fused_and_plain_scorers_agree_with_restricted_candidates():
    c = case("neumf")
    users = np.arange(40)
    cand = np.arange(3, 60, 2)
    results = []
    for fuse in (True, False):
        with GridScorer(c.grid, device="cpu", chunk_users=5, fuse=fuse) as sc:
            sc.set_candidates(cand)
            results.append(sc.topk(users, 9))
            assert sc.fused == fuse
    np.testing.assert_array_equal(results[0].items, results[1].items)
    np.testing.assert_allclose(results[0].scores, results[1].scores, rtol=0, atol=1e-6)
    ref = brute_force_topk(c, users, 9, exclude_seen=True, candidates=cand)
    for u, (items, _, _) in zip(users, ref):
        np.testing.assert_array_equal(results[0].items[u], items)


def test_disabled_by_environment(fresh_library):
    fresh_library.setenv("NCF_FUSED", "0")
    sc = GridScorer(case("neumf").grid, device="cpu")
    assert not sc.fused and "NCF_FUSED=0" in sc.kernel_note


def test_unusable_compiler_falls_back_to_the_plain_graph(fresh_library, tmp_path):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken-cc 1.0 && exit 0\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    cc.chmod(0o755)
    fresh_library.setenv("CC", str(cc))
    c = case("neumf")
    with GridScorer(c.grid, device="cpu", chunk_users=4) as sc:
        assert not sc.fused and "compile error" in sc.kernel_note
        res = sc.topk(np.arange(40), 6)
    ref = brute_force_topk(c, np.arange(40), 6, exclude_seen=True)
    for u, (items, _, _) in zip(range(40), ref):
        np.testing.assert_array_equal(res.items[u], items)
    # the failure is remembered: no second compile attempt for this compiler and CPU
    assert list((tmp_path / "cache").glob("*.bad"))
    fresh_library.setattr(oplib, "_library", None)
    assert "compile error" in oplib.library().note


def test_missing_compiler_falls_back(fresh_library):
    fresh_library.setenv("CC", "no-such-compiler-ncf")
    lib = oplib.library()
    assert lib.path is None and "no C compiler" in lib.note


@needs_library
def test_compiler_given_with_arguments(fresh_library):
    fresh_library.setenv("CC", f"env {os.environ.get('CC') or 'cc'}")  # like "ccache cc"
    lib = oplib.library()
    assert lib.path is not None, lib.note


def test_shared_cache_folder_is_refused(fresh_library, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    fresh_library.setenv("NCF_CACHE_DIR", str(shared))
    fresh_library.setenv("CC", sys.executable)  # any program that answers --version: the folder is checked first
    lib = oplib.library()
    assert lib.path is None and "not private" in lib.note
    sc = GridScorer(case("neumf").grid, device="cpu")  # scoring still works, on the plain graph
    assert not sc.fused and "not private" in sc.kernel_note


def test_a_graph_with_nothing_to_fuse_does_not_build_the_library(fresh_library):
    fresh_library.setenv("CC", "no-such-compiler-ncf")
    with pytest.raises(NcfError, match="per-pair graph"):  # the plain loader's one line, as before
        GridScorer(case("neumf").pair, device="cpu")
    assert oplib._library is None


def test_auto_device_fuses_when_it_ends_on_cpu():
    sc = GridScorer(case("neumf").grid, device="auto")
    on_cpu = sc.provider == "CPUExecutionProvider"
    assert sc.fused == (on_cpu and oplib.library().path is not None)
    if not on_cpu:
        assert "CUDA" in sc.kernel_note  # the custom operator is CPU-only; CUDA runs the plain graph
