"""`synthloop dedup --executor ray` keeps exactly the rows the local executor keeps, on a local
Ray cluster (started once per session with 2 CPUs): exact, MinHash (both checks) and semantic,
with several input files, a preload and rows dropped before dedup; a killed worker loses nothing."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import numpy as np
import polars as pl
import pytest

ray = pytest.importorskip("ray")

from synthloop.filters.dedup_cli import main as dedup_main  # noqa: E402
from synthloop.filters.dedup_ray import keep_first, pieces  # noqa: E402
from test_dedup import PARA, _mutate, _text  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)   # "local": a new cluster, never one found running
    yield
    ray.shutdown()


def _near_dup_corpus(tmp_path, n=900, seed=11):
    """Three JSONL/Parquet inputs with exact copies, near copies and chains A ~ B ~ C (A !~ C)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = rng.random()
        if rows and r < 0.08:
            rows.append(dict(rng.choice(rows), n=i))
        elif rows and r < 0.3:
            src = rng.choice(rows)    # chains form when the source is itself a near copy
            rows.append({"instruction": _mutate(src["instruction"], rng, rng.choice([1, 3, 5])),
                         "response": src["response"], "n": i})
        else:
            rows.append({"instruction": _text(rng, 40), "response": _text(rng, 20), "n": i})
    for row in rng.sample(rows, 20):
        row["drop_reason"] = "too_short"        # dropped upstream: never indexed, kept as a reject
    df = pl.DataFrame(rows, schema_overrides={"drop_reason": pl.String})
    paths = [tmp_path / "a.parquet", tmp_path / "b.jsonl", tmp_path / "c.parquet"]
    df.slice(0, 300).write_parquet(paths[0])
    df.slice(300, 250).write_ndjson(paths[1])
    df.slice(550).write_parquet(paths[2])
    old = pl.DataFrame([{"instruction": _mutate(rows[k]["instruction"], rng, 1),
                         "response": rows[k]["response"], "n": -1 - k} for k in (5, 400, 700)])
    old.write_parquet(tmp_path / "old.parquet")
    return [str(p) for p in paths], str(tmp_path / "old.parquet")


def _run(tmp_path, name, inputs, *args):
    out = tmp_path / name
    assert dedup_main([*inputs, "--out", str(out), "--quiet", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    kept = pl.read_parquet(out / "kept-*.parquet")
    rej = pl.read_parquet(out / "rejects-*.parquet")
    return summary, kept, rej


def _same(tmp_path, inputs, *args):
    local = _run(tmp_path, "local", inputs, *args)
    dist = _run(tmp_path, "ray", inputs, *args, "--executor", "ray", "--batch-size", "128")
    (ls, lk, lr), (rs, rk, rr) = local, dist
    assert sorted(lk["n"].to_list()) == sorted(rk["n"].to_list())
    assert sorted(zip(lr["n"], lr["drop_reason"])) == sorted(zip(rr["n"], rr["drop_reason"]))
    assert ls["dropped"] == rs["dropped"] and ls["kept"] == rs["kept"] and rs["executor"] == "ray"
    assert lk.columns == rk.columns
    return ls, rs


@pytest.mark.parametrize("extra", [["--method", "exact"], ["--method", "minhash"],
                                   # unverified candidates (signature bits) under a custom band layout
                                   ["--method", "minhash", "--no-verify", "--bands", "32", "--rows", "2"]])
def test_ray_keeps_the_local_rows(tmp_path, cluster, extra):
    inputs, old = _near_dup_corpus(tmp_path)
    ls, rs = _same(tmp_path, inputs, *extra, "--preload", old)
    reason = "exact_duplicate" if "exact" in extra else "near_duplicate"
    assert ls["dropped"][reason] > 40 and ls["dropped"]["too_short"] == 20
    if "minhash" in extra:
        # keep-first is not "one row per component": chains keep their far ends
        assert rs["ray"]["verified_pairs"] > rs["ray"]["components"] > 0
        assert rs["ray"]["candidate_pairs"] >= rs["ray"]["verified_pairs"]


def test_ray_semantic_keeps_the_local_rows(tmp_path, cluster):
    texts = [a for a, _ in PARA] + ["Explain photosynthesis briefly.", "List three prime numbers.",
                                    "Describe a sunset over the sea."] + [b for _, b in PARA]
    df = pl.DataFrame({"instruction": texts, "response": [""] * len(texts), "n": list(range(len(texts)))})
    df.head(5).write_parquet(tmp_path / "a.parquet")
    df.slice(5).write_parquet(tmp_path / "b.parquet")
    pl.DataFrame({"instruction": ["Tell me about photosynthesis in short."], "response": [""],
                  "n": [-1]}).write_parquet(tmp_path / "old.parquet")
    inputs = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    ls, rs = _same(tmp_path, inputs, "--method", "semantic", "--threshold", "0.8",
                   "--preload", str(tmp_path / "old.parquet"))
    assert ls["dropped"] == {"semantic_duplicate": 4}


def test_keep_first_over_pairs_is_the_streaming_rule():
    rng = np.random.default_rng(0)
    n = 300
    a = rng.integers(-5, n, 600)
    b = rng.integers(0, n, 600)
    a, b = np.minimum(a, b), np.maximum(a, b)
    a, b = a[a != b], b[a != b]
    dropped, comps = keep_first(a, b)
    kept = set(range(-5, 0))                  # what a streaming index holds, in input order
    linked = {}
    for x, y in zip(a, b):
        linked.setdefault(int(y), set()).add(int(x))
    expect = []
    for v in range(n):
        if linked.get(v, set()) & kept:
            expect.append(v)
        else:
            kept.add(v)
    assert dropped.tolist() == expect and comps >= 1


def test_pieces_cover_every_row_once():
    from pathlib import Path
    ps = pieces([(Path("a"), 5), (Path("b"), 0), (Path("c"), 7)], 3)
    assert [(p.path, p.start, p.rows, p.ord0) for p in ps] == [
        ("a", 0, 3, 0), ("a", 3, 2, 3), ("c", 0, 3, 5), ("c", 3, 3, 8), ("c", 6, 1, 11)]


def test_semdedup_is_refused_on_ray(tmp_path, capsys):
    pl.DataFrame({"instruction": ["a"], "response": ["b"]}).write_parquet(tmp_path / "in.parquet")
    rc = dedup_main([str(tmp_path / "in.parquet"), "--out", str(tmp_path / "o"), "--method",
                     "semantic", "--semdedup", "--executor", "ray"])
    assert rc == 2 and "--executor local only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_killed_worker_loses_nothing(tmp_path, cluster):
    """SIGKILL a Ray worker while it hashes a piece: Ray reruns the task, the output is unchanged."""
    inputs, _ = _near_dup_corpus(tmp_path, n=3000, seed=12)
    ls, lk, _ = _run(tmp_path, "local", inputs)
    killed = []

    def hunt():
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:   # Ray sets a worker's title to the task it runs
                    title = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::") and "_minhash_rows" in title:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(title)
                    return
            time.sleep(0.005)

    t = threading.Thread(target=hunt)
    t.start()
    rs, rk, _ = _run(tmp_path, "ray", inputs, "--executor", "ray", "--batch-size", "50")
    t.join()
    assert killed, "no worker was caught running a task"
    assert rk["n"].len() == rk["n"].n_unique() == ls["kept"] == rs["kept"]
    assert sorted(rk["n"].to_list()) == sorted(lk["n"].to_list())
