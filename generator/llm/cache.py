"""A persistent request cache: the same (backend, model, request, settings) is answered once, ever.

Keyed by a SHA-256 of the canonical JSON of (backend kind, model name, rendered request, sampling
settings); settings include the seed, so sampled outputs are reproducible per key. Stored in
SQLite (WAL journal): a killed process leaves the cache consistent, and every finished model call
is committed before its rows move on, so a rerun pays nothing for work already done. Shared
across runs and rounds. Failed requests are never cached.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Sequence

from synthloop.generator.llm.base import LLM, Completion, Params, Request, Stats, per_request


def request_key(kind: str, model: str, request: Request, params: dict) -> str:
    """SHA-256 of the canonical JSON of what determines an answer (the seed is part of `params`).

    >>> request_key("vllm", "m", "Hi", {"seed": 1}) != request_key("vllm", "m", "Hi", {"seed": 2})
    True
    """
    body = json.dumps([kind, model, request, params], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


class RequestCache:
    """Completions by key in one SQLite file.

    >>> c = RequestCache(Path("/tmp/_sl_doc.sqlite")); c.put({"k": Completion("hi", "stop")})
    >>> c.get(["k"])["k"].text
    'hi'
    """

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
                        " finish_reason TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER)")

    def get(self, keys: Sequence[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        uniq = list(dict.fromkeys(keys))
        for s in range(0, len(uniq), 500):   # stay under SQLite's bound-parameter limit
            part = uniq[s:s + 500]
            rows = self.db.execute(
                f"SELECT key, text, finish_reason, prompt_tokens, completion_tokens FROM completions "
                f"WHERE key IN ({','.join('?' * len(part))})", part)
            for k, text, fr, pt, ct in rows:
                found[k] = Completion(text=text, finish_reason=fr, prompt_tokens=pt or 0, completion_tokens=ct or 0)
        return found

    def put(self, items: dict[str, Completion]) -> None:
        rows = [(k, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens)
                for k, c in items.items() if c.ok]
        if rows:
            with self.db:   # one transaction: all of a call's answers, or none
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class CachedLLM:
    """Wraps a backend: cached requests skip the model; `stats.cache_hits` counts them (a request
    repeated within one call counts as a hit: the model answers it once)."""

    def __init__(self, inner: LLM, cache: RequestCache, kind: str):
        self.inner, self.cache, self.kind = inner, cache, kind
        self.name = inner.name
        self.stats = Stats()

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        plist = per_request(params, len(requests))
        keys = [request_key(self.kind, self.name, r if isinstance(r, str) else list(map(dict, r)), p)
                for r, p in zip(requests, plist)]
        found = self.cache.get(keys)
        # A key asked twice in one call is generated once (e.g. the same judge pair twice).
        miss, asked = [], set()
        for i, k in enumerate(keys):
            if k not in found and k not in asked:
                asked.add(k)
                miss.append(i)
        self.stats.cache_hits += len(requests) - len(miss)
        if miss:
            got = self.inner.generate([requests[i] for i in miss], [plist[i] for i in miss])
            self.stats.calls += 1
            self.stats.add(got)
            self.cache.put({keys[i]: c for i, c in zip(miss, got)})
            found.update((keys[i], c) for i, c in zip(miss, got))
        return [found[k] for k in keys]

    def close(self) -> None:
        self.inner.close()
