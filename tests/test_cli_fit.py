"""`ncf fit` / `ncf evaluate` end to end through the real CLI (Typer's CliRunner)."""

import json

import pytest
from typer.testing import CliRunner

from ncf.cli import app
from ncf.synthetic import write_demo_csv

runner = CliRunner()
FAST = ["--epochs", "2", "--sgd-epochs", "1"]


@pytest.fixture
def tiny_csv(tmp_path):
    return write_demo_csv(tmp_path / "data.csv", n_users=60, n_items=80, seed=3)


def test_fit_writes_a_complete_model_dir(tmp_path, tiny_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fit", "data.csv", *FAST])
    assert result.exit_code == 0, result.output
    md = tmp_path / "ncf-model"
    assert sorted(p.name for p in md.iterdir()) == [
        "config.json", "interactions.parquet", "items.parquet", "metrics.json", "users.parquet", "weights.pt"]
    metrics = json.loads((md / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["itempop", "gmf", "mlp", "neumf", "neumf-sgd"]
    assert metrics["selected"] in metrics["stages"]
    for stage in metrics["stages"].values():
        assert 0.0 <= stage["test"]["hr@10"] <= 1.0 and 0.0 <= stage["test"]["full_ndcg@10"] <= 1.0
    assert metrics["n_eval_users"] == 60
    assert "test metrics" in result.output
    # `ncf evaluate` prints the stored table
    shown = runner.invoke(app, ["evaluate"])
    assert shown.exit_code == 0 and "neumf-sgd" in shown.output


@pytest.mark.parametrize("model", ["gmf", "mlp", "fused"])
def test_fit_single_model_paths(tmp_path, tiny_csv, model):
    out = tmp_path / f"m-{model}"
    result = runner.invoke(app, ["fit", str(tiny_csv), "--model", model, "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["kind"] == model and config["selected_stage"] == model


def test_no_pretrain_neumf(tmp_path, tiny_csv):
    out = tmp_path / "m"
    result = runner.invoke(app, ["fit", str(tiny_csv), "--no-pretrain", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["selected_stage"] == "neumf-scratch"


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("", "is empty"),
    ("user_id,item_id\n", "no rows"),
    ("a,b\nx,y\n", "no recognisable user/item columns"),
    ("user_id,item_id\n1,2\n1,3\n2,2\n", "too few interactions"),
    ('user_id,item_id\n1,2\n"3,4\n', "cannot parse"),
])
def test_bad_input_one_line_exit_1_nothing_written(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "data.csv").write_text(content)
    result = runner.invoke(app, ["fit", "data.csv"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "ncf-model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ncf-model")]


def test_bad_option_values(tmp_path, tiny_csv):
    result = runner.invoke(app, ["fit", str(tiny_csv), "--epochs", "0", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "--epochs must be at least 1" in result.output
    assert not (tmp_path / "m").exists()
