"""The CLI end to end on the embedded model, killed with SIGKILL mid-run and resumed.

The same command is started, SIGKILLed as soon as it has committed something, started and killed
again, then run to completion; a clean run in another directory (sharing the request cache, so it
costs only model start-up) must produce the very same shards. Then the dataset itself is checked:
model-written instructions (ROUGE-L <= 0.7 to every seed), non-empty responses, counts that add up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from kill_commands import EMBEDDED_CONFIG
from synthloop.generator.rouge import NoveltyIndex
from synthloop.outputs.manifest import count_problems
from synthloop.seeds.loaders import load_seeds

# self-instruct with the embedded model, answers by distillation, heuristics; 4 records, a shard
# each (the kill campaign's slow variant runs the same config)
CONFIG = EMBEDDED_CONFIG


CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def reap_children():
    """A failed or timed-out test must not leave a generating process behind."""
    yield
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()
            p.wait()
    CHILDREN.clear()


def start(cfg, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return _track(subprocess.Popen([sys.executable, "-m", "synthloop.engine.cli", "run", str(cfg), "--out", str(out),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def _track(p: subprocess.Popen) -> subprocess.Popen:
    CHILDREN.append(p)
    return p


def commits(out) -> int:
    try:
        return json.loads((out / "manifest.json").read_text())["commits"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def kill_after_commit(cfg, out, wait_for: int, timeout=900):
    p = start(cfg, out)
    deadline = time.time() + timeout
    while commits(out) < wait_for and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if p.poll() is None:
        time.sleep(0.5)   # land somewhere after the commit, mid-work
        p.send_signal(signal.SIGKILL)
    p.wait()
    return p.returncode


def shards(out):
    m = json.loads((out / "manifest.json").read_text())
    return m, pl.concat([pl.read_parquet(out / e["path"]) for e in m["shards"]])


@pytest.mark.model
@pytest.mark.timeout(2400)
def test_killed_and_resumed_run_equals_clean_run(tmp_path):
    cfg = tmp_path / "e2e.toml"
    cfg.write_text(CONFIG.format(cache=tmp_path / "requests.sqlite"))
    out = tmp_path / "killed"
    assert kill_after_commit(cfg, out, 1) == -signal.SIGKILL
    assert kill_after_commit(cfg, out, commits(out) + 1) in (-signal.SIGKILL, 0)
    done = start(cfg, out)
    stdout, stderr = done.communicate(timeout=1200)
    assert done.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["complete"]

    clean = tmp_path / "clean"
    again = start(cfg, clean)
    _, err = again.communicate(timeout=1200)
    assert again.returncode == 0, err[-2000:]

    m, kept = shards(out)
    m_clean, kept_clean = shards(clean)
    assert kept.equals(kept_clean)
    assert m["stages"] == m_clean["stages"] and not count_problems(m)
    assert m_clean["llm"]["last_process"]["requests"] == 0   # everything came from the cache

    # the dataset: new, model-written instructions with real responses
    assert kept.height >= 4 and kept["id"].is_unique().all()
    assert (kept["method"] == "self_instruct").all() and (kept["response"].str.strip_chars() != "").all()
    seeds = NoveltyIndex(threshold=0.7)
    for t in load_seeds().records["instruction"].unique().to_list():
        seeds.add(t)
    assert all(seeds.is_novel(t) for t in kept["instruction"].to_list())
