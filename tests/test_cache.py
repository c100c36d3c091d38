"""The request cache: what the key covers, hit/miss counts, reruns and other rounds for free, and
a cache file that survives a SIGKILLed writer with every committed transaction in it."""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from scripted_llm import ScriptedLLM, scripted_factory
from synthloop.core.config import parse_config
from synthloop.core.llm.base import Completion
from synthloop.core.llm.cache import CachedLLM, RequestCache, request_key
from synthloop.engine.runner import execute

CHAT = [{"role": "user", "content": "Name a colour."}]


def test_key_covers_backend_model_request_and_every_setting_seed_included():
    base = request_key("vllm", "m", CHAT, {"temperature": 0.7, "seed": 1})
    assert base == request_key("vllm", "m", [dict(CHAT[0])], {"seed": 1, "temperature": 0.7})   # order-free
    assert base != request_key("vllm", "m", CHAT, {"temperature": 0.7, "seed": 2})
    assert base != request_key("vllm", "m", CHAT, {"temperature": 0.7})
    assert base != request_key("transformers", "m", CHAT, {"temperature": 0.7, "seed": 1})
    assert base != request_key("vllm", "m+adapter", CHAT, {"temperature": 0.7, "seed": 1})
    assert base != request_key("vllm", "m", "Name a colour.", {"temperature": 0.7, "seed": 1})
    assert len(base) == 64 and int(base, 16) >= 0


def _cached(tmp_path, name="req.sqlite"):
    inner = ScriptedLLM()
    return CachedLLM(inner, RequestCache(tmp_path / name), "scripted"), inner


def test_hit_and_miss_counts(tmp_path):
    llm, inner = _cached(tmp_path)
    reqs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    first = llm.generate(reqs[:3], {"seed": 0})
    assert (llm.stats.cache_hits, llm.stats.requests, inner.stats.requests) == (0, 3, 3)
    again = llm.generate(reqs, {"seed": 0})
    assert again[:3] == first
    assert (llm.stats.cache_hits, llm.stats.requests, inner.stats.requests) == (3, 4, 4)
    llm.generate(reqs[:2], [{"seed": 0}, {"seed": 9}])             # another seed is another key
    assert (llm.stats.cache_hits, inner.stats.requests) == (4, 5)
    llm.generate([reqs[0], reqs[0], "raw", "raw"], [{"seed": 5}] * 4)   # repeats inside a call: asked once
    assert (llm.stats.cache_hits, inner.stats.requests, inner.stats.calls) == (6, 7, 4)
    assert len(llm.cache) == 7


def test_concurrent_calls_ask_a_shared_key_once_and_count_misses(tmp_path):
    llm, inner = _cached(tmp_path)
    inner.latency = 0.05

    async def together():
        return await asyncio.gather(llm.agenerate(["a", "b"], {"seed": 1}), llm.agenerate(["b", "c"], {"seed": 1}))
    x, y = asyncio.run(together())
    assert x[1] == y[0] and inner.stats.requests == 3 and llm.stats.cache_hits == 1
    assert llm.cache.misses == 3 and inner.in_flight == 0
    assert asyncio.run(llm.agenerate(["c"], {"seed": 1})) == [y[1]] and llm.cache.misses == 3


def test_errors_are_not_cached(tmp_path):
    inner = ScriptedLLM(fail_every=2)
    llm = CachedLLM(inner, RequestCache(tmp_path / "c.sqlite"), "scripted")
    out = llm.generate(["a", "b"], {})
    assert [c.ok for c in out] == [True, False] and len(llm.cache) == 1
    inner.fail_every = 0
    out = llm.generate(["a", "b"], {})
    assert all(c.ok for c in out) and llm.stats.cache_hits == 1 and inner.stats.requests == 3


def test_cache_is_shared_through_the_file(tmp_path):
    a, _ = _cached(tmp_path)
    got = a.generate(["x", "y"], {"seed": 3})
    a.cache.close()
    b, inner = _cached(tmp_path)
    assert b.generate(["y", "x"], {"seed": 3}) == got[::-1] and inner.stats.requests == 0
    assert b.cache.get(["nope"]) == {}
    assert RequestCache(tmp_path / "req.sqlite").get([request_key("scripted", "scripted", "x", {"seed": 3})])


PIPELINE = """
[run]
name = "cached"
limit = 30
round = {round}
cache = "{cache}"

[llm.generator]
backend = "vllm"

[llm.teacher]
backend = "vllm"
model = "teacher"

[source]
type = "self_instruct"
prompts_per_step = 3

[[stages]]
type = "instances"

[[stages]]
type = "evol"
fraction = 0.5

[[stages]]
type = "distill"
n = 2
"""


def _pipeline(tmp_path, round=0):
    return parse_config(PIPELINE.format(round=round, cache=tmp_path / "shared.sqlite"), path="c.toml")


def test_rerun_and_next_round_make_no_model_calls(tmp_path):
    first: list = []
    m1 = execute(_pipeline(tmp_path), out=tmp_path / "a", show_progress=False, backend_factory=scripted_factory(first))
    assert sum(b.stats.requests for b in first) > 100
    for out, rnd in ((tmp_path / "b", 0), (tmp_path / "c", 1)):
        again: list = []
        m = execute(_pipeline(tmp_path, rnd), out=out, show_progress=False, backend_factory=scripted_factory(again))
        assert again and sum(b.stats.requests for b in again) == 0     # nothing reached a model
        # The first run also answered some requests past its limit (batches in flight when it
        # stopped); the rerun asks only for what its records need.
        assert 0 < m["llm"]["last_process"]["cache_hits"] <= m1["llm"]["last_process"]["requests"] \
            + m1["llm"]["last_process"]["cache_hits"]
        assert m["stages"] == m1["stages"]


WRITER = textwrap.dedent("""
    import sys
    from synthloop.core.llm.base import Completion
    from synthloop.core.llm.cache import RequestCache
    cache = RequestCache(sys.argv[1])
    for t in range(100000):
        cache.put({f"t{t}-k{j}": Completion("x" * 200 + str(t), "stop", 3, 4) for j in range(50)})
        print(t, flush=True)          # after the commit: transaction t is durable
""")


def test_cache_survives_a_sigkilled_writer(tmp_path):
    path = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    done = -1
    try:
        for line in proc.stdout:
            done = int(line)
            if done >= 30:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)     # mid-way: the writer is inside its next transactions
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and done >= 30
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    counts = dict(db.execute("SELECT substr(key, 1, instr(key, '-') - 1), COUNT(*) FROM completions GROUP BY 1"))
    db.close()
    for t in range(done + 1):                  # every acknowledged transaction is there, whole
        assert counts.get(f"t{t}") == 50, t
    assert all(n == 50 for n in counts.values())   # and no transaction is there in part
    cache = RequestCache(path)
    assert cache.get([f"t{done}-k49"])[f"t{done}-k49"] == Completion("x" * 200 + str(done), "stop", 3, 4)
    cache.put({"after": Completion("ok", "stop")})
    assert len(cache) == sum(counts.values()) + 1
