"""A run through the openai backend against a bad server: a real local model server (the tiny
random Llama through the transformers backend, tests/conftest.py) behind a proxy that injects
20% faults (tests/fault_proxy.py): 500/503, timeouts, connection resets, truncated and invalid
JSON bodies, empty choices, stalled streams, plus slow-but-complete answers.

The run completes; every injected fault is either retried or ends as a counted per-row error
whose reason matches the fault; nothing from a failed answer reaches the request cache; a rerun
against the same server without the proxy answers exactly the rows that failed.
"""
from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from fault_proxy import FAULTS, FaultProxy, ModelServer, account
from synthloop.core.config import ConfigError, parse_config
from synthloop.core.llm import open_llm
from synthloop.core.llm.cache import request_key
from synthloop.core.llm.openai_backend import OpenAILLM
from synthloop.engine.runner import execute
from synthloop.outputs.manifest import count_problems

TIMEOUT = 8.0

CONFIG = """
[run]
name = "badserver"
limit = 64
shard_rows = 16
cache = "{cache}"

[llm.generator]
backend = "transformers"
model = "{tiny}"

[llm.judge]
backend = "openai"
model = "tiny"
options = {{ base_url = "http://127.0.0.1:{port}/v1", timeout = {timeout}, max_retries = 1, backoff = 0.02, concurrency = 4 }}

[source]
type = "seeds"
batch_size = 8

[[stages]]
type = "judge"
max_tokens = 6
"""

@pytest.fixture(scope="module")
def server(tiny_model):
    from synthloop.core.llm.transformers_backend import TransformersLLM

    srv = ModelServer(TransformersLLM(tiny_model))
    yield srv
    srv.close()


def _run(tmp_path, tiny, port, out):
    backends = []

    def factory(spec, cache=None):
        llm = open_llm(spec, cache=cache)
        backends.append(llm)
        return llm
    cfg = parse_config(CONFIG.format(cache=tmp_path / "req.sqlite", tiny=tiny, port=port, timeout=TIMEOUT),
                       path="badserver.toml")
    m = execute(cfg, out=tmp_path / out, show_progress=False, backend_factory=factory)
    [judge] = [b.inner for b in backends if isinstance(b.inner, OpenAILLM)]
    return m, judge


def _cached(path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT key, text FROM completions"))


def test_run_through_a_faulty_server_completes_with_every_fault_accounted(tmp_path, tiny_model, server):
    proxy = FaultProxy(server.port, rate=0.2, seed=3, client_timeout=TIMEOUT)
    try:
        m, judge = _run(tmp_path, tiny_model, proxy.port, "faulty")
    finally:
        proxy.close()
    # the run completes and its counts add up
    assert m["complete"] and not count_problems(m)
    assert m["stages"][-1]["kept"] == m["stages"][0]["kept"] >= 64
    # every kind of fault was injected, into about a fifth of all attempts
    injected = Counter(e["fault"] for e in proxy.log)
    assert set(injected) == set(FAULTS) | {"ok", "slow"}, injected
    assert 0.12 < sum(injected[k] for k in FAULTS) / len(proxy.log) < 0.3
    # each fault was retried or ended its row as a counted error, with a reason naming it
    books = account(proxy, judge)
    stats = judge.stats
    assert books["match"], books
    assert stats.errors > 0 and stats.retries > 0
    assert m["llm"]["last_process"]["errors"] == stats.errors and m["llm"]["last_process"]["retries"] == stats.retries
    assert m["state"]["judge"]["ratings"]["errors"] == stats.errors
    # the cache holds exactly the answers that arrived whole, each as the server wrote it
    cached = _cached(tmp_path / "req.sqlite")
    whole = {e["key"] for e in proxy.log if proxy.seen(e) in ("ok", "slow")}
    assert len(cached) == len(whole) == stats.requests - stats.errors
    for key, body in {e["key"]: e["body"] for e in proxy.log}.items():
        params = json.loads(body)
        messages = params.pop("messages")
        params.pop("model")
        ck = request_key("openai", judge.name, messages, params)
        assert cached.get(ck) == (server.answers[key] if key in whole else None)

    # the same command against the server directly: cached rows are not asked again, failed ones are
    m2, judge2 = _run(tmp_path, tiny_model, server.port, "direct")
    assert m2["complete"] and judge2.stats.errors == 0 and judge2.stats.retries == 0
    assert judge2.stats.requests == stats.errors
    assert m2["llm"]["last_process"]["cache_hits"] == stats.requests - stats.errors


def test_api_key_comes_from_the_environment_or_a_file_never_the_config(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="options.api_key: keys are never read from a config"):
        OpenAILLM("m", api_key="sk-inline")
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    assert OpenAILLM("m", api_key_env="MY_KEY")._headers == {"Authorization": "Bearer sk-from-env"}
    (tmp_path / "key").write_text("sk-from-file\n")
    llm = OpenAILLM("m", api_key_file=str(tmp_path / "key"))
    assert llm._headers == {"Authorization": "Bearer sk-from-file"} and "sk-" not in repr(llm)
    with pytest.raises(ConfigError, match="api_key_file .*missing: cannot read a key"):
        OpenAILLM("m", api_key_file=str(tmp_path / "missing"))
