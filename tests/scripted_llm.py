"""A scripted LLM for unit tests of prompt plumbing, parsing and checkpointing.

It answers each kind of synthloop prompt in the expected shape with text derived from a hash of
the request, so answers are deterministic and distinct. It counts what reached it. Model-backed
tests (test_backends.py, test_cli_e2e.py) exercise the real backends.
"""
from __future__ import annotations

import hashlib
import random

from synthloop.generator.llm.base import Completion, Stats, per_request
from synthloop.generator.llm.cache import CachedLLM

WORDS = ("river mountain budget recipe planet garden poem email invoice bridge engine lesson orbit "
         "harvest ledger violin glacier tariff pixel sonnet protein canyon mortgage comet lantern "
         "quartz meadow syntax voltage archive compass").split()


class ScriptedLLM:
    def __init__(self, name: str = "scripted", fail_every: int = 0):
        self.name, self.stats, self.fail_every = name, Stats(), fail_every
        self.seen = 0

    def _answer(self, request, params) -> Completion:
        key = repr(request) + repr(sorted(params.items()))
        rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
        self.seen += 1
        if self.fail_every and self.seen % self.fail_every == 0:
            return Completion("", "error", error="scripted failure")
        if isinstance(request, str) and "numbered list of tasks" in request:
            items = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(5)]
            items[1] = "Draw a " + items[1]               # always one unsupported_modality
            text = " " + items[0] + "".join(f"\n{10 + i}. {t}" for i, t in enumerate(items[1:]))
            return Completion(text, "stop", 100, 40)
        if isinstance(request, str) and request.endswith("Fixed set of labels:"):
            return Completion(" No", "stop", 50, 1)
        if isinstance(request, str) and request.endswith("Input:"):
            return Completion(f" <none>\nOutput: {rng.choice(WORDS)} {rng.choice(WORDS)}.", "stop", 80, 8)
        if isinstance(request, str) and request.endswith("Class label:"):
            return Completion(f" Yes\nInput: {rng.choice(WORDS)}", "stop", 80, 4)
        return Completion(" ".join(rng.choice(WORDS) for _ in range(12)) + ".", "stop", 30, 12)

    def generate(self, requests, params):
        out = [self._answer(r, p) for r, p in zip(requests, per_request(params, len(requests)))]
        self.stats.calls += 1
        self.stats.add(out)
        return out

    def close(self):
        pass


def scripted_factory(counter: list | None = None):
    """A backend factory for `execute(..., backend_factory=...)`; appends each backend to `counter`."""
    def factory(spec, cache=None):
        llm = ScriptedLLM(name=f"scripted:{spec.model}")
        if counter is not None:
            counter.append(llm)
        return CachedLLM(llm, cache, "scripted") if cache is not None else llm
    return factory
