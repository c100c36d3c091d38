"""OpenAI-compatible backend: any server speaking /v1/chat/completions (vLLM's server, llama.cpp,
SGLang, hosted APIs).

Requests run concurrently (bounded by `concurrency`, across all `agenerate` calls sharing an
event loop, so many batches in flight never open more connections), each attempt within
`timeout` seconds from sending to the last byte of the answer (a server trickling its answer is a
timeout too). Connection errors and resets, timeouts, 408/409/429/5xx and answers that cannot be
read (a body that is not JSON, cut short, without ``choices[0]`` text) are retried with exponential
backoff and full jitter; other statuses (400, 401, 404, ...) are not. A request that still fails
becomes a `Completion` with ``finish_reason == "error"`` and its reason, and is counted
(`stats.errors`; retries in `stats.retries`, reasons in `reasons`), so one bad row never kills a
batch, and the request cache never stores it. Raw prompt strings go to /v1/completions, which not
every server offers; a 404 there says so in the row's error. Settings go into the request body as
they are.

The API key is never part of a config: it comes from the environment variable `api_key_env`
(default ``OPENAI_API_KEY``) or the first line of `api_key_file`, and is sent only as the
``Authorization`` header, never logged or stored.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Sequence

from synthloop.core.config import ConfigError
from synthloop.core.llm.base import Completion, Params, Request, Stats, per_request

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAILLM:
    """A client for one model on one server.

    >>> llm = OpenAILLM("my-model", base_url="http://127.0.0.1:8000/v1")   # doctest: +SKIP
    """

    def __init__(self, model: str, *, base_url: str = "http://127.0.0.1:8000/v1",
                 api_key_env: str = "OPENAI_API_KEY", api_key_file: str = "", concurrency: int = 32,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 name: str | None = None, seed: int = 0, **unknown):
        if "api_key" in unknown:
            raise ConfigError(f"openai backend for '{model}': options.api_key: keys are never read from a config; "
                              f"set the environment variable {api_key_env} (api_key_env) or api_key_file")
        if unknown:
            raise ConfigError(f"openai backend for '{model}': unknown option(s) {', '.join(sorted(unknown))}")
        self.model, self.base_url = model, base_url.rstrip("/")
        key = _read_key(api_key_file) if api_key_file else os.environ.get(api_key_env, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.name = name or f"openai:{model}"
        self.stats = Stats()
        self.reasons: Counter = Counter()    # why attempts failed (retried or final), by kind
        self.in_flight = 0
        # Twice the connections: the next requests are ready the moment a slot frees up.
        self.default_in_flight = 2 * concurrency
        self._rng = random.Random(seed)
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # event loop -> Semaphore

    def __repr__(self) -> str:      # no key in any repr
        return f"OpenAILLM({self.model!r}, base_url={self.base_url!r})"

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

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        loop = asyncio.get_running_loop()
        sem = self._slots.setdefault(loop, asyncio.Semaphore(self.concurrency))
        async with httpx.AsyncClient(headers=self._headers, limits=limits, timeout=self.timeout) as client:
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
        for attempt in range(self.max_retries + 1):
            retry = True
            try:
                # One deadline for the whole exchange: httpx's timeout is per read, so a server
                # sending a byte now and then would otherwise hold the row for ever.
                r = await asyncio.wait_for(client.post(url, json=body), self.timeout)
                if r.status_code == 200:
                    return self._parse(r.content, chat)
                kind, error = f"HTTP {r.status_code}", f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code == 404 and not chat:
                    error = f"server has no /completions endpoint for raw prompts ({error})"
                retry = r.status_code in RETRY_STATUS
            except (asyncio.TimeoutError, httpx.TimeoutException):
                kind, error = "timeout", f"no complete answer within {self.timeout:g}s"
            except httpx.TransportError as e:
                kind, error = type(e).__name__, f"{type(e).__name__}: {e}"
            except BadResponse as e:
                kind, error = e.kind, f"bad response: {e}"
            self.reasons[kind] += 1
            if not retry or attempt == self.max_retries:
                break
            self.stats.retries += 1
            # Full jitter keeps many clients from retrying in lockstep.
            await asyncio.sleep(self._rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt)))
        return Completion(text="", finish_reason="error", error=error)

    @staticmethod
    def _parse(raw: bytes, chat: bool) -> Completion:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadResponse("invalid JSON", f"not JSON ({e}): {raw[:120]!r}") from None
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise BadResponse("no choices", f"no choices[0] text in {str(data)[:200]}") from None
        if not isinstance(text, str):
            raise BadResponse("no choices", f"choices[0] text is {type(text).__name__}, not a string")
        usage = data.get("usage") or {}
        return Completion(text=text, finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0))

    def close(self) -> None:
        if self.reasons:
            print(f"{self.name}: {self.stats.retries} retries, {self.stats.errors} failed requests; attempts failed: "
                  + ", ".join(f"{k} {n}" for k, n in self.reasons.most_common()), file=sys.stderr)


class BadResponse(ValueError):
    """A 200 answer we cannot use; `kind` groups it for counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _read_key(path: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise ConfigError(f"api_key_file {path}: cannot read a key from it") from None
