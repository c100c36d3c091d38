"""The one LLM seam: a batch of requests in, one completion per request out, order kept.

A request is either a chat (a list of ``{"role", "content"}`` messages, rendered with the model's
chat template) or a raw prompt string (sent as-is: completion-style few-shot prompts, Magpie's
pre-query templates). Sampling settings are a plain dict handed to the backend's own object
(`vllm.SamplingParams(**params)`, `model.generate(**params)`, the OpenAI request body); the few
names that differ between backends are mapped in one place per backend. A list of dicts gives
each request its own settings.

A request that fails comes back as a `Completion` with ``finish_reason == "error"``: per-row
errors are counted, a batch never dies for one bad row.

Every backend offers the same call twice: `generate` blocks, `agenerate` is a coroutine. Executors
run stages concurrently on one event loop and call `agenerate`, so requests of many batches and
stages reach the engine together (vLLM's continuous batching, the openai backend's concurrent
HTTP requests). `in_flight` counts the backend's requests submitted and not yet answered: the
executor reads it to keep the engine busy without queueing without bound, and the progress line
shows it. `default_in_flight` is how many requests a backend wants in flight to stay busy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol, Sequence, Union

Message = Mapping[str, str]
Request = Union[str, Sequence[Message]]
Params = Union[Mapping, Sequence[Mapping]]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str            # "stop", "length" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"


@dataclass
class Stats:
    """Counters a backend keeps; the runner reports them (tokens/s, errors, cache hits)."""

    calls: int = 0                # generate() calls that reached the model
    requests: int = 0             # requests the model answered (errors included)
    errors: int = 0
    retries: int = 0              # attempts repeated after a transient failure (openai backend)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, done: Sequence[Completion]) -> None:
        self.requests += len(done)
        for c in done:
            self.errors += not c.ok
            self.prompt_tokens += c.prompt_tokens
            self.completion_tokens += c.completion_tokens

    def as_dict(self) -> dict:
        return asdict(self)


class LLM(Protocol):
    """What every backend offers. `name` identifies the model (cache keys, the `model` column)."""

    name: str
    stats: Stats
    in_flight: int
    default_in_flight: int

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]: ...

    async def agenerate(self, requests: Sequence[Request], params: Params) -> list[Completion]: ...

    def close(self) -> None: ...


def per_request(params: Params, n: int) -> list[dict]:
    """Expand `params` to one dict per request.

    >>> per_request({"temperature": 0.5}, 2)
    [{'temperature': 0.5}, {'temperature': 0.5}]
    """
    if isinstance(params, Mapping):
        return [dict(params) for _ in range(n)]
    params = [dict(p) for p in params]
    if len(params) != n:
        raise ValueError(f"{len(params)} params for {n} requests")
    return params


def cut_at_stop(text: str, stop: Sequence[str] | str | None) -> tuple[str, bool]:
    """Cut `text` at the first stop string; returns (text, whether a stop string was found)."""
    if not stop:
        return text, False
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class BackendSpec:
    """How to build a backend: which kind, which model, and the backend's own constructor options."""

    backend: str = "transformers"          # transformers | vllm | openai
    model: str = "embedded"
    options: dict = field(default_factory=dict)
