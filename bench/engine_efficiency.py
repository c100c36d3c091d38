"""How busy a pipeline keeps its engine: a pipeline run against a raw replay of its own requests.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python bench/engine_efficiency.py configs/quickstart.toml [--executor sequential] [--in-flight N]

Runs the config into a temporary directory with the request cache off (every request reaches the
engine) and records every request the engine answered: the request, its sampling settings and
how many tokens it wrote. Then, on the same engine (same process, same settings, prefix cache
reset), replays exactly those requests in one call, each forced to write the same number of
tokens (`min_tokens = max_tokens = n`, `ignore_eos`, no stop strings), so the replay does the
same token work with nothing between the requests. Prints the pipeline's LLM time (first request
sent to last answer), the replay time and their ratio: 1.0 means the pipeline kept the engine as
busy as a single batch call does. Requests a pipeline started and then dropped at its limit are
not replayed: their work counts against the pipeline.

The replay forces lengths with vLLM's sampling names, so the backends are vllm and openai (against
`vllm serve`); `measure` takes any backend factory (tests pass the scripted one).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

FORCED = ("max_tokens", "min_tokens", "ignore_eos")


class Recorder:
    """A backend wrapper that keeps every answered request with its timing; `close` is deferred
    so the replay runs on the very same engine."""

    def __init__(self, inner):
        self.inner, self.name, self.stats = inner, inner.name, inner.stats
        self.sent: list[tuple] = []            # (request, params, completion tokens, prompt tokens)
        self.first = self.last = None

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    @property
    def default_in_flight(self) -> int:
        return self.inner.default_in_flight

    def _keep(self, requests, params, done, t0) -> None:
        from synthloop.core.llm.base import per_request

        self.first = t0 if self.first is None else min(self.first, t0)
        self.last = time.perf_counter()
        self.sent += [(r, p, c.completion_tokens, c.prompt_tokens)
                      for r, p, c in zip(requests, per_request(params, len(requests)), done) if c.ok]

    def generate(self, requests, params):
        t0 = time.perf_counter()
        done = self.inner.generate(requests, params)
        self._keep(requests, params, done, t0)
        return done

    async def agenerate(self, requests, params):
        t0 = time.perf_counter()
        done = await self.inner.agenerate(requests, params)
        self._keep(requests, params, done, t0)
        return done

    def close(self) -> None:
        pass


def forced(params: dict, tokens: int) -> dict:
    """Settings that make a request write exactly `tokens` tokens (at least 1).

    >>> forced({"temperature": 0.7, "max_tokens": 256, "stop": ["\\n\\n"], "seed": 3}, 40)
    {'temperature': 0.7, 'seed': 3, 'max_tokens': 40, 'min_tokens': 40, 'ignore_eos': True}
    """
    p = {k: v for k, v in params.items() if k not in ("stop", "max_new_tokens", *FORCED)}
    n = max(1, tokens)
    return {**p, "max_tokens": n, "min_tokens": n, "ignore_eos": True}


def measure(cfg, backend_factory, *, executor: str | None = None, show_progress: bool = True) -> dict:
    """Run `cfg` (cache off) on recorded backends, then replay each backend's requests in one call."""
    from synthloop.engine.runner import execute

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cache="off"))
    recorders: list[Recorder] = []

    def factory(spec, cache=None):
        recorders.append(Recorder(backend_factory(spec, cache=None)))
        return recorders[-1]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            manifest = execute(cfg, out=Path(tmp) / "run", show_progress=show_progress, backend_factory=factory,
                               executor=executor)
            wall = time.perf_counter() - t0
        used = [r for r in recorders if r.sent]
        pipeline = max(r.last for r in used) - min(r.first for r in used)
        replay, replay_tokens = 0.0, 0
        for rec in used:
            if hasattr(rec.inner, "reset_prefix_cache"):
                rec.inner.reset_prefix_cache()    # the replay must not reuse the run's KV blocks
            t0 = time.perf_counter()
            done = rec.inner.generate([s[0] for s in rec.sent], [forced(s[1], s[2]) for s in rec.sent])
            replay += time.perf_counter() - t0
            replay_tokens += sum(c.completion_tokens for c in done)
    finally:
        for rec in recorders:
            rec.inner.close()
    return {"records": manifest["stages"][-1]["kept"], "requests": sum(len(r.sent) for r in used),
            "prompt_tokens": sum(s[3] for r in used for s in r.sent),
            "completion_tokens": sum(s[2] for r in used for s in r.sent), "replay_tokens": replay_tokens,
            "run_wall_s": wall, "pipeline_llm_s": pipeline, "replay_s": replay, "ratio": replay / pipeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--limit", type=int, help="override [run] limit")
    ap.add_argument("--executor", choices=["pipelined", "sequential"], help="override [run] executor")
    ap.add_argument("--in-flight", type=int, help="override [run] in_flight")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args()
    from synthloop.core.config import load_config
    from synthloop.core.llm import open_llm

    cfg = load_config(args.config)
    bad = sorted({s.backend for s in cfg.llm.values()} - {"vllm", "openai"})
    if bad:
        ap.error(f"the replay forces lengths with vLLM's sampling settings; backends {bad} cannot replay")
    run = cfg.run
    if args.limit is not None:
        run = dataclasses.replace(run, limit=args.limit)
    if args.in_flight is not None:
        run = dataclasses.replace(run, in_flight=args.in_flight)
    r = measure(dataclasses.replace(cfg, run=run), open_llm, executor=args.executor, show_progress=not args.quiet)
    print(f"{args.config}: {r['records']} records, {r['requests']} requests, {r['prompt_tokens']} prompt tokens, "
          f"{r['completion_tokens']} completion tokens (replay wrote {r['replay_tokens']})")
    print(f"run wall (engine start-up included)  {r['run_wall_s']:8.1f} s")
    print(f"pipeline LLM time                     {r['pipeline_llm_s']:8.1f} s  "
          f"{r['completion_tokens'] / r['pipeline_llm_s']:7.1f} completion tok/s")
    print(f"replay, one call                      {r['replay_s']:8.1f} s  "
          f"{r['replay_tokens'] / r['replay_s']:7.1f} completion tok/s")
    print(f"ratio replay / pipeline               {r['ratio']:8.2f}")


if __name__ == "__main__":
    main()
