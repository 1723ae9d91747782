"""A battery of bad inputs through the real CLI (`fit`, `export`, `evaluate`, `score`).

Every case asserts: exit code 1 and exactly one line on stderr, starting with `error: `, that
says what was wrong (a substring checked here); no traceback; and nothing left behind: the
working directory (where every command writes by default) holds exactly the same files,
hidden ones included, before and after. Usage errors exit 2, as Typer does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from ncf.cli import app
from tests.onnx_helpers import case

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def csv(d: Path, text: str, name: str = "data.csv") -> str:
    (d / name).write_text(text)
    return name


def users(d: Path, values, dtype=None, name: str = "users.parquet", column: str = "user_id") -> str:
    pl.DataFrame({column: pl.Series(values, dtype=dtype)}).write_parquet(d / name)
    return name


def model_dir(d: Path) -> str:
    shutil.copytree(case().model_dir, d / "m")
    return "m"


def onnx_model(d: Path) -> str:
    shutil.copy(case().grid, d / "in.onnx")
    return "in.onnx"


def truncated(src: Path, dst: Path, keep: float = 0.5) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def good_users(d: Path) -> str:
    return users(d, case().user_ids[:5], pl.Int64)


def score_args(d: Path, *extra: str, users_file: str | None = None, model: str | None = None) -> list[str]:
    return ["score", "--users", users_file or good_users(d), "--model", model or onnx_model(d),
            "--k", "5", "--device", "cpu", "--no-progress", *extra]


def onnx_with_metadata(d: Path, edit) -> str:
    import onnx

    proto = onnx.load(str(case().grid))
    props = {p.key: p.value for p in proto.metadata_props}
    edit(props)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(d / "edited.onnx"))
    return "edited.onnx"


def foreign_onnx(d: Path) -> str:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, str(d / "foreign.onnx"))
    return "foreign.onnx"


def other_version(d: Path) -> str:
    import torch

    m = model_dir(d)
    cfg = json.loads((d / m / "config.json").read_text())
    cfg["format_version"] = 99
    (d / m / "config.json").write_text(json.dumps(cfg))
    state = torch.load(d / m / "weights.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, d / m / "weights.pt")
    return m


def pickled_module(d: Path) -> str:
    import torch

    m = model_dir(d)
    torch.save(torch.nn.Linear(2, 2), d / m / "weights.pt")  # a pickled module: must never load
    return m


def with_file(d: Path, rel: str, data: bytes | None) -> str:
    m = model_dir(d)
    if data is None:
        (d / m / rel).unlink()
    else:
        (d / m / rel).write_bytes(data)
    return m


def mixed_type_parts(d: Path) -> str:
    (d / "parts").mkdir()
    users(d / "parts", case().user_ids[:3], pl.Int64, name="a.parquet")
    users(d / "parts", ["x", "y"], name="b.parquet")
    return "parts"


def items_file(d: Path, values, dtype=None) -> str:
    pl.DataFrame({"item_id": pl.Series(values, dtype=dtype)}).write_parquet(d / "items.parquet")
    return "items.parquet"


def blocker(d: Path) -> str:
    (d / "blocker").write_text("a file where a directory is needed")
    return "blocker"


FIT = ["--epochs", "1", "--sgd-epochs", "1", "--model", "gmf"]

# (id, build(d) -> argv, expected substring of the one-line message)
CASES = [
    # ---- fit
    ("fit-missing-file", lambda d: ["fit", "nope.csv"], "not found"),
    ("fit-path-is-directory", lambda d: (d / "dir.csv").mkdir() or ["fit", "dir.csv"], "is a directory"),
    ("fit-empty-file", lambda d: ["fit", csv(d, "")], "is empty"),
    ("fit-header-only", lambda d: ["fit", csv(d, "user_id,item_id\n")], "no rows"),
    ("fit-malformed-csv", lambda d: ["fit", csv(d, 'user_id,item_id\n1,2\n"3,4\n')], "cannot parse"),
    ("fit-ragged-rows", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\n3,4,5,6\n")], "cannot parse"),
    ("fit-wrong-separator", lambda d: ["fit", csv(d, "user_id,item_id\n1\t2\n3\t4\n")], "separated by ',' but the rows by tabs"),
    ("fit-null-ids", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\n,3\n4,5\n")], "empty user id"),
    ("fit-mixed-type-ids", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\nabc,3\n4,5\n")], "mix numbers"),
    ("fit-nan-ids", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\nnan,3\n4,5\n")], "missing user id"),
    ("fit-fractional-ids", lambda d: ["fit", csv(d, "user_id,item_id\n1.5,2\n2,3\n")], "fractional"),
    ("fit-ids-beyond-int64", lambda d: ["fit", csv(d, "user_id,item_id\n99999999999999999999999,2\n1,3\n")], "64-bit"),
    ("fit-no-id-columns", lambda d: ["fit", csv(d, "a,b\nx,y\n")], "no recognisable user/item columns"),
    ("fit-truncated-parquet", lambda d: (
        pl.DataFrame({"user_id": list(range(50)), "item_id": list(range(50))}).write_parquet(d / "full.parquet"),
        truncated(d / "full.parquet", d / "data.parquet"), ["fit", "data.parquet"])[-1], "cannot read Parquet"),
    ("fit-epochs-zero", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\n"), "--epochs", "0"], "--epochs must be at least 1"),
    ("fit-threads-zero", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\n"), "--threads", "0"], "--threads must be at least 1"),
    ("fit-unknown-model-kind", lambda d: ["fit", csv(d, "user_id,item_id\n1,2\n"), "--model", "svd"], "--model must be"),
    ("fit-unwritable-out", lambda d: ["fit", "../data/fit.csv", "--out", f"{blocker(d)}/m", *FIT], "cannot write the model directory"),
    # ---- export
    ("export-missing-model-dir", lambda d: ["export", "-m", "nope"], "not found"),
    ("export-model-dir-is-a-file", lambda d: ["export", "-m", csv(d, "x", "m.txt")], "is a file, not a model directory"),
    ("export-incomplete-model-dir", lambda d: ["export", "-m", with_file(d, "weights.pt", None)], "missing weights.pt"),
    ("export-model-dir-other-version", lambda d: ["export", "-m", other_version(d)], "another ncf version"),
    ("export-truncated-weights", lambda d: ["export", "-m", with_file(
        d, "weights.pt", (case().model_dir / "weights.pt").read_bytes()[:300])], "cannot read model"),
    ("export-pickled-module", lambda d: ["export", "-m", pickled_module(d)], "cannot read model"),
    ("export-damaged-vocabulary", lambda d: ["export", "-m", with_file(d, "users.parquet", b"PAR1garbage")], "cannot read model"),
    ("export-out-is-directory", lambda d: (d / "out.onnx").mkdir() or ["export", "out.onnx", "-m", model_dir(d)], "is a directory"),
    ("export-unwritable-out", lambda d: ["export", f"{blocker(d)}/model.onnx", "-m", model_dir(d)], "is a file, not a directory"),
    # ---- evaluate
    ("evaluate-missing-model-dir", lambda d: ["evaluate", "nope"], "nope"),
    ("evaluate-k-zero", lambda d: ["evaluate", model_dir(d), "--k", "0"], "--k must be at least 1"),
    ("evaluate-one-test-file", lambda d: ["evaluate", model_dir(d), "--test-rating", csv(d, "0\t1\t5\t0\n", "t.rating")], "give both"),
    ("evaluate-no-metrics", lambda d: ["evaluate", model_dir(d)], "no metrics"),
    ("evaluate-damaged-metrics", lambda d: ["evaluate", with_file(d, "metrics.json", b"{not json")], "cannot read"),
    ("evaluate-test-file-missing", lambda d: ["evaluate", model_dir(d), "--test-rating", "no.rating",
                                              "--test-negative", "no.negative"], "not found"),
    # ---- score: the users file
    ("score-users-missing", lambda d: score_args(d, users_file="nope.parquet"), "not found"),
    ("score-users-empty-directory", lambda d: (d / "udir").mkdir() or score_args(d, users_file="udir"), "holds no Parquet files"),
    ("score-users-header-only", lambda d: score_args(d, users_file=users(d, [], pl.Int64, "e.parquet")), "has no rows"),
    ("score-users-truncated-parquet", lambda d: (
        truncated(d / good_users(d), d / "t.parquet", 0.7), score_args(d, users_file="t.parquet"))[-1], "cannot read user file"),
    ("score-users-csv-not-parquet", lambda d: score_args(d, users_file=csv(d, "user_id\n1\n", "u.parquet")), "cannot read user file"),
    ("score-users-null-ids", lambda d: score_args(d, users_file=users(d, [case().user_ids[0], None], pl.Int64, "n.parquet")), "null ids"),
    ("score-users-mixed-types", lambda d: score_args(d, users_file=mixed_type_parts(d)), "more than one type"),
    ("score-users-wrong-id-type", lambda d: score_args(d, users_file=users(d, ["a", "b"], None, "s.parquet")),
     "but the model's user ids are int64"),
    ("score-users-fractional-ids", lambda d: score_args(d, users_file=users(d, [1.5], pl.Float64, "f.parquet")), "without loss"),
    ("score-users-no-id-column", lambda d: (pl.DataFrame({"a": [1], "b": [2]}).write_parquet(d / "ab.parquet"),
                                            score_args(d, users_file="ab.parquet"))[-1], "has no user id column"),
    # ---- score: k, candidates, sizes, policies
    ("score-k-zero", lambda d: score_args(d, "--k", "0"), "at least 1"),
    ("score-k-beyond-candidates", lambda d: score_args(d, "--k", "61"), "larger than the number of candidate items"),
    ("score-empty-candidate-set", lambda d: score_args(d, "--items", items_file(d, [], pl.Int64)), "candidate set is empty"),
    ("score-unknown-candidates", lambda d: score_args(d, "--items", items_file(d, [1, 2], pl.Int64)), "none of the"),
    ("score-chunk-users-zero", lambda d: score_args(d, "--chunk-users", "0"), "at least 1 user"),
    ("score-chunk-users-huge", lambda d: score_args(d, "--chunk-users", "100000000"), "too much memory"),
    ("score-unknown-policy", lambda d: score_args(d, "--unknown", "guess"), "unknown-user policy"),
    ("score-unknown-device", lambda d: score_args(d, "--device", "tpu"), "unknown device"),
    ("score-unknown-engine", lambda d: score_args(d, "--engine", "spark"), "--engine must be local or ray"),
    # ---- score: the model file
    ("score-model-missing", lambda d: score_args(d, model="model.onnx"), "not found"),
    ("score-model-is-directory", lambda d: (d / "dir.onnx").mkdir() or score_args(d, model="dir.onnx"), "is a directory"),
    ("score-model-truncated", lambda d: (truncated(case().grid, d / "t.onnx"), score_args(d, model="t.onnx"))[-1], "cannot load"),
    ("score-model-not-onnx", lambda d: score_args(d, model=csv(d, "user_id,item_id\n", "x.onnx")), "cannot load"),
    ("score-model-foreign-onnx", lambda d: score_args(d, model=foreign_onnx(d)), "not one written by `ncf export`"),
    ("score-model-pair-graph", lambda d: (shutil.copy(case().pair, d / "p.onnx"), score_args(d, model="p.onnx"))[-1], "per-pair graph"),
    ("score-model-other-version", lambda d: score_args(
        d, model=onnx_with_metadata(d, lambda p: p.update({"ncf.format_version": "7"}))), "format version"),
    ("score-model-vocab-mismatch", lambda d: score_args(
        d, model=onnx_with_metadata(d, lambda p: p.update({"ncf.vocab_hash": "0" * 64}))), "vocabulary hash mismatch"),
    # ---- score: the output location
    ("score-out-is-directory", lambda d: (d / "topn.parquet").mkdir() or score_args(d), "is a directory"),
    ("score-out-unwritable", lambda d: score_args(d, "--out", f"{blocker(d)}/topn.parquet"), "is a file, not a directory"),
    ("score-out-is-the-users-file", lambda d: score_args(d, "--out", "users.parquet"), "would replace it"),
]


def snapshot(root: Path) -> dict:
    """Every file and directory under root (files with size and mtime); a directory's own
    mtime is left out: a run may create and remove its temporaries, it must not leave them."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fit_csv(tmp_path_factory):
    from ncf.synthetic import write_demo_csv

    d = tmp_path_factory.mktemp("data")
    write_demo_csv(d / "fit.csv", n_users=40, n_items=50, seed=1)
    return d


def test_battery_has_enough_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
    assert {c[0].split("-")[0] for c in CASES} == {"fit", "export", "evaluate", "score"}


@pytest.mark.parametrize("name,build,message", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input(tmp_path, monkeypatch, fit_csv, name, build, message):
    work = tmp_path / "work"
    work.mkdir()
    if name == "fit-unwritable-out":  # ../data/fit.csv relative to the working directory
        shutil.copytree(fit_csv, tmp_path / "data")
    monkeypatch.chdir(work)
    argv = build(work)
    before = snapshot(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    err = result.stderr
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # no output, no temporary or hidden file, inputs untouched


@pytest.mark.parametrize("argv", [
    ["score"],  # --users is required
    ["score", "--users", "u.parquet", "--k", "five"],
    ["fit", "data.csv", "--epochs", "many"],
    ["export", "--no-such-option"],
    ["evaluate", "--k"],
], ids=["score-no-users", "score-k-not-int", "fit-epochs-not-int", "export-unknown-option", "evaluate-missing-value"])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fit", "nope.csv", "--verbose"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "NcfError"


def test_duplicate_and_unknown_users_are_policies_not_errors(tmp_path, monkeypatch):
    """Duplicates are scored once and counted; unknown users get the popular items (or
    nothing with --unknown skip) and are counted: a warning in the summary, not a crash."""
    c = case()
    monkeypatch.chdir(tmp_path)
    users(tmp_path, [c.user_ids[0], 12345, c.user_ids[0], c.user_ids[1], 12345], pl.Int64)
    shutil.copy(c.grid, tmp_path / "model.onnx")
    result = runner.invoke(app, ["score", "--users", "users.parquet", "--k", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 users scored, 1 unknown" in result.stdout
    df = pl.read_parquet(tmp_path / "topn.parquet")
    assert df["user_id"].to_list() == [c.user_ids[0]] * 3 + [12345] * 3 + [c.user_ids[1]] * 3  # first-occurrence order
    assert df.filter(pl.col("user_id") == 12345)["score"].null_count() == 3
    assert np.all(df.filter(pl.col("user_id") != 12345)["score"].is_not_null().to_numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "topn.parquet", "users.parquet"]
