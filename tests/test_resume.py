"""Interrupted scoring: nothing complete-looking is left, and `--resume` gives exactly the
rows of an uninterrupted run (same rows, same order, same scores).

In-process tests interrupt `score_users` at a chosen scoring block; subprocess tests kill a
real `ncf score` with SIGKILL and SIGTERM while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batch import score as bscore
from batch.score import score_users, work_dir_for
from ncf.errors import NcfError
from tests.onnx_helpers import case, random_model

REPO = Path(__file__).resolve().parents[1]
K = 5


def write_users(path: Path, values) -> Path:
    pl.DataFrame({"user_id": pl.Series(values, dtype=pl.Int64)}).write_parquet(path, row_group_size=97)
    return path


def mixed_users(c, n: int, seed: int = 0) -> list:
    """Known users in random order with duplicates and unknown users (some repeated)."""
    rng = np.random.default_rng(seed)
    known = [c.user_ids[i] for i in rng.integers(0, len(c.user_ids), n)]
    for j in range(0, n, 7):
        known[j] = 10**13 + (j % 5)  # unknown ids, each repeated
    return known


def frames_equal(a: Path, b: Path) -> None:
    x, y = pl.read_parquet(a), pl.read_parquet(b)
    assert x.schema == y.schema and x.height == y.height
    assert x.equals(y)  # row for row: ids, ranks, items, exact scores (nulls in the same places)


# ----------------------------------------------------------------------------- in process


class _Stop(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, blocks: int):
    """Small scoring blocks (chunk x threads x 8 users); starting block n + 2 raises
    KeyboardInterrupt (as Ctrl-C would): n blocks are written, block n + 1 is lost in flight."""
    monkeypatch.setattr(bscore, "BLOCK_PAIRS", 1)
    real = bscore.GridScorer.topk_start
    calls = {"n": 0}

    def topk_start(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > blocks + 1:
            raise _Stop
        return real(self, *a, **kw)

    monkeypatch.setattr(bscore.GridScorer, "topk_start", topk_start)
    return lambda: monkeypatch.setattr(bscore.GridScorer, "topk_start", real)


@pytest.mark.parametrize("unknown", ["popular", "skip"])
def test_resume_equals_uninterrupted_in_process(tmp_path, monkeypatch, unknown):
    c = case()
    up = write_users(tmp_path / "users.parquet", mixed_users(c, 700))
    kw = {"k": K, "device": "cpu", "progress": False, "chunk_users": 1, "threads": 1, "unknown": unknown}
    ref = tmp_path / "ref.parquet"
    monkeypatch.setattr(bscore, "BLOCK_PAIRS", 1)
    s_ref = score_users(c.grid, up, ref, **kw)

    out = tmp_path / "out.parquet"
    restore = interrupt_after(monkeypatch, 2)
    # scoring blocks of 1 user x 1 thread x 8 = 8 users (of ~45 distinct), a part after every block
    with pytest.raises(KeyboardInterrupt):
        score_users(c.grid, up, out, part_seconds=0, **kw)
    restore()
    wd = work_dir_for(out)
    assert not out.exists() and wd.is_dir()
    manifest = json.loads((wd / "manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and not list(wd.glob("*.tmp"))
    s = score_users(c.grid, up, out, resume=True, part_seconds=0, **kw)
    assert s["resumed_from"] == manifest["parts"][-1]["end"] > 0
    frames_equal(ref, out)
    for key in ("users_in", "users_scored", "unknown_users", "duplicate_users", "users_short", "rows"):
        assert s[key] == s_ref[key], key
    assert not wd.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "ref.parquet", "users.parquet"]


def test_resume_refuses_other_inputs_then_fresh_run_discards(tmp_path, monkeypatch):
    c = case()
    up = write_users(tmp_path / "users.parquet", mixed_users(c, 300))
    out = tmp_path / "out.parquet"
    kw = {"device": "cpu", "progress": False, "chunk_users": 1, "threads": 1}
    restore = interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        score_users(c.grid, up, out, k=K, part_seconds=0, **kw)
    restore()
    with pytest.raises(NcfError, match=r"--k changed.*rerun without --resume"):
        score_users(c.grid, up, out, k=K + 1, resume=True, **kw)
    assert work_dir_for(out).is_dir() and not out.exists()  # the other run's work is kept
    s = score_users(c.grid, up, out, k=K, **kw)  # no --resume: start over
    assert s["discarded_partial"] and "discarded" in s["line"] and s["resumed_from"] == 0
    assert not work_dir_for(out).exists()
    ref = tmp_path / "ref.parquet"
    score_users(c.grid, up, ref, k=K, resume=True, **kw)  # --resume with nothing to resume: a plain run
    frames_equal(ref, out)


def test_bad_input_mid_stream_leaves_nothing(tmp_path):
    c = case()
    d = tmp_path / "users"
    d.mkdir()
    write_users(d / "a.parquet", c.user_ids[:30])
    pl.DataFrame({"user_id": [1.5]}).write_parquet(d / "b.parquet")  # floats: caught when read
    # the mixed integer/float parts pass the type check (both numeric); the cast fails mid-stream
    out = tmp_path / "out.parquet"
    with pytest.raises(NcfError):
        score_users(c.grid, d, out, k=K, device="cpu", progress=False, chunk_users=2, part_seconds=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_a_running_scorer_holds_the_lock(tmp_path):
    import fcntl

    c = case()
    up = write_users(tmp_path / "users.parquet", c.user_ids[:5])
    out = tmp_path / "out.parquet"
    wd = work_dir_for(out)
    wd.mkdir()
    with open(wd / "lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # stands in for another process writing out
        with pytest.raises(NcfError, match="another `ncf score` is writing"):
            score_users(c.grid, up, out, k=K, device="cpu", progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- subprocess


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A grid-only model (no per-pair export: fast to build) large enough that scoring its
    users takes a few seconds, and a users file with duplicates and unknown users."""
    from export.onnx_export import _checked_bytes, _with_metadata, grid_graph
    from ncf.checkpoint import load_model_dir, save_model_dir

    d = tmp_path_factory.mktemp("resume")
    n_users, n_items = 16_000, 2_000
    model = random_model("neumf", n_users, n_items, seed=3)
    rng = np.random.default_rng(3)
    su = np.repeat(np.arange(n_users), 5).astype(np.int32)
    si = rng.integers(0, n_items, len(su)).astype(np.int32)
    save_model_dir(d / "m", model, user_ids=pl.Series("user_id", np.arange(n_users) * 7 + 3),
                   item_ids=pl.Series("item_id", np.arange(n_items) * 11), seen_users=su, seen_items=si)
    md = load_model_dir(d / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (d / "model.onnx").write_bytes(_checked_bytes(_with_metadata(grid_graph(md.model), md, "grid"), "grid"))
    ids = list(rng.permutation(n_users) * 7 + 3) + [5, 12, 5] + list(np.arange(50) * 7 + 3)
    pl.DataFrame({"user_id": pl.Series(ids, dtype=pl.Int64)}).write_parquet(d / "users.parquet")
    ref = d / "ref.parquet"
    r = run_cli(d, ref)
    assert r.returncode == 0, r.stderr
    return d, ref


def run_cli(d: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "ncf.cli", "score", "--users", str(d / "users.parquet"), "--model",
           str(d / "model.onnx"), "--out", str(out), "--k", "10", "--device", "cpu", "--no-progress", *extra]
    env = {**os.environ, "NCF_SCORE_PART_SECONDS": "0.2", "PYTHONPATH": str(REPO)}
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_parts(proc, out: Path, n: int = 1, timeout: float = 120) -> int:
    manifest = work_dir_for(out) / "manifest.json"
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        assert proc.poll() is None, "the run finished before it could be interrupted: make the input larger"
        try:
            parts = len(json.loads(manifest.read_text())["parts"])
        except (OSError, ValueError, KeyError):
            parts = 0
        if parts >= n:
            return parts
        time.sleep(0.02)
    raise AssertionError("no finished part appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_run_resumes_to_the_same_rows(tmp_path, big, sig):
    d, ref = big
    out = tmp_path / "topn.parquet"
    proc = run_cli(d, out, wait=False)
    wait_for_parts(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    wd = work_dir_for(out)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # SIGTERM stops like Ctrl-C: exit 130, temporaries removed, finished parts kept
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert not list(wd.glob("*.tmp"))
    assert not out.exists()  # nothing that looks complete
    assert [p.name for p in tmp_path.iterdir()] == [wd.name]
    done = json.loads((wd / "manifest.json").read_text())["parts"][-1]["end"]
    r = run_cli(d, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed: {done:,} of" in r.stdout
    frames_equal(ref, out)
    assert [p.name for p in tmp_path.iterdir()] == ["topn.parquet"]
