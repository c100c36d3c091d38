"""`synthloop score` and `select --executor ray` on a local Ray cluster (started here, 2 CPUs):
replicas of the scorer or encoder write what the local command writes, and a replica killed
mid-run loses and doubles nothing."""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

ray = pytest.importorskip("ray")

from synthloop.core.schema import make_batch  # noqa: E402
from synthloop.filters.ray_replicas import ReplicaPool, add_stats, placement  # noqa: E402
from synthloop.filters.score_cli import add_parser  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    yield
    ray.shutdown()


def _cli(capsys, *argv) -> dict:
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(list(argv))
    assert args.fn(args) == 0
    return json.loads(capsys.readouterr().out)


def _rows(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(out / "kept.parquet"), pl.read_parquet(out / "rejects.parquet")


def _corpus(path: Path, n: int = 240) -> Path:
    topics = ["bread", "rivers", "prime numbers", "chess openings", "tax forms", "owls", "jazz", "rust lifetimes"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        response = (f"Here is a short note on {t}, number {i}. " * (1 + i % 5)) if i % 7 else "ok"
        rows.append({"instruction": f"Explain {t} to a newcomer, case {i // len(topics)}.",
                     "response": response, "scores": {"quality": (i * 37 % 101) / 100},
                     "drop_reason": "duplicate" if i % 31 == 0 else None})
    make_batch(rows).write_parquet(path)
    return path


@pytest.mark.parametrize("scorer", ["heuristics", "ifd"])
def test_score_on_ray_writes_what_local_writes(cluster, tmp_path, capsys, tiny_model, scorer):
    src = _corpus(tmp_path / "in.parquet")
    extra = ["--model", str(tiny_model), "--set", "max_ifd=0.999"] if scorer == "ifd" else []
    common = [str(src), "--scorer", scorer, "--batch-rows", "32", "--quiet", *extra]
    local = _cli(capsys, "score", *common, "--out", str(tmp_path / "local"))
    dist = _cli(capsys, "score", *common, "--out", str(tmp_path / "ray"), "--executor", "ray")
    assert dist["ray"]["replicas"] == 2 and dist["ray"]["resent"] == 0
    assert {k: dist[k] for k in ("kept", "rejected")} == {k: local[k] for k in ("kept", "rejected")}
    (lk, lr), (rk, rr) = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert rk["id"].to_list() == lk["id"].to_list() and rr["id"].to_list() == lr["id"].to_list()
    if scorer == "ifd":        # each replica its own model process: the same numbers
        assert rk["scores"].struct.field("ifd").to_list() == pytest.approx(
            lk["scores"].struct.field("ifd").to_list(), abs=1e-4)
        local["stats"].pop("seconds"), dist["stats"].pop("seconds")
        assert local["stats"]["rows"] == 240 - 8           # the 8 rows rejected on input are not scored
    else:
        assert rk.equals(lk) and rr.equals(lr)
    assert dist.get("stats") == local.get("stats")


def test_select_on_ray_keeps_the_local_rows(cluster, tmp_path, capsys):
    src = _corpus(tmp_path / "in.parquet", n=300)
    common = [str(src), "--budget", "40", "--threshold", "0.85", "--quiet"]
    local = _cli(capsys, "select", *common, "--out", str(tmp_path / "local"))
    dist = _cli(capsys, "select", *common, "--out", str(tmp_path / "ray"), "--executor", "ray")
    assert dist == {**local, "out": str(tmp_path / "ray")}
    assert local["rejected"]["too_similar"] > 0 and 0 < local["kept"] <= 40
    (lk, lr), (rk, rr) = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert rk["id"].to_list() == lk["id"].to_list() and rr["id"].to_list() == lr["id"].to_list()


class Slow:
    """A replica's work: 50 ms a call, counting its calls."""

    def __init__(self):
        self.stats = {"calls": 0, "items": {"seen": 0}}

    def __call__(self, x: int) -> int:
        time.sleep(0.05)
        self.stats["calls"] += 1
        self.stats["items"]["seen"] += 1
        return x * x


def test_replica_killed_mid_run_loses_and_doubles_nothing(cluster):
    pool = ReplicaPool(Slow, replicas=2, num_cpus=0.5)
    done: list[int] = []
    victim = pool.pids()[1]
    killed = threading.Event()

    def progress(i: int) -> None:
        done.append(i)
        # The pool keeps two calls on each replica while work remains: the victim holds some.
        if len(done) == 6 and not killed.is_set():
            os.kill(victim, signal.SIGKILL)
            killed.set()
    try:
        out = pool.map(list(range(40)), progress=progress)
        assert killed.is_set() and pool.resent > 0
        assert out == [x * x for x in range(40)] and sorted(done) == list(range(40))
        # Only the calls whose results were used are counted, exactly once each.
        assert pool.stats == {"calls": 40, "items": {"seen": 40}}
        assert victim not in pool.pids()                 # Ray restarted it
    finally:
        pool.close()


def test_placement_and_stats_sums(cluster):
    assert placement(None, None, 1.0) == (2, 0.0)        # no GPUs here: one replica per CPU
    assert placement(None, None, 2.0) == (1, 0.0)
    assert placement(3, None, 1.0) == (3, 0.0)
    with pytest.raises(ValueError, match="GPU"):
        placement(None, 1.0, 1.0)
    assert add_stats({"a": 3, "b": {"c": 2.5}, "name": "x"}, {"a": 1, "b": {"c": 0.5}}, -1) == \
        {"a": 2, "b": {"c": 2.0}, "name": "x"}
    # a counter that first appears in a later batch (a new drop reason) is added, not lost
    assert add_stats({"reasons": {"long": 2}}, {"reasons": {"long": 1, "empty": 4}, "calls": 1}) == \
        {"reasons": {"long": 3, "empty": 4}, "calls": 1}


def test_bad_placement_exits_2_before_any_work(cluster, tmp_path, capsys):
    src = _corpus(tmp_path / "in.parquet", n=20)
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["score", str(src), "--scorer", "heuristics", "--out", str(tmp_path / "o"),
                         "--executor", "ray", "--gpus-per-replica", "1", "--quiet"])
    assert args.fn(args) == 2
    assert "GPU" in capsys.readouterr().err and not (tmp_path / "o").exists()
