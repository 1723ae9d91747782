"""`ncf export`: per-pair and grid ONNX graphs against torch, metadata, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from batch import modelfile as mf
from batch import oplib
from batch.scorer import GridScorer
from export import onnx_export as ox
from ncf.errors import NcfError
from tests.onnx_helpers import brute_force_topk, case, pair_session

KINDS = ["gmf", "mlp", "neumf", "fused", "neumf-sigmoid"]


def torch_logits(model, users, items):
    with torch.no_grad():
        return model(torch.as_tensor(users), torch.as_tensor(items)).double().numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 7, 4097])
def test_pair_graph_matches_torch(kind, batch):
    c = case(kind)
    sess = pair_session(c.pair)
    rng = np.random.default_rng(batch)
    u = rng.integers(0, len(c.user_ids), batch, dtype=np.int64)
    i = rng.integers(0, len(c.item_ids), batch, dtype=np.int64)
    score, logit = sess.run(["score", "logit"], {"user": u, "item": i})
    ref = torch_logits(c.model, u, i)
    assert score.shape == logit.shape == (batch,)
    assert score.dtype == np.float32
    assert np.abs(logit - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(score - 1 / (1 + np.exp(-ref))).max() <= 1e-5
    assert batch == 1 or np.ptp(ref) > 0.1  # spread scores: the comparison means something


@pytest.mark.parametrize("kind", KINDS)
def test_graph_files_are_pinned_self_contained_and_dynamic(kind):
    c = case(kind)
    for path, graph in ((c.pair, "pair"), (c.grid, "grid")):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["ncf.graph"] == graph and meta["ncf.kind"] == c.model.cfg.kind
        assert meta["ncf.format_version"] == str(mf.FORMAT_VERSION)
        assert int(meta["ncf.n_users"]) == len(c.user_ids) and int(meta["ncf.n_items"]) == len(c.item_ids)
    pair = onnx.load(str(c.pair))
    for vi in list(pair.graph.input):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
        (dim,) = vi.type.tensor_type.shape.dim
        assert dim.dim_param and not dim.dim_value  # batch stays dynamic
    assert [i.name for i in pair.graph.input] == ["user", "item"]
    assert [o.name for o in pair.graph.output] == ["score", "logit"]
    assert sorted(p.name for p in c.model_dir.parent.iterdir()) == ["model.onnx", "model.pair.onnx", "ncf-model"]


def test_metadata_roundtrip_ties_both_files_to_one_vocabulary():
    c = case("neumf", "str")
    grid = pair_session(c.grid).get_modelmeta().custom_metadata_map
    pair = pair_session(c.pair).get_modelmeta().custom_metadata_map
    assert grid["ncf.vocab_hash"] == pair["ncf.vocab_hash"]
    meta = mf.decode_metadata(grid, source="x", expect_graph="grid")
    assert meta.user_ids.to_pylist() == c.user_ids and meta.item_ids.to_pylist() == c.item_ids
    assert str(meta.user_ids.type) == "string"
    assert meta.popularity.sum() == sum(len(s) for s in c.seen.values())
    for u, items in c.seen.items():
        assert set(meta.seen_items[meta.seen_indptr[u]:meta.seen_indptr[u + 1]].tolist()) == items
    with pytest.raises(NcfError, match="per-pair graph"):
        mf.decode_metadata(pair, source="model.pair.onnx", expect_graph="grid")
    tampered = dict(grid)
    tampered["ncf.vocab_hash"] = "0" * 64
    with pytest.raises(NcfError, match="hash"):
        mf.decode_metadata(tampered, source="x")
    with pytest.raises(NcfError, match="format version"):
        mf.decode_metadata({**grid, "ncf.format_version": "99"}, source="x")


def test_int_ids_keep_int64():
    c = case("neumf", "int")
    meta = mf.decode_metadata(pair_session(c.grid).get_modelmeta().custom_metadata_map, source="x")
    assert str(meta.user_ids.type) == "int64" and meta.item_ids.to_pylist() == c.item_ids


@pytest.mark.parametrize("kind", KINDS + ["neumf-odd", "mlp-one"])
@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "plain"])
def test_grid_topk_equals_brute_force_over_pair_scores(kind, exclude_seen, fuse):
    c = case(kind)
    users = np.arange(len(c.user_ids))
    k = 12
    with GridScorer(c.grid, device="cpu", chunk_users=3, fuse=fuse) as sc:  # 40 users: last chunk padded
        res = sc.topk(users, k, exclude_seen=exclude_seen)
        # every grid graph gets the fused masking + top-k; ReLU towers also the fused tower
        assert sc.fused == (fuse and oplib.library().path is not None)
        tower = kind in ("mlp", "neumf", "neumf-odd", "mlp-one")
        assert ("ReluTower" in sc.kernel_note) == (sc.fused and tower)
    ref = brute_force_topk(c, users, k, exclude_seen=exclude_seen)
    for u, (items, score, logit) in zip(users, ref):
        np.testing.assert_array_equal(res.items[u], items)
        assert np.abs(res.scores[u] - score).max() <= 1e-5
        assert np.abs(res.logits[u] - logit).max() <= 1e-5 * max(1.0, np.abs(logit).max())
        if exclude_seen:
            assert not set(res.items[u].tolist()) & c.seen[int(u)]


@pytest.mark.parametrize("kind", ["gmf", "neumf", "fused", "mlp"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "plain"])
def test_equal_scores_come_out_by_item_index(kind, fuse):
    c = case(kind, n_users=10, n_items=30, dup_items=True)  # item j == item j + 15
    users = np.arange(10)
    with GridScorer(c.grid, device="cpu", chunk_users=4, fuse=fuse) as sc:
        res = sc.topk(users, 30, exclude_seen=False)
    ref = brute_force_topk(c, users, 30, exclude_seen=False)
    for u, (items, _, logit) in zip(users, ref):
        np.testing.assert_array_equal(res.items[u], items)
        top = res.items[u]
        # exact ties exist and the lower item index wins every one of them
        assert (res.logits[u][0::2] == res.logits[u][1::2]).all()
        assert (top[0::2] + 15 == top[1::2]).all()


def test_export_verifies_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    c = case("gmf")
    def broken(*a, **kw):
        raise NcfError("per-pair ONNX graph differs from torch")
    monkeypatch.setattr(ox, "verify_pair", broken)
    with pytest.raises(NcfError, match="differs"):
        ox.export_model(c.model_dir, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_summary_and_default_pair_name(tmp_path):
    c = case("mlp")
    s = ox.export_model(c.model_dir, tmp_path / "out.onnx")
    assert s["pair"] == str(tmp_path / "out.pair.onnx") and s["grid"] == str(tmp_path / "out.onnx")
    assert s["kind"] == "mlp" and s["opset"] == 18 and s["n_users"] == 40 and s["n_items"] == 60
    assert 0 <= s["max_abs_diff"] <= 1e-5
    assert s["pair_check"]["batches"] == [1, 7, 4097]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.pair.onnx"]


def test_export_bad_model_dir(tmp_path):
    with pytest.raises(NcfError, match="not found"):
        ox.export_model(tmp_path / "nope", tmp_path / "model.onnx")
    (tmp_path / "half").mkdir()
    with pytest.raises(NcfError, match="missing"):
        ox.export_model(tmp_path / "half", tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]


def test_grid_verification_catches_a_wrong_graph(monkeypatch):
    c = case("neumf")
    proto = ox.grid_graph(c.model)
    for t in proto.graph.initializer:  # corrupt one weight of the item half
        if t.name == "item_mlp":
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0] += 0.5
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    with pytest.raises(NcfError, match="grid ONNX graph differs"):
        ox.verify_grid(c.model, proto.SerializeToString())


@pytest.mark.parametrize("kind", ["mlp", "neumf"])
def test_pair_graph_rejects_indices_outside_the_vocabulary(kind):
    """With users and items stacked in one MLP table, user n_users would read item 0's row and
    ONNX Gather wraps negative indices: the per-pair graph must reject both instead."""
    c = case(kind)
    sess = pair_session(c.pair)
    n_u, n_i = len(c.user_ids), len(c.item_ids)
    ok = {"user": np.array([0, n_u - 1]), "item": np.array([n_i - 1, 0])}
    assert np.isfinite(sess.run(["logit"], ok)[0]).all()
    for user, item in ((n_u, 0), (-1, 0), (0, n_i), (0, -1)):
        with pytest.raises(Exception, match="out of|indices"):
            sess.run(["logit"], {"user": np.array([user]), "item": np.array([item])})
