"""A scripted LLM for unit tests of prompt plumbing, parsing and checkpointing.

It answers each kind of synthloop prompt in the expected shape with text derived from a hash of
the request, so answers are deterministic and distinct. It counts what reached it. With
`latency`, each request of `agenerate` takes a random time up to that many seconds (drawn from
the request's hash, so reruns are alike), and `fail_rate` fails that share of requests (also by
hash): the executors' concurrency tests. Model-backed tests (test_backends.py, test_cli_e2e.py)
exercise the real backends.
"""
from __future__ import annotations

import asyncio
import hashlib
import random

from synthloop.generator.evol_prompts import HARDER_CLOSE, HARDER_OPEN, NEW_CLOSE, NEW_OPEN, SOURCE_CLOSE, SOURCE_OPEN
from synthloop.core.llm.base import Completion, Stats, per_request
from synthloop.core.llm.cache import CachedLLM

#: The pre-query prefix scripted Magpie runs use (SmolLM2's user-turn opening).
PRE_QUERY = "<|im_start|>user\n"

WORDS = ("river mountain budget recipe planet garden poem email invoice bridge engine lesson orbit "
         "harvest ledger violin glacier tariff pixel sonnet protein canyon mortgage comet lantern "
         "quartz meadow syntax voltage archive compass").split()


def _key(request, params) -> str:
    return hashlib.sha256((repr(request) + repr(sorted(params.items()))).encode()).hexdigest()


class ScriptedLLM:
    def __init__(self, name: str = "scripted", fail_every: int = 0, *, latency: float = 0.0, fail_rate: float = 0.0):
        self.name, self.stats, self.fail_every = name, Stats(), fail_every
        self.latency, self.fail_rate = latency, fail_rate
        self.seen = 0
        self.in_flight = self.peak_in_flight = 0
        self.default_in_flight = 64

    def _answer(self, request, params) -> Completion:
        key = _key(request, params)
        rng = random.Random(key)
        self.seen += 1
        if self.fail_every and self.seen % self.fail_every == 0:
            return Completion("", "error", error="scripted failure")
        if self.fail_rate and random.Random("fail" + key).random() < self.fail_rate:
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
        if isinstance(request, str) and request.endswith(PRE_QUERY):
            return self._magpie(rng)
        user = request[-1]["content"] if not isinstance(request, str) else ""
        if SOURCE_OPEN in user:
            return self._evolve(user, rng)
        if user.endswith("SAME or DIFFERENT."):
            return Completion("SAME" if rng.random() < 0.1 else "DIFFERENT", "stop", 60, 1)
        if 'finish with "Score: N"' in user:
            return Completion(f"Covers the task. Score: {rng.randint(1, 10)}", "stop", 90, 6)
        return Completion(" ".join(rng.choice(WORDS) for _ in range(12)) + ".", "stop", 30, 12)

    @staticmethod
    def _evolve(prompt: str, rng: random.Random) -> Completion:
        """Evol rewrites: mostly a grown task; sometimes the task unchanged or a leaked marker."""
        task = prompt.split(SOURCE_OPEN, 1)[1].split(SOURCE_CLOSE, 1)[0].strip()
        breadth = NEW_OPEN in prompt
        open_, close = (NEW_OPEN, NEW_CLOSE) if breadth else (HARDER_OPEN, HARDER_CLOSE)
        roll = rng.random()
        if roll < 0.1:
            new = task
        elif roll < 0.15:
            new = f"Here is the harder task: {task}"
        elif breadth:
            new = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "?"
        else:
            new = f"{task} Also cover the {rng.choice(WORDS)}, the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."
        return Completion(f"{open_}\n{new}\n{close}", "stop", 200, 30)

    @staticmethod
    def _magpie(rng: random.Random) -> Completion:
        """Magpie instructions: mostly a question; sometimes too short or empty."""
        roll = rng.random()
        if roll < 0.1:
            return Completion("", "stop", 20, 0)
        if roll < 0.2:
            return Completion("Why?", "stop", 20, 2)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        return Completion(f"How do I plan a {words}?<|im_end|>", "stop", 20, 12)

    def generate(self, requests, params):
        out = [self._answer(r, p) for r, p in zip(requests, per_request(params, len(requests)))]
        self.stats.calls += 1
        self.stats.add(out)
        return out

    async def agenerate(self, requests, params):
        plist = per_request(params, len(requests))
        self.in_flight += len(requests)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

        async def one(r, p):
            if self.latency:
                await asyncio.sleep(random.Random("latency" + _key(r, p)).uniform(0, self.latency))
            return self._answer(r, p)
        try:
            out = list(await asyncio.gather(*(one(r, p) for r, p in zip(requests, plist))))
        finally:
            self.in_flight -= len(requests)
        self.stats.calls += 1
        self.stats.add(out)
        return out

    def close(self):
        pass


def scripted_factory(counter: list | None = None, **options):
    """A backend factory for `execute(..., backend_factory=...)`; appends each backend to `counter`;
    `options` go to every `ScriptedLLM` (latency, fail_rate)."""
    def factory(spec, cache=None):
        llm = ScriptedLLM(name=f"scripted:{spec.model}", **options)
        if counter is not None:
            counter.append(llm)
        return CachedLLM(llm, cache, "scripted") if cache is not None else llm
    return factory


class FnLLM:
    """A backend whose answers come from ``fn(request, params) -> Completion | str``; it records
    every request and its settings in `sent` (for asserting prompt plumbing)."""

    def __init__(self, fn, name: str = "fn"):
        self.fn, self.name, self.stats, self.sent = fn, name, Stats(), []
        self.in_flight, self.default_in_flight = 0, 64

    def generate(self, requests, params):
        out = []
        for r, p in zip(requests, per_request(params, len(requests))):
            self.sent.append((r, p))
            c = self.fn(r, p)
            out.append(Completion(c, "stop", 10, 5) if isinstance(c, str) else c)
        self.stats.calls += 1
        self.stats.add(out)
        return out

    async def agenerate(self, requests, params):
        return self.generate(requests, params)

    def close(self):
        pass


def context(llms: dict, toml: str = "", seeds=None):
    """A registry `Context` whose roles map to the given backends (missing roles fall back to
    `llms["generator"]`, as in a run). `toml` adds [llm.*] tables for roles that must exist."""
    from pathlib import Path

    from synthloop.core.config import parse_config
    from synthloop.core.registry import Context
    from synthloop.seeds.loaders import load_seeds

    roles = "".join(f'[llm.{r}]\nmodel = "{r}"\n' for r in llms)
    cfg = parse_config(roles + toml, path="test.toml")
    return Context(config=cfg, run_dir=Path("."), seeds=seeds or load_seeds("bundled"),
                   open_llm=lambda spec: llms.get(spec.model, llms["generator"]))


def run_batch(stage, batch, batch_id: int = 0):
    """One batch through a stage outside an executor, its tally folded as a commit would."""
    out = asyncio.run(stage.process(batch, batch_id))
    if hasattr(stage, "fold"):
        stage.fold(batch_id)
    return out


class Batches:
    """Pull batches from a source one at a time from synchronous test code (one event loop for
    the whole iteration, as an executor has)."""

    def __init__(self, source):
        self.loop = asyncio.new_event_loop()
        self.it = source()

    def __next__(self):
        try:
            return self.loop.run_until_complete(anext(self.it))
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return self

    def close(self):
        """End the source (cancelling the steps it launched ahead) and the loop."""
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.it.aclose())
            self.loop.run_until_complete(asyncio.sleep(0))     # let the cancelled steps finish
            self.loop.close()


def first(source):
    """The first batch of a source (then the source is closed)."""
    batches = Batches(source)
    try:
        return next(batches)
    finally:
        batches.close()
