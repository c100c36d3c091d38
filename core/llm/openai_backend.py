"""OpenAI-compatible backend: any server speaking /v1/chat/completions (vLLM's server, llama.cpp,
SGLang, hosted APIs).

Requests run concurrently (bounded by `concurrency`, across all `agenerate` calls sharing an
event loop, so many batches in flight never open more connections), each with its own timeout; connection
errors, timeouts, 429 and 5xx are retried with exponential backoff and full jitter. A request
that still fails becomes a `Completion` with ``finish_reason == "error"`` and is counted, so one
bad row never kills a batch. Raw prompt strings go to /v1/completions, which not every server
offers; a 404 there says so in the row's error. Settings go into the request body as they are.
"""
from __future__ import annotations

import asyncio
import os
import random
import weakref
from typing import Sequence

from synthloop.core.llm.base import Completion, Params, Request, Stats, per_request

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAILLM:
    """A client for one model on one server.

    >>> llm = OpenAILLM("my-model", base_url="http://127.0.0.1:8000/v1")   # doctest: +SKIP
    """

    def __init__(self, model: str, *, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 32, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 name: str | None = None, seed: int = 0):
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key = api_key or os.environ.get(api_key_env, "")
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.name = name or f"openai:{model}"
        self.stats = Stats()
        self.in_flight = 0
        # Twice the connections: the next requests are ready the moment a slot frees up.
        self.default_in_flight = 2 * concurrency
        self._rng = random.Random(seed)
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # event loop -> Semaphore

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        return asyncio.run(self.agenerate(requests, params))

    async def agenerate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        plist = per_request(params, len(requests))
        self.in_flight += len(requests)
        try:
            out = await self._run(list(requests), plist)
        finally:
            self.in_flight -= len(requests)
        self.stats.calls += 1
        self.stats.add(out)
        return out

    async def _run(self, requests: list[Request], plist: list[dict]) -> list[Completion]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        loop = asyncio.get_running_loop()
        sem = self._slots.setdefault(loop, asyncio.Semaphore(self.concurrency))
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=self.timeout) as client:
            async def one(req: Request, p: dict) -> Completion:
                async with sem:
                    return await self._one(client, req, p)
            return list(await asyncio.gather(*(one(r, p) for r, p in zip(requests, plist))))

    async def _one(self, client, request: Request, params: dict) -> Completion:
        import httpx

        if "max_new_tokens" in params:
            params["max_tokens"] = params.pop("max_new_tokens")
        chat = not isinstance(request, str)
        url = f"{self.base_url}/chat/completions" if chat else f"{self.base_url}/completions"
        body = {"model": self.model, **params}
        body["messages" if chat else "prompt"] = list(request) if chat else request
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                r = await client.post(url, json=body)
                if r.status_code == 200:
                    return self._parse(r.json(), chat)
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code == 404 and not chat:
                    error = f"server has no /completions endpoint for raw prompts ({error})"
                if r.status_code not in RETRY_STATUS:
                    break
            except (httpx.TransportError, httpx.TimeoutException) as e:
                error = f"{type(e).__name__}: {e}"
            except ValueError as e:   # a 200 with a body we cannot read is not worth retrying
                error = f"bad response: {e}"
                break
            if attempt < self.max_retries:
                # Full jitter keeps many clients from retrying in lockstep.
                await asyncio.sleep(self._rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt)))
        return Completion(text="", finish_reason="error", error=error)

    @staticmethod
    def _parse(data: dict, chat: bool) -> Completion:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"no choices[0] text in {str(data)[:200]}") from e
        usage = data.get("usage") or {}
        return Completion(text=text or "", finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0))

    def close(self) -> None:
        pass
