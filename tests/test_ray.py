"""`ncf score --engine ray` (batch.ray_engine): the same rows as the local engine, on a local
2-CPU Ray instance shared by this module's tests (Ray starts in several seconds).

Marked `ray`: deselect with `-m "not ray"`; skipped when Ray is not installed. The resource
planner and the argument checks run without Ray."""

from __future__ import annotations

import sys
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch import ray_engine as re_
from batch.ray_engine import Plan, plan_resources, score_users_ray
from batch.score import score_users
from ncf.cli import app
from ncf.errors import NcfError
from tests.onnx_helpers import case


def ray_test(fn):
    """Marked `ray`; Ray Data's own deprecation warnings (from copying its context) hidden."""
    return pytest.mark.ray(pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data")(fn))


@pytest.fixture(scope="module")
def ray2():
    """One local Ray instance with 2 CPUs for the module; score_users_ray reuses it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_users(path, values, dtype=None):
    pl.DataFrame({"user_id": pl.Series(values, dtype=dtype)}).write_parquet(path)
    return path


def read_sorted(path) -> pl.DataFrame:
    src = f"{path}/*.parquet" if path.is_dir() else path
    return pl.read_parquet(src).sort("user_id", "rank")


def assert_same_rows(local: pl.DataFrame, ray: pl.DataFrame) -> None:
    assert local.height == ray.height and local.schema == ray.schema
    for col in ("user_id", "rank", "item_id"):
        assert local[col].to_list() == ray[col].to_list(), col
    a, b = local["score"], ray["score"]
    assert a.is_null().to_list() == b.is_null().to_list()
    if a.drop_nulls().len():
        assert np.abs(a.drop_nulls().to_numpy() - b.drop_nulls().to_numpy()).max() <= 1e-6


def no_leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@ray_test
def test_standalone_run_starts_and_stops_its_own_ray(tmp_path):
    """Without a Ray session in the process (the CLI's case) the function starts a local
    instance and shuts it down. Every user here is unknown and skipped, so no actor starts:
    the output is one empty part with the schema, and it replaces a previous output."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():  # pragma: no cover - only when run after the shared instance
        ray.shutdown()
    c = case("neumf", "int")
    up = write_users(tmp_path / "u.parquet", [1, 2, 1], pl.Int64)
    out = tmp_path / "topn"
    out.mkdir()
    pq.write_table(pl.DataFrame({"user_id": [9], "rank": [1], "item_id": [4], "score": [0.5]}).to_arrow(),
                   out / "old-part.parquet")  # an earlier output: replaced
    s = score_users_ray(c.grid, up, out, k=3, unknown="skip", device="cpu")
    assert s["ray_started"] and not ray.is_initialized() and s["startup_seconds"] > 0
    assert s["rows"] == 0 and s["unknown_users"] == 2 and s["duplicate_users"] == 1 and s["files"] == 1
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    assert pq.read_table(out / "part-00000.parquet").schema.names == ["user_id", "rank", "item_id", "score"]
    assert no_leftovers(tmp_path) == []


@ray_test
def test_ray_equals_local_row_for_row(tmp_path, ray2):
    c = case("neumf", "int")
    rng = np.random.default_rng(3)
    # every known user, some twice (within and across blocks), and unknown ids (one repeated)
    users = [c.user_ids[i] for i in rng.permutation(len(c.user_ids))]
    users += [c.user_ids[i] for i in rng.integers(0, len(c.user_ids), 15)] + [7, 8, 7]
    up = write_users(tmp_path / "users.parquet", users, pl.Int64)
    local = score_users(c.grid, up, tmp_path / "local.parquet", k=7, device="cpu", progress=False, chunk_users=3)
    out = tmp_path / "topn"
    s = score_users_ray(c.grid, up, out, k=7, device="cpu", chunk_users=3, actors=2, block_users=6)
    assert_same_rows(read_sorted(tmp_path / "local.parquet"), read_sorted(out))
    part = next(out.glob("*.parquet"))
    assert pq.read_schema(part).equals(pq.read_schema(tmp_path / "local.parquet"))  # nullability too
    for key in ("users_in", "users_scored", "unknown_users", "duplicate_users", "users_short", "rows", "candidates"):
        assert s[key] == local[key], key
    assert s["actors"] == 2 and s["cpus_per_actor"] == 0.75 and s["blocks"] == 7 and not s["ray_started"]
    assert s["startup_seconds"] >= 0 and s["pairs_per_s"] > 0 and "on Ray, 2 actors" in s["line"]
    assert no_leftovers(tmp_path) == []


@ray_test
def test_cli_engine_ray_items_short_users_and_skip(tmp_path, ray2, monkeypatch):
    """Through the real CLI: string ids, a candidate list so small that users run short of
    k unseen items, unknown users skipped."""
    c = case("neumf", "str")
    write_users(tmp_path / "users.parquet", c.user_ids[::-1] + ["nobody", c.user_ids[0]])
    ip = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [c.item_ids[i] for i in range(0, 60, 5)] + ["no-such-item"]}).write_parquet(ip)
    monkeypatch.chdir(tmp_path)
    common = ["score", "--users", "users.parquet", "--model", str(c.grid), "--k", "10", "--items", "items.parquet",
              "--unknown", "skip", "--device", "cpu", "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(app, [*common, "--out", "local.parquet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*common, "--out", "topn", "--engine", "ray", "--actors", "1"])
    assert res.exit_code == 0, res.output
    assert "on Ray, 1 actor x (1.5 CPU, 2 threads)" in res.output and "1 unknown (skipped)" in res.output
    local, ray = read_sorted(tmp_path / "local.parquet"), read_sorted(tmp_path / "topn")
    assert_same_rows(local, ray)
    assert ray.group_by("user_id").len()["len"].min() < 10  # some users were short of candidates
    assert no_leftovers(tmp_path) == []


@ray_test
def test_impossible_configs_are_refused_quickly(tmp_path, ray2):
    c = case("neumf", "int")
    up = write_users(tmp_path / "u.parquet", c.user_ids[:5], pl.Int64)
    t = time.perf_counter()
    with pytest.raises(NcfError, match=r"2 actors x 1 CPU cannot all run .* would hang. Use --actors 1"):
        score_users_ray(c.grid, up, tmp_path / "o", k=3, actors=2, cpus_per_actor=1, device="cpu")
    with pytest.raises(NcfError, match="does not fit any node"):
        score_users_ray(c.grid, up, tmp_path / "o", k=3, cpus_per_actor=2, device="cpu")
    if not ray2.cluster_resources().get("GPU"):
        with pytest.raises(NcfError, match="no GPUs"):
            score_users_ray(c.grid, up, tmp_path / "o", k=3, gpus_per_actor=1)
        with pytest.raises(NcfError, match="--device cuda needs GPU actors"):
            score_users_ray(c.grid, up, tmp_path / "o", k=3, device="cuda")
    assert time.perf_counter() - t < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.parquet"]


@ray_test
def test_an_error_inside_an_actor_is_one_line(tmp_path, ray2, monkeypatch):
    """A GPU actor whose CUDA provider does not attach: the actor's NcfError reaches the
    driver as one line, and no output is left."""
    if ray2.cluster_resources().get("GPU"):
        pytest.skip("a GPU is present: CUDA may attach")
    c = case("neumf", "int")
    up = write_users(tmp_path / "u.parquet", c.user_ids[:5], pl.Int64)
    monkeypatch.setattr(re_, "plan_resources", lambda *a, **kw: Plan(1, 1.0, 0.0, 1, "cuda"))
    with pytest.raises(NcfError, match=r"^scoring on Ray failed: --device cuda: ") as err:
        score_users_ray(c.grid, up, tmp_path / "o", k=3)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.parquet"]


# ---------------------------------------------------------------- without Ray
def test_without_ray_says_how_to_install(tmp_path, monkeypatch):
    c = case("neumf", "int")
    up = write_users(tmp_path / "u.parquet", c.user_ids[:3], pl.Int64)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(NcfError, match=r"pip install 'ncf\[ray\]'"):
        score_users_ray(c.grid, up, tmp_path / "o", k=3)


def test_output_must_be_a_directory_of_parts(tmp_path):
    c = case("neumf", "int")
    up = write_users(tmp_path / "u.parquet", c.user_ids[:3], pl.Int64)
    (tmp_path / "topn.parquet").write_bytes(b"a local engine's output")
    with pytest.raises(NcfError, match="exists and is a file"):
        score_users_ray(c.grid, up, tmp_path / "topn.parquet", k=3)
    with pytest.raises(NcfError, match="would replace the input"):
        score_users_ray(c.grid, up, up, k=3)
    with pytest.raises(NcfError, match="would replace the input"):
        score_users_ray(c.grid, up, tmp_path, k=3)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(NcfError, match=r"is not an earlier top-N output \(notes.txt\)"):
        score_users_ray(c.grid, up, tmp_path / "d", k=3)
    (tmp_path / "d" / "notes.txt").unlink()
    write_users(tmp_path / "d" / "other.parquet", [1, 2], pl.Int64)  # Parquet, but not ours
    with pytest.raises(NcfError, match="is not an earlier top-N output"):
        score_users_ray(c.grid, up, tmp_path / "d", k=3)


@pytest.mark.parametrize(
    "nodes, gpus, kw, want",
    [
        ([2], [0], {}, (1, 1.5, 0, 2, "cpu")),  # this machine: one actor, two threads, 0.5 CPU for writes
        ([2], [0], {"actors": 2}, (2, 0.75, 0, 1, "cpu")),
        ([2], [0], {"actors": 3}, (3, 0.5, 0, 1, "cpu")),
        ([16, 16, 16], [0, 0, 0], {}, (47, 1.0, 0, 1, "cpu")),
        ([16, 16], [0, 0], {"cpus_per_actor": 4}, (7, 4.0, 0, 4, "cpu")),
        ([8, 8], [2, 2], {}, (4, 1.0, 1.0, 1, "cuda")),  # GPUs: one actor per GPU
        ([8, 8], [2, 2], {"gpus_per_actor": 0.5}, (8, 1.0, 0.5, 1, "cuda")),
        ([8, 8], [2, 2], {"device": "cpu"}, (15, 1.0, 0, 1, "cpu")),
        ([1], [0], {}, (1, 0.5, 0, 1, "cpu")),
    ],
)
def test_plan_defaults(nodes, gpus, kw, want):
    p = plan_resources(nodes, gpus, **kw)
    assert (p.actors, p.cpus_per_actor, p.gpus_per_actor, p.threads, p.device) == want


@pytest.mark.parametrize(
    "nodes, gpus, kw, match",
    [
        ([2], [0], {"actors": 2, "cpus_per_actor": 1}, "cannot all run"),
        ([2], [0], {"actors": 1, "cpus_per_actor": 2}, "cannot all run"),
        ([4, 4], [0, 0], {"cpus_per_actor": 8}, "does not fit any node"),
        ([8], [0], {"gpus_per_actor": 1}, "no GPUs"),
        ([8], [0], {"device": "cuda"}, "--device cuda needs GPU actors"),
        ([8], [1], {"device": "cpu", "gpus_per_actor": 1}, "contradicts"),
        ([8], [1], {"actors": 2}, "cannot all run"),  # one GPU, two GPU actors
        ([8], [0], {"actors": 0}, "at least 1"),
        ([8], [0], {"cpus_per_actor": 0}, "more than 0"),
    ],
)
def test_plan_refusals(nodes, gpus, kw, match):
    with pytest.raises(NcfError, match=match):
        plan_resources(nodes, gpus, **kw)
