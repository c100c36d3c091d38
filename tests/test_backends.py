"""Every backend generates real text from the embedded model; the openai client also survives
flaky and dead servers. One engine per backend per session: start-up dominates test time."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from synthloop.core.llm import BackendSpec, RequestCache, open_llm
from synthloop.core.llm.openai_backend import OpenAILLM
from synthloop.core.models import prepare_embedded

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
RAW = "The days of the week are Monday, Tuesday, Wednesday,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hf_llm():
    return open_llm(BackendSpec(backend="transformers", model="embedded"))


@pytest.fixture(scope="session")
def vllm_llm():
    pytest.importorskip("vllm")
    llm = open_llm(BackendSpec(backend="vllm", model="embedded",
                               options={"enforce_eager": True, "max_model_len": 2048}))
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def vllm_server():
    pytest.importorskip("vllm")
    port = free_port()
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(prepare_embedded()),
         "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
         "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail("vllm server did not become ready")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(30)


def check_backend(llm):
    out = llm.generate([CHAT, RAW], {"max_tokens": 12, "temperature": 0.0})
    assert "paris" in out[0].text.lower()
    assert "thursday" in out[1].text.lower()
    assert all(c.ok and c.prompt_tokens > 0 and c.completion_tokens > 0 for c in out)
    short = llm.generate([RAW], {"max_tokens": 2, "temperature": 0.0})[0]
    assert short.finish_reason == "length" and short.completion_tokens == 2
    sampled = llm.generate([CHAT] * 2, [{"max_tokens": 16, "temperature": 1.0, "seed": s} for s in (1, 2)])
    assert all(c.ok for c in sampled)
    assert llm.stats.requests >= 5 and llm.stats.completion_tokens > 0


def test_transformers_backend(hf_llm):
    check_backend(hf_llm)


def test_transformers_stop_strings(hf_llm):
    c = hf_llm.generate([RAW], {"max_tokens": 20, "temperature": 0.0, "stop": ["Friday"]})[0]
    assert c.finish_reason == "stop" and "Friday" not in c.text and "Thursday" in c.text


@pytest.mark.vllm
def test_vllm_backend(vllm_llm):
    check_backend(vllm_llm)


@pytest.mark.vllm
def test_openai_backend_against_vllm_server(vllm_server):
    llm = OpenAILLM("smol", base_url=vllm_server, concurrency=4)
    check_backend(llm)


def test_cache_answers_repeats_without_the_model(hf_llm, tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")
    from synthloop.core.llm.cache import CachedLLM
    cached = CachedLLM(hf_llm, cache, "transformers")
    before = hf_llm.stats.requests
    a = cached.generate([CHAT], {"max_tokens": 8, "temperature": 0.0})
    b = cached.generate([CHAT], {"max_tokens": 8, "temperature": 0.0})
    assert a == b and cached.stats.cache_hits == 1 and hf_llm.stats.requests == before + 1


class Flaky(http.server.BaseHTTPRequestHandler):
    """Fails the first two POSTs with 503, then answers like an OpenAI server."""
    calls = 0

    def do_POST(self):
        Flaky.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Flaky.calls <= 2 or body.get("messages", [{}])[0].get("content") == "always fail":
            self.send_response(503 if Flaky.calls <= 2 else 400)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        data = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_retries_with_backoff_and_isolates_bad_rows():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        llm = OpenAILLM("m", base_url=f"http://127.0.0.1:{srv.server_port}/v1", concurrency=1,
                        backoff=0.01, max_retries=3)
        out = llm.generate([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "always fail"}]], {})
        assert out[0].text == "ok" and out[0].ok
        assert out[1].finish_reason == "error" and "HTTP 400" in out[1].error
        assert llm.stats.errors == 1 and Flaky.calls >= 4
    finally:
        srv.shutdown()


class Slow(http.server.BaseHTTPRequestHandler):
    """Answers after 50 ms and records the most requests it ever handled at once."""
    active = peak = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with Slow.lock:
            Slow.active += 1
            Slow.peak = max(Slow.peak, Slow.active)
        time.sleep(0.05)
        with Slow.lock:
            Slow.active -= 1
        data = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_concurrency_bound_holds_across_concurrent_calls():
    import asyncio
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        llm = OpenAILLM("m", base_url=f"http://127.0.0.1:{srv.server_port}/v1", concurrency=2)

        async def three_calls():
            return await asyncio.gather(*(llm.agenerate([CHAT] * 3, {}) for _ in range(3)))
        out = asyncio.run(three_calls())
        assert all(c.ok for call in out for c in call) and Slow.peak == 2
        assert llm.in_flight == 0 and llm.stats.requests == 9 and llm.default_in_flight == 4
    finally:
        srv.shutdown()


def test_openai_dead_server_gives_counted_errors_not_exceptions():
    llm = OpenAILLM("m", base_url=f"http://127.0.0.1:{free_port()}/v1", backoff=0.01, max_retries=2, timeout=2)
    out = llm.generate([[{"role": "user", "content": "hi"}]] * 3, {"max_tokens": 4})
    assert [c.finish_reason for c in out] == ["error"] * 3 and llm.stats.errors == 3
    assert "ConnectError" in out[0].error


class _FakeAsyncLLM:
    """Stands in for vLLM's AsyncLLM (no model): answers "<prompt> ok" after 20 ms, refuses prompts
    containing "too long", and records which requests were aborted."""

    def __init__(self):
        from types import SimpleNamespace
        self.model_config = SimpleNamespace(is_encoder_decoder=False)
        self.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256))
        self.renderer = SimpleNamespace(render_cmpl=lambda prompts: [{"type": "token", **p} for p in prompts])
        self.aborted, self.live, self.peak, self.down = [], 0, 0, False

    def get_tokenizer(self):
        from types import SimpleNamespace
        return SimpleNamespace(apply_chat_template=lambda msgs, **kw: "chat: " + msgs[-1]["content"])

    async def generate(self, prompt, sp, request_id, lora_request=None):
        import asyncio
        from types import SimpleNamespace
        if "too long" in prompt["prompt"]:
            raise ValueError("prompt is longer than max_model_len")
        self.live += 1
        self.peak = max(self.peak, self.live)
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        finally:
            self.live -= 1
        out = SimpleNamespace(text=prompt["prompt"] + " ok", finish_reason="stop", token_ids=[1, 2])
        yield SimpleNamespace(outputs=[out], prompt_token_ids=[1, 2, 3])

    async def reset_prefix_cache(self):
        return True

    def shutdown(self):
        self.down = True


def test_vllm_backend_drives_the_async_engine_from_any_thread_or_loop(monkeypatch, tmp_path):
    """The AsyncLLM plumbing without a model: sync and async calls, concurrent calls in one
    running batch, a refused request as a row error, cancellation aborting requests, shutdown."""
    import asyncio
    pytest.importorskip("vllm")
    from synthloop.core.llm import vllm_backend

    fake = _FakeAsyncLLM()

    async def start(args):
        return fake
    monkeypatch.setattr(vllm_backend, "_start", start)
    llm = vllm_backend.VLLMLLM(str(tmp_path))            # no model is loaded
    try:
        out = llm.generate([CHAT, "raw", "too long"], {"max_tokens": 4, "seed": 1})
        assert [c.text for c in out[:2]] == ["chat: " + CHAT[0]["content"] + " ok", "raw ok"]
        assert out[2].finish_reason == "error" and "max_model_len" in out[2].error
        assert (llm.stats.requests, llm.stats.errors, llm.stats.completion_tokens) == (3, 1, 4)

        async def concurrent():
            return await asyncio.gather(*(llm.agenerate([f"r{i}"] * 5, {"max_tokens": 4}) for i in range(4)))
        assert all(c.text.endswith(" ok") for call in asyncio.run(concurrent()) for c in call)
        assert fake.peak == 20 and llm.in_flight == 0        # four calls, one running batch

        async def cancelled():
            task = asyncio.ensure_future(llm.agenerate(["slow"] * 3, {"max_tokens": 4}))
            await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.05)
        asyncio.run(cancelled())
        assert len(fake.aborted) == 3 and llm.in_flight == 0
        llm.reset_prefix_cache()
    finally:
        llm.close()
    assert fake.down and not llm._thread.is_alive()
