"""`ncf score` (batch.score_users / GridScorer): results, policies, bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import io as bio
from batch.score import score_users
from batch.scorer import GridScorer, VocabLookup
from ncf.errors import NcfError
from tests.onnx_helpers import brute_force_topk, case

K = 5


def write_users(path, values, name="user_id", dtype=None):
    pl.DataFrame({name: pl.Series(values, dtype=dtype)}).write_parquet(path)
    return path


def read(path) -> pl.DataFrame:
    return pl.read_parquet(path)


def only_output(tmp_path, out):
    """The output file and the inputs are all that is left: no temporary files."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == out.name)


@pytest.fixture
def int_case():
    return case("neumf", "int")


@pytest.fixture
def str_case():
    return case("neumf", "str")


def check_against_brute_force(c, df, users_idx, k, *, exclude_seen=True, candidates=None):
    ref = brute_force_topk(c, np.asarray(users_idx), k, exclude_seen=exclude_seen, candidates=candidates)
    for u, (items, score, _) in zip(users_idx, ref):
        rows = df.filter(pl.col("user_id") == c.user_ids[u]).sort("rank")
        assert rows["item_id"].to_list() == [c.item_ids[i] for i in items]
        assert np.abs(rows["score"].to_numpy() - score).max() <= 1e-5


def test_scores_every_user_top_k_with_schema_and_order(tmp_path, int_case):
    c = int_case
    users = list(range(len(c.user_ids)))[::-1]  # any order
    up = write_users(tmp_path / "users.parquet", [c.user_ids[u] for u in users], dtype=pl.Int64)
    out = tmp_path / "topn.parquet"
    s = score_users(c.grid, up, out, k=K, device="cpu", progress=False, chunk_users=3)
    df = read(out)
    schema = pq.read_schema(out)
    assert [(f.name, str(f.type)) for f in schema] == [("user_id", "int64"), ("rank", "int32"), ("item_id", "int64"), ("score", "float")]
    assert df.height == len(users) * K == s["rows"]
    assert s["users_scored"] == len(users) and s["unknown_users"] == 0 and s["provider"] == "CPUExecutionProvider"
    assert s["pairs_per_s"] > 0 and s["users_per_s"] > 0 and "users scored" in s["line"]
    assert df["user_id"].unique().len() == len(users)
    by_user = df.group_by("user_id", maintain_order=True).agg(pl.col("rank"), pl.col("score"), pl.col("item_id"))
    assert by_user["user_id"].to_list() == [c.user_ids[u] for u in users]  # input order kept
    for ranks, scores in zip(by_user["rank"], by_user["score"]):
        assert ranks.to_list() == list(range(1, K + 1))
        sc = scores.to_numpy()
        assert (np.diff(sc) <= 0).all() and (sc >= 0).all() and (sc <= 1).all()
    idx_of_item = {v: i for i, v in enumerate(c.item_ids)}
    for uid, items in zip(by_user["user_id"], by_user["item_id"]):
        u = c.user_ids.index(uid)
        assert not {idx_of_item[i] for i in items.to_list()} & c.seen[u]  # seen items excluded
    check_against_brute_force(c, df, [0, 7, 39], K)
    assert only_output(tmp_path, out) == ["topn.parquet"]


def test_include_seen_keeps_seen_items(tmp_path, int_case):
    c = int_case
    up = write_users(tmp_path / "u.parquet", c.user_ids[:10], dtype=pl.Int64)
    out = tmp_path / "o.parquet"
    score_users(c.grid, up, out, k=20, include_seen=True, device="cpu", progress=False)
    df = read(out)
    check_against_brute_force(c, df, range(10), 20, exclude_seen=False)
    idx_of_item = {v: i for i, v in enumerate(c.item_ids)}
    hits = sum(len({idx_of_item[i] for i in df.filter(pl.col("user_id") == c.user_ids[u])["item_id"]} & c.seen[u]) for u in range(10))
    assert hits > 0


def test_string_ids_and_items_restriction(tmp_path, str_case):
    c = str_case
    up = write_users(tmp_path / "users.parquet", c.user_ids[:12])
    cand = np.arange(0, 60, 3)
    ip = tmp_path / "items.parquet"
    pl.DataFrame({"itemId": [c.item_ids[i] for i in cand] + ["no-such-item", c.item_ids[0]]}).write_parquet(ip)
    out = tmp_path / "o.parquet"
    s = score_users(c.grid, up, out, k=K, items_path=ip, device="cpu", progress=False)
    assert s["candidates"] == len(cand) and s["unknown_items"] == 1
    df = read(out)
    assert df.schema["user_id"] == pl.String and df.schema["item_id"] == pl.String
    assert set(df["item_id"]) <= {c.item_ids[i] for i in cand}
    check_against_brute_force(c, df, range(12), K, candidates=cand)


def test_unknown_users_popular_fallback_and_skip(tmp_path, int_case):
    c = int_case
    unknown = [123, 456]
    up = write_users(tmp_path / "u.parquet", [c.user_ids[0], 123, c.user_ids[1], 456, 123], dtype=pl.Int64)
    out = tmp_path / "pop.parquet"
    s = score_users(c.grid, up, out, k=K, device="cpu", progress=False)
    assert s["unknown_users"] == 2 and s["users_scored"] == 2 and s["duplicate_users"] == 1
    df = read(out)
    assert df.height == 4 * K
    fallback = df.filter(pl.col("user_id").is_in(unknown))
    assert fallback["score"].null_count() == fallback.height == 2 * K
    pop = np.bincount([i for s_ in c.seen.values() for i in s_], minlength=len(c.item_ids))
    want = [c.item_ids[i] for i in np.lexsort((np.arange(len(pop)), -pop))[:K]]
    for uid in unknown:
        rows = fallback.filter(pl.col("user_id") == uid).sort("rank")
        assert rows["item_id"].to_list() == want and rows["rank"].to_list() == list(range(1, K + 1))
    assert df.filter(~pl.col("user_id").is_in(unknown))["score"].null_count() == 0

    out2 = tmp_path / "skip.parquet"
    s = score_users(c.grid, up, out2, k=K, unknown="skip", device="cpu", progress=False)
    assert s["unknown_users"] == 2 and s["unknown_handling"] == "skipped"
    assert read(out2)["user_id"].to_list() == [c.user_ids[0]] * K + [c.user_ids[1]] * K

    only_unknown = write_users(tmp_path / "x.parquet", unknown, dtype=pl.Int64)
    out3 = tmp_path / "empty.parquet"
    s = score_users(c.grid, only_unknown, out3, k=K, unknown="skip", device="cpu", progress=False)
    assert s["rows"] == 0 and read(out3).height == 0 and pq.read_schema(out3).names == ["user_id", "rank", "item_id", "score"]


def test_duplicates_scored_once_and_column_spellings(tmp_path, int_case):
    c = int_case
    ids = [c.user_ids[3], c.user_ids[3], c.user_ids[4], c.user_ids[3]]
    up = tmp_path / "u.parquet"
    pl.DataFrame({"other": [1, 2, 3, 4], "userId": pl.Series(ids, dtype=pl.Int64)}).write_parquet(up)
    out = tmp_path / "o.parquet"
    s = score_users(c.grid, up, out, k=K, device="cpu", progress=False)
    assert s["duplicate_users"] == 2 and s["users_scored"] == 2 and read(out).height == 2 * K
    # the only column is taken whatever its name; narrower integer types cast losslessly
    up2 = write_users(tmp_path / "v.parquet", [c.user_ids[5]], name="whatever", dtype=pl.Int64)
    score_users(c.grid, up2, out, k=K, device="cpu", progress=False)
    assert read(out)["user_id"].to_list() == [c.user_ids[5]] * K


def test_users_directory_of_parts(tmp_path, int_case):
    c = int_case
    d = tmp_path / "users"
    d.mkdir()
    write_users(d / "part-0.parquet", c.user_ids[:3], dtype=pl.Int64)
    write_users(d / "part-1.parquet", c.user_ids[3:5], dtype=pl.Int64)
    out = tmp_path / "o.parquet"
    s = score_users(c.grid, d, out, k=K, device="cpu", progress=False)
    assert s["users_scored"] == 5 and set(read(out)["user_id"]) == set(c.user_ids[:5])


def test_fewer_rows_when_seen_items_leave_fewer_than_k(tmp_path):
    c = case("gmf", n_users=6, n_items=12, seen_per_user=9)
    up = write_users(tmp_path / "u.parquet", c.user_ids, dtype=pl.Int64)
    out = tmp_path / "o.parquet"
    s = score_users(c.grid, up, out, k=5, device="cpu", progress=False)
    df = read(out)
    assert df.height == 6 * 3 and s["users_short"] == 6  # 12 items - 9 seen = 3 left each
    assert df["score"].null_count() == 0 and df["rank"].max() == 3
    check_against_brute_force(c, df, range(6), 5)


def test_chunking_and_threads_do_not_change_results(int_case):
    c = int_case
    users = np.r_[np.arange(40), np.arange(40)[::-1], 5]
    ref = None
    for chunk, threads in [(1, 1), (3, 2), (7, 2), (64, 1)]:
        with GridScorer(c.grid, device="cpu", chunk_users=chunk, threads=threads) as sc:
            r = sc.topk(users, 10)
        if ref is None:
            ref = r
        np.testing.assert_array_equal(r.items, ref.items)
        # a different Gemm width may round the last bit differently, nothing more
        np.testing.assert_allclose(r.scores, ref.scores, rtol=0, atol=1e-6)


def test_scorer_from_bytes_equals_from_path(int_case):
    c = int_case
    a = GridScorer.from_path(c.grid, device="cpu").topk(np.arange(8), 7)
    b = GridScorer.from_bytes(c.grid.read_bytes(), device="cpu").topk(np.arange(8), 7)
    np.testing.assert_array_equal(a.items, b.items)
    with pytest.raises(NcfError, match=r"user indices must lie in \[0, 40\)"):
        GridScorer.from_path(c.grid, device="cpu").topk(np.array([40]), 3)


@pytest.mark.parametrize(
    ("vocab", "ids", "want"),
    [
        (pa.array([40, 7, 19, 3], pa.int64()), pa.array([7, 5, 3, None, 40, 41, 19, 7], pa.int64()), [1, -1, 3, -1, 0, -1, 2, 1]),
        (pa.array([2**63 + 5, 1], pa.uint64()), pa.array([1, 2**63 + 5, 5], pa.uint64()), [1, 0, -1]),
        (pa.array(["b", "a", "ä"]), pa.array(["a", None, "ä", "c", "b"]), [1, -1, 2, -1, 0]),
        (pa.array([], pa.int64()), pa.array([1, 2], pa.int64()), [-1, -1]),
        (pa.array([5], pa.int32()), pa.array([], pa.int32()), []),
    ],
)
def test_vocab_lookup_positions_and_unknowns(vocab, ids, want):
    assert VocabLookup(vocab)(ids).tolist() == want


def test_writer_streams_fixed_size_row_groups(tmp_path):
    schema = bio.topn_schema(pa.int64(), pa.string())
    out = tmp_path / "t.parquet"
    with bio.TopNWriter(out, schema, row_group_rows=1000) as w:
        for start in range(0, 3500, 300):
            n = min(300, 3500 - start)
            w.write(pa.array(np.arange(start, start + n)), np.ones(n), pa.array([f"i{j}" for j in range(n)]), np.full(n, 0.5, np.float32))
        assert not out.exists()  # only the temporary name exists until commit
        w.commit()
    md = pq.ParquetFile(out).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [1000, 1000, 1000, 500]
    assert pq.read_table(out).column("user_id").to_pylist() == list(range(3500))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "setup, match",
    [
        ("no_id_column", "has no user id column"),
        ("empty_users", "has no rows"),
        ("missing_users", "not found"),
        ("not_parquet_users", "cannot read user file"),
        ("string_ids_for_int_model", "ids are strings|model's user ids are int64"),
        ("fractional_ids", "without loss"),
        ("missing_items", "not found"),
        ("unknown_items_only", "none of the"),
        ("k_zero", "at least 1"),
        ("k_negative", "at least 1"),
        ("k_too_large", "larger than the number of candidate items"),
        ("k_too_large_for_items", "larger than the number of candidate items"),
        ("garbage_onnx", "cannot load"),
        ("missing_onnx", "not found"),
        ("foreign_onnx", "not one written by `ncf export`"),
        ("pair_onnx", "per-pair graph"),
        ("bad_unknown_policy", "unknown-user policy"),
        ("bad_device", "unknown device"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_no_output(tmp_path, int_case, setup, match):
    import onnx
    from onnx import TensorProto, helper

    c = int_case
    good_users = write_users(tmp_path / "users.parquet", c.user_ids[:4], dtype=pl.Int64)
    out = tmp_path / "topn.parquet"
    out.write_bytes(b"previous result")  # a failed run must not touch an existing output
    kw = {"model_path": c.grid, "users_path": good_users, "out": out, "k": K, "device": "cpu", "progress": False}
    if setup == "no_id_column":
        pl.DataFrame({"a": [1], "b": [2]}).write_parquet(tmp_path / "bad.parquet")
        kw["users_path"] = tmp_path / "bad.parquet"
    elif setup == "empty_users":
        kw["users_path"] = write_users(tmp_path / "empty.parquet", [], dtype=pl.Int64)
    elif setup == "missing_users":
        kw["users_path"] = tmp_path / "nope.parquet"
    elif setup == "not_parquet_users":
        (tmp_path / "text.parquet").write_text("user_id\n1\n")
        kw["users_path"] = tmp_path / "text.parquet"
    elif setup == "string_ids_for_int_model":
        kw["users_path"] = write_users(tmp_path / "s.parquet", [str(x) for x in c.user_ids[:2]])
    elif setup == "fractional_ids":
        kw["users_path"] = write_users(tmp_path / "f.parquet", [1.5, 2.0], dtype=pl.Float64)
    elif setup == "missing_items":
        kw["items_path"] = tmp_path / "items.parquet"
    elif setup == "unknown_items_only":
        kw["items_path"] = tmp_path / "items.parquet"
        pl.DataFrame({"item_id": [1, 2]}).write_parquet(kw["items_path"])
    elif setup == "k_zero":
        kw["k"] = 0
    elif setup == "k_negative":
        kw["k"] = -3
    elif setup == "k_too_large":
        kw["k"] = len(c.item_ids) + 1
    elif setup == "k_too_large_for_items":
        kw["items_path"] = tmp_path / "items.parquet"
        pl.DataFrame({"item_id": pl.Series(c.item_ids[:3], dtype=pl.Int64)}).write_parquet(kw["items_path"])
        kw["k"] = 4
    elif setup == "garbage_onnx":
        kw["model_path"] = tmp_path / "garbage.onnx"
        kw["model_path"].write_bytes(b"\x00not an onnx model at all" * 10)
    elif setup == "missing_onnx":
        kw["model_path"] = tmp_path / "model.onnx"
    elif setup == "foreign_onnx":
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        kw["model_path"] = tmp_path / "foreign.onnx"
        foreign = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        foreign.ir_version = 10
        onnx.save(foreign, kw["model_path"])
    elif setup == "pair_onnx":
        kw["model_path"] = c.pair
    elif setup == "bad_unknown_policy":
        kw["unknown"] = "guess"
    elif setup == "bad_device":
        kw["device"] = "tpu"
    with pytest.raises(NcfError, match=match) as err:
        score_users(**kw)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cuda_request_without_gpu_is_an_error(tmp_path, int_case):
    import onnxruntime as ort

    c = int_case
    try:
        sc = GridScorer(c.grid, device="cuda")
    except NcfError as exc:
        assert "cuda" in str(exc).lower() and "\n" not in str(exc)
    else:  # a machine where CUDA really attaches: then it must really run there
        assert sc.provider == "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers()
        return
    up = write_users(tmp_path / "u.parquet", c.user_ids[:2], dtype=pl.Int64)
    with pytest.raises(NcfError, match="cuda"):
        score_users(c.grid, up, tmp_path / "o.parquet", k=K, device="cuda", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.parquet"]
    auto = GridScorer(c.grid, device="auto")
    assert auto.provider == "CPUExecutionProvider" and auto.device_note  # auto says what ran


def test_batch_package_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys; import batch.score, batch.scorer, batch.io, batch.modelfile; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'ncf.models', 'ncf.checkpoint', 'export'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
