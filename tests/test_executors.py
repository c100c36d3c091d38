"""Executors under concurrency, on the scripted backend with random latencies per request.

The pipelined executor writes exactly what the sequential one writes (shards, rejects, counts,
state), keeps many requests in flight, feeds ordered stages in id order, survives a SIGKILL
with requests in flight, turns failing requests into counted row errors, keeps memory flat in
run length, and replays a warm request cache without a single model call.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from scripted_llm import Batches, FnLLM, context, scripted_factory
from synthloop.engine import runner
from synthloop.core.config import parse_config
from synthloop.core.registry import register
from synthloop.generator.rouge import NoveltyIndex
from synthloop.engine.runner import execute
from synthloop.core.schema import make_batch
from synthloop.generator.self_instruct import SelfInstruct, SelfInstructConfig
from synthloop.outputs.manifest import count_problems

TESTS = Path(__file__).resolve().parent

MIXED = """
[run]
name = "mixed"
limit = {limit}
shard_rows = 9
cache = "{cache}"
in_flight = {in_flight}

[llm.generator]
backend = "transformers"

[llm.teacher]
backend = "transformers"
model = "teacher"

[llm.judge]
backend = "transformers"
model = "judge"

[source]
type = "mix"
sources = [
  {{ type = "self_instruct", prompts_per_step = 3, steps_in_flight = 3 }},
  {{ type = "magpie", pre_query = "<|im_start|>user\\n", end_of_turn = "<|im_end|>", requests_per_step = 4 }},
]
weights = [2, 1]

[[stages]]
type = "instances"

[[stages]]
type = "probe"

[[stages]]
type = "evol"
fraction = 0.5
generations = 2

[[stages]]
type = "distill"
n = 2

[[stages]]
type = "heuristics"

[[stages]]
type = "exact_dedup"
"""


@dataclass
class ProbeConfig:
    pass


class Probe:
    """An ordered stage that records the batch ids it sees (they must come in order)."""

    ordered = True
    seen: list = []

    async def process(self, batch, batch_id):
        Probe.seen.append(batch_id)
        return batch

    def state(self) -> dict:
        return {"last": Probe.seen[-1] if Probe.seen else None}


@register("stage", "probe", ProbeConfig)
def _build_probe(cfg, ctx):
    return Probe()


def mixed(tmp_path, *, limit=60, in_flight=0, cache="req.sqlite"):
    return parse_config(MIXED.format(limit=limit, cache=tmp_path / cache, in_flight=in_flight), path="mixed.toml")


def files(run: Path) -> dict[str, bytes]:
    m = json.loads((run / "manifest.json").read_text())
    return {e["path"]: (run / e["path"]).read_bytes() for e in m["shards"] + m["rejects"]}


def kept(run: Path) -> pl.DataFrame:
    m = json.loads((run / "manifest.json").read_text())
    return pl.concat([pl.read_parquet(run / e["path"]) for e in m["shards"]])


@pytest.fixture
def executors(monkeypatch):
    """Every executor `execute` builds, for inspection."""
    made = []
    real = runner.make_executor

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]
    monkeypatch.setattr(runner, "make_executor", spy)
    return made


def test_pipelined_writes_what_sequential_writes_under_random_latencies(tmp_path, executors):
    Probe.seen = []
    backends: list = []
    seq = execute(mixed(tmp_path, cache="a.sqlite"), out=tmp_path / "seq", show_progress=False,
                  backend_factory=scripted_factory(latency=0.01), executor="sequential")
    assert Probe.seen == list(range(len(Probe.seen)))
    Probe.seen = []
    pipe = execute(mixed(tmp_path, cache="b.sqlite", in_flight=200), out=tmp_path / "pipe", show_progress=False,
                   backend_factory=scripted_factory(backends, latency=0.05))
    assert Probe.seen == list(range(len(Probe.seen)))               # the ordered stage, in id order
    assert files(tmp_path / "pipe") == files(tmp_path / "seq")      # byte-identical shards and rejects
    assert pipe["stages"] == seq["stages"] and pipe["state"] == seq["state"] and pipe["batches"] == seq["batches"]
    assert not count_problems(pipe) and pipe["complete"]
    # It really was pipelined: several batches and many requests were in flight at once.
    assert executors[1].peak_batches >= 4
    assert max(b.peak_in_flight for b in backends) > 30


def test_warm_rerun_makes_no_model_calls_and_writes_identical_shards(tmp_path, executors):
    first: list = []
    m1 = execute(mixed(tmp_path), out=tmp_path / "a", show_progress=False,
                 backend_factory=scripted_factory(first, latency=0.02))
    assert executors[0].peak_batches > 1                     # the first run worked ahead of its limit
    again: list = []
    m2 = execute(mixed(tmp_path), out=tmp_path / "b", show_progress=False,
                 backend_factory=scripted_factory(again, latency=0.02))
    assert sum(b.stats.requests for b in again) == 0 and m2["llm"]["last_process"]["requests"] == 0
    assert files(tmp_path / "b") == files(tmp_path / "a") and m2["stages"] == m1["stages"]
    assert executors[1].peak_batches == 1                    # nothing past the limit was started


def test_failing_requests_in_flight_become_counted_row_errors(tmp_path):
    cfg = mixed(tmp_path)
    m = execute(cfg, out=tmp_path / "run", show_progress=False,
                backend_factory=scripted_factory(latency=0.02, fail_rate=0.15))
    assert m["complete"] and not count_problems(m) and kept(tmp_path / "run").height >= 60
    errors = {s["name"]: s["dropped"].get("generation_error", 0) for s in m["stages"]}
    assert errors["instances"] > 0 and errors["evol"] > 0
    assert m["llm"]["last_process"]["errors"] > 0
    ref = execute(mixed(tmp_path, cache="ref.sqlite"), out=tmp_path / "ref", show_progress=False,
                  backend_factory=scripted_factory(fail_rate=0.15), executor="sequential")
    assert files(tmp_path / "run") == files(tmp_path / "ref") and m["stages"] == ref["stages"]


RUN_SCRIPT = textwrap.dedent("""
    import asyncio
    import os
    import signal
    import sys
    sys.path.insert(0, sys.argv[1])
    import scripted_llm
    from synthloop.core.config import load_config
    from synthloop.engine.runner import execute

    class Tracked(scripted_llm.ScriptedLLM):      # keeps a file saying how many requests are in flight
        def gauge(self, n):
            with open(sys.argv[4], "w") as fh:
                fh.write(str(n))

        held = 0                                  # requests held back by the test

        async def agenerate(self, requests, params):
            self.gauge(self.in_flight + self.held + len(requests))
            try:
                self.held += len(requests)
                try:
                    while os.path.exists(sys.argv[4] + ".hold"):     # the test holds answers back
                        await asyncio.sleep(0.05)
                finally:
                    self.held -= len(requests)
                return await super().agenerate(requests, params)
            finally:
                self.gauge(self.in_flight + self.held)

    def factory(spec, cache=None):
        return scripted_llm.CachedLLM(Tracked(name=f"scripted:{spec.model}", latency=0.3), cache, "scripted")

    from synthloop.engine.cli import _terminate
    signal.signal(signal.SIGTERM, _terminate)     # as `synthloop run` does: SIGTERM commits like Ctrl-C
    try:
        execute(load_config(sys.argv[2]), out=sys.argv[3], show_progress=False, backend_factory=factory)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def _gauge(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _commits(out: Path) -> int:
    try:
        return json.loads((out / "manifest.json").read_text())["commits"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _start_and_signal(cfg: Path, out: Path, gauge: Path, script: Path, sig: int, *, hold: bool = False) -> int:
    """Start (or resume) a scripted run; once it has made a commit of its own and has many
    requests in flight, send `sig`; return the exit code. With `hold`, the backend stops answering
    after that commit, so the run cannot finish before the signal however slow the machine is."""
    gauge.unlink(missing_ok=True)
    held = Path(str(gauge) + ".hold")
    held.unlink(missing_ok=True)
    after = _commits(out) + 1
    p = subprocess.Popen([sys.executable, str(script), str(TESTS), str(cfg), str(out), str(gauge)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while _commits(out) < after and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if hold:
            held.touch()
        while _gauge(gauge) < 10 and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert p.poll() is None, p.stderr.read()[-2000:]
        p.send_signal(sig)
        return p.wait(timeout=120)
    finally:
        held.unlink(missing_ok=True)
        if p.poll() is None:
            p.kill()


def _scripted_run_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    cfg = tmp_path / "mixed.toml"
    cfg.write_text(mixed(tmp_path, limit=150).text.replace('type = "probe"', 'type = "heuristics"\nname = "h0"'))
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    return cfg, script, tmp_path / "in_flight"


def _finish_and_compare(tmp_path: Path, cfg: Path, out: Path) -> None:
    m = execute(parse_config(cfg.read_text(), path=str(cfg)), out=out, show_progress=False,
                backend_factory=scripted_factory(latency=0.02))
    clean = execute(parse_config(cfg.read_text(), path=str(cfg)), out=tmp_path / "clean", show_progress=False,
                    backend_factory=scripted_factory(latency=0.02), executor="sequential")
    assert m["complete"] and not count_problems(m)
    assert files(out) == files(tmp_path / "clean")
    assert m["stages"] == clean["stages"] and m["state"] == clean["state"]


def test_sigkill_with_many_requests_in_flight_resumes_to_identical_shards(tmp_path):
    cfg, script, gauge = _scripted_run_files(tmp_path)
    out = tmp_path / "killed"
    for _ in range(2):
        assert _start_and_signal(cfg, out, gauge, script, signal.SIGKILL, hold=True) == -signal.SIGKILL
    _finish_and_compare(tmp_path, cfg, out)


def test_sigterm_anywhere_leaves_a_consistent_run_that_resumes_identically(tmp_path):
    """SIGTERM lands at a random instant (inside a commit, too); whatever it interrupted, the
    manifest adds up and the resumed run equals a clean one."""
    cfg, script, gauge = _scripted_run_files(tmp_path)
    out = tmp_path / "stopped"
    assert _start_and_signal(cfg, out, gauge, script, signal.SIGTERM) == 130
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and not count_problems(m)
    _finish_and_compare(tmp_path, cfg, out)


@dataclass
class InterruptConfig:
    at: int = 0


class Interrupt:
    """Ctrl-C arriving while batch `at` is in this stage."""

    ordered = False

    def __init__(self, at: int):
        self.at = at

    async def process(self, batch, batch_id):
        if batch_id == self.at:
            raise KeyboardInterrupt
        return batch


@register("stage", "interrupt", InterruptConfig)
def _build_interrupt(cfg, ctx):
    return Interrupt(cfg.at)


@pytest.mark.parametrize("executor", ["sequential", "pipelined"])
def test_ctrl_c_commits_the_batches_already_applied(tmp_path, executor):
    text = mixed(tmp_path, limit=80).text.replace("shard_rows = 9", "shard_rows = 1000")   # no commit before the end
    stopped = parse_config(text.replace('type = "probe"', 'type = "interrupt"\nat = 4'), path="m.toml")
    with pytest.raises(KeyboardInterrupt):
        execute(stopped, out=tmp_path / "run", show_progress=False, backend_factory=scripted_factory(latency=0.01),
                executor=executor)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())   # written by the interrupt
    assert m["commits"] == 1 and not count_problems(m) and not m["complete"]
    # Sequentially batches 0-3 were applied; pipelined, those that had reached the commit point.
    assert m["batches"] == 4 if executor == "sequential" else m["batches"] <= 4
    assert m["pending_rows"]["kept"] == m["stages"][-1]["kept"]


SEEDS_ONLY = """
[run]
name = "long"
limit = 0
shard_rows = 50
cache = "{cache}"

[llm.generator]
backend = "transformers"

[source]
type = "seeds"
batch_size = 8
repeat = {repeat}

[[stages]]
type = "distill"

[[stages]]
type = "heuristics"
"""


MEMORY_PROBE = """
import gc, json, sys, tracemalloc
from pathlib import Path
from scripted_llm import scripted_factory
from synthloop.core.config import parse_config
from synthloop.engine import runner
from test_executors import SEEDS_ONLY

tmp, made, real = Path(sys.argv[1]), [], runner.make_executor
runner.make_executor = lambda *a, **kw: made.append(real(*a, **kw)) or made[-1]
peaks, batches = [], []
for repeat in (1, 4, 16):                # the first run pays one-time costs (imports, caches)
    cfg = parse_config(SEEDS_ONLY.format(cache=tmp / f"r{repeat}.sqlite", repeat=repeat), path="long.toml")
    gc.collect()
    tracemalloc.start()
    m = runner.execute(cfg, out=tmp / f"r{repeat}", show_progress=False,
                       backend_factory=scripted_factory(latency=0.002))
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert m["complete"]
    batches.append(m["batches"])
print(json.dumps({"peaks": peaks, "batches": batches,
                  "bounded": all(e.peak_batches <= e.max_batches for e in made)}))
"""


def test_memory_stays_flat_in_run_length(tmp_path):
    """The same seeds again and again (their ids repeat, so the dataset stops growing): what a
    longer run holds at its peak is what a short one holds. In a fresh process, so that no
    other test's threads allocate while it is measured (tracemalloc counts every thread)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    peaks, batches = got["peaks"][1:], got["batches"][1:]
    assert batches[1] == 4 * batches[0] and got["bounded"]
    assert peaks[1] < 1.2 * peaks[0], peaks          # 4x the batches; only the manifest's shard list grows


def test_self_instruct_with_steps_in_flight_draws_from_a_stale_pool_and_stays_novel():
    """Step k's prompts show only machine instructions kept by steps <= k - 3, also right after
    a resume; every kept instruction is still novel (ROUGE-L <= 0.7) against the seeds and every
    earlier one."""
    import random
    words = "river mountain budget recipe planet garden poem email invoice bridge engine lesson".split()

    def fn(prompt, p):
        rng = random.Random(p["seed"])
        return " " + "\n10. ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))).capitalize() + "."
                                   for _ in range(4))
    def source():
        llm = FnLLM(fn, "gen")
        return SelfInstruct(SelfInstructConfig(prompts_per_step=4, steps_in_flight=3), context({"generator": llm})), llm
    src, llm = source()
    batches = Batches(src)
    kept_by_step = []
    for k in range(8):
        b = next(batches)
        kept_by_step.append(b.filter(pl.col("drop_reason").is_null())["instruction"].to_list())
        if k == 3:
            state = src.state()
    batches.close()

    # Resumed after step 4 (steps 4-6 launched at once): the same prompts as without the resume.
    class Committed:
        def passed(self):
            rows = [{"instruction": t, "method": "self_instruct"} for step in kept_by_step[:4] for t in step]
            return make_batch(rows).lazy()
    again, llm2 = source()
    again.restore(state, Committed())
    resumed = Batches(again)
    for _ in range(4):
        next(resumed)
    resumed.close()
    assert [r for r, _ in llm2.sent[:16]] == [r for r, _ in llm.sent[16:32]]
    seeds = {" ".join(t.split()) for t in src.seed_tasks}
    for k in range(8):
        allowed = set().union(*kept_by_step[:max(0, k - 2)])       # steps <= k - 3
        for prompt, _ in llm.sent[4 * k:4 * k + 4]:                # one call of 4 prompts per step
            shown = set(re.findall(r"^\d+\. (.*)$", prompt, re.M))
            assert len(shown) == 8 and shown - seeds <= allowed, k
    assert any(set().union(*kept_by_step[:k - 2]) & set(re.findall(r"^\d+\. (.*)$", llm.sent[4 * k][0], re.M))
               for k in range(3, 8))                               # machine examples do appear
    index = NoveltyIndex(threshold=0.7)
    for t in seeds:
        index.add(t)
    for step in kept_by_step:                                      # in the order they were kept
        for t in step:
            assert index.is_novel(t)
            index.add(t)
    assert sum(map(len, kept_by_step)) > 20


def test_engine_efficiency_bench_replays_what_the_run_sent(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("engine_efficiency", TESTS.parent / "bench" / "engine_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backends: list = []
    r = bench.measure(mixed(tmp_path, limit=20), scripted_factory(backends, latency=0.01), show_progress=False)
    # Every answered request was recorded once and replayed once, on the run's own backends.
    answered = sum(b.stats.requests for b in backends)
    assert r["records"] >= 20 and answered == 2 * r["requests"] and r["requests"] > 50
    assert r["pipeline_llm_s"] > 0 and r["replay_s"] > 0 and r["ratio"] == r["replay_s"] / r["pipeline_llm_s"]
