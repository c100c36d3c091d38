"""The ray executor on a local Ray cluster (started here, 2 CPUs), with the scripted backend in
engine actors: it writes what the pipelined executor writes, survives an engine actor killed with
requests in flight, and a run whose driver is SIGKILLed resumes to the same shards."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import ray

from scripted_llm import scripted_factory
from synthloop.core.config import ConfigError, RaySection, parse_config
from synthloop.core.registry import register
from synthloop.engine import ray_executor
from synthloop.engine.ray_engines import EnginePool, placement
from synthloop.engine.ray_executor import RemoteStage
from synthloop.engine.runner import execute
from synthloop.outputs.manifest import count_problems

TESTS = Path(__file__).resolve().parent
WORKERS = {"env_vars": {"PYTHONPATH": str(TESTS)}}

CONFIG = """
[run]
name = "ray"
limit = {limit}
shard_rows = 9
cache = "{cache}"

[run.ray]
engines = 2
cpus_per_engine = 0

[llm.generator]
backend = "transformers"

[llm.teacher]
backend = "transformers"
model = "teacher"

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
type = "kill_engine"
at = {kill_at}

[[stages]]
type = "evol"
fraction = 0.5

[[stages]]
type = "distill"

[[stages]]
type = "heuristics"

[[stages]]
type = "exact_dedup"
"""


@dataclass
class KillConfig:
    at: int = -1


class KillEngine:
    """Passes batches through; when batch `at` arrives, SIGKILLs the generator's engine actor
    that has the most requests outstanding (it waits until one has some)."""

    ordered = False
    pools: list = []

    def __init__(self, at: int, ctx):
        self.at, self.ctx = at, ctx

    async def process(self, batch, batch_id):
        if batch_id == self.at:
            pool = self.ctx.llm("generator").inner
            assert isinstance(pool, EnginePool)
            KillEngine.pools.append(pool)
            pids = await pool.pids()
            while max(pool.load) == 0:
                await asyncio.sleep(0.005)
            # No await between looking and killing: the victim still holds its calls.
            victim = max(range(len(pool.load)), key=lambda i: pool.load[i])
            os.kill(pids[victim], signal.SIGKILL)
        return batch


@register("stage", "kill_engine", KillConfig)
def _build_kill(cfg, ctx):
    return KillEngine(cfg.at, ctx)


@pytest.fixture(scope="module")
def cluster():
    """A local cluster for this module; its address lets another process's driver join it. Its
    workers import the scripted backend from tests/, as a real cluster's import synthloop."""
    if ray.is_initialized():             # another module's cluster: ours needs its runtime_env
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=WORKERS)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def config(tmp_path: Path, cache: str, *, limit: int = 60, kill_at: int = -1):
    return parse_config(CONFIG.format(limit=limit, cache=tmp_path / cache, kill_at=kill_at), path="ray.toml")


def files(run: Path) -> dict[str, bytes]:
    m = json.loads((run / "manifest.json").read_text())
    return {e["path"]: (run / e["path"]).read_bytes() for e in m["shards"] + m["rejects"]}


def ids(run: Path) -> list[str]:
    return pl.read_parquet(run / "data" / "*.parquet")["id"].to_list()


def same_run(a: Path, ma: dict, b: Path, mb: dict) -> None:
    assert files(a) == files(b)                           # byte-identical shards and rejects
    assert ma["stages"] == mb["stages"] and ma["state"] == mb["state"] and ma["batches"] == mb["batches"]
    assert not count_problems(ma) and ma["complete"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The pipelined executor's run of the config (what every ray run must write)."""
    tmp = tmp_path_factory.mktemp("ref")
    m = execute(config(tmp, "ref.sqlite"), out=tmp / "ref", show_progress=False,
                backend_factory=scripted_factory(latency=0.02), executor="pipelined")
    return tmp / "ref", m


def test_ray_writes_what_pipelined_writes(cluster, reference, tmp_path, monkeypatch):
    placed, driver_backends = [], []
    real = ray_executor.RayCluster.place

    async def spy(self, stages):
        placed.extend(await real(self, stages))
        return placed
    monkeypatch.setattr(ray_executor.RayCluster, "place", spy)
    m = execute(config(tmp_path, "ray.sqlite"), out=tmp_path / "ray", show_progress=False,
                backend_factory=scripted_factory(driver_backends, latency=0.02), executor="ray")
    ref, mref = reference
    same_run(tmp_path / "ray", m, ref, mref)
    assert sorted(ids(tmp_path / "ray")) == sorted(ids(ref)) and len(set(ids(ref))) == len(ids(ref)) >= 60
    # The engines answered in actor processes (no backend was built here) and heuristics ran as tasks.
    assert driver_backends == [] and m["llm"]["last_process"]["requests"] > 100
    assert [type(s).__name__ for s in placed if s.name == "heuristics"] == [RemoteStage.__name__]


def test_engine_actor_killed_mid_run_loses_and_doubles_nothing(cluster, reference, tmp_path):
    KillEngine.pools = []
    m = execute(config(tmp_path, "kill.sqlite", kill_at=3), out=tmp_path / "ray", show_progress=False,
                backend_factory=scripted_factory(latency=0.2), executor="ray")
    (pool,) = KillEngine.pools
    assert pool.resent > 0                  # the killed engine held requests; they were sent again
    same_run(tmp_path / "ray", m, *reference)
    assert len(set(ids(tmp_path / "ray"))) == len(ids(tmp_path / "ray"))


def test_engine_pool_answers_blocking_calls_from_threads_beside_async_ones(cluster):
    """Synchronous stages (scorers) call `generate` from worker threads while async stages await
    `agenerate`: the answers are the backend's, and the pool's counters come back to zero."""
    from scripted_llm import ScriptedLLM
    from synthloop.core.llm import BackendSpec

    pool = EnginePool(BackendSpec(model="m"), scripted_factory(latency=0.02), engines=2, num_gpus=0, num_cpus=0,
                      max_restarts=0)
    try:
        reqs = [[{"role": "user", "content": f"Task number {i}"}] for i in range(40)]

        async def both():
            return await asyncio.gather(asyncio.to_thread(pool.generate, reqs[:20], {"seed": 1}),
                                        pool.agenerate(reqs[20:], {"seed": 1}))
        blocking, awaited = asyncio.run(both())
        local = ScriptedLLM(name="scripted:m").generate(reqs, {"seed": 1})
        assert [c.text for c in blocking + awaited] == [c.text for c in local]
        assert pool.name == "scripted:m" and pool.default_in_flight == 2 * 64
        assert pool.in_flight == 0 and pool.load == [0, 0] and pool.stats.requests == 40
    finally:
        pool.close()


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import ray
    import test_ray_executor                 # registers the kill_engine stage of the config
    from scripted_llm import scripted_factory
    from synthloop.core.config import load_config
    from synthloop.engine.runner import execute

    ray.init(address=sys.argv[4], log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": sys.argv[1]}})
    execute(load_config(sys.argv[2]), out=sys.argv[3], show_progress=False,
            backend_factory=scripted_factory(latency=0.15), executor="ray")
""")


def _commits(out: Path) -> int:
    try:
        return json.loads((out / "manifest.json").read_text())["commits"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_driver_sigkilled_resumes_to_the_same_shards(cluster, reference, tmp_path):
    cfg = tmp_path / "ray.toml"
    cfg.write_text(config(tmp_path, "killed.sqlite").text)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(script), str(TESTS), str(cfg), str(out), cluster],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while _commits(out) < 1 and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert p.poll() is None, p.stderr.read()[-2000:]
        p.kill()
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    before = json.loads((out / "manifest.json").read_text())
    assert not before["complete"] and 0 < before["batches"]
    m = execute(parse_config(cfg.read_text(), path=str(cfg)), out=out, show_progress=False,
                backend_factory=scripted_factory(latency=0.02), executor="ray")
    same_run(out, m, *reference)


def test_config_names_the_executor_and_ray_settings():
    good = CONFIG.format(limit=1, cache="off", kill_at=-1)
    with pytest.raises(ConfigError, match=r"ray.toml:4: \[run\] executor must be pipelined, sequential or ray"):
        parse_config(good.replace('name = "ray"', 'name = "ray"\nexecutor = "dask"'), path="ray.toml")
    with pytest.raises(ConfigError, match=r"ray.toml:\d+: \[run.ray\] unknown key 'gpus'"):
        parse_config(good.replace("engines = 2", "gpus = 2"), path="ray.toml")
    with pytest.raises(ConfigError, match=r"\[run.ray\] engines, cpus_per_engine and max_restarts must be >= 0"):
        parse_config(good.replace("engines = 2", "engines = -1"), path="ray.toml")
    assert parse_config(good.replace("engines = 2", "engines = 8"), path="a").hash() == \
        parse_config(good, path="b").hash()                  # placement is not part of what a run makes


CLI_CONFIG = """
[run]
name = "cli"
cache = "off"

[run.ray]
cpus_per_engine = 0

[llm.generator]
backend = "transformers"
model = "{model}"

[seeds]
path = "{seeds}"

[source]
type = "seeds"
batch_size = 3

[[stages]]
type = "distill"
sampling = {{ temperature = 1.0, max_tokens = 24, stop = ["e"] }}   # seeded; a random model ends nothing itself
"""


def test_cli_joins_a_cluster_and_runs_the_transformers_backend_in_an_actor(cluster, tiny_model, tmp_path):
    """`synthloop run --executor ray --address ADDR` from another process, a real backend (a tiny
    random Llama) built in the engine actor: the shards are the local pipelined run's."""
    from synthloop.engine.cli import main

    seeds = tmp_path / "seeds.txt"
    seeds.write_text("".join(f"Name three uses of a {w} in a small town.\n"
                             for w in ("river", "bridge", "lantern", "compass", "ledger", "violin", "glacier")))
    cfg = tmp_path / "cli.toml"
    cfg.write_text(CLI_CONFIG.format(model=tiny_model, seeds=seeds))
    done = subprocess.run([sys.executable, "-m", "synthloop.engine.cli", "run", str(cfg), "--out", str(tmp_path / "ray"),
                           "--quiet", "--executor", "ray", "--address", cluster],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ray: 1 engine(s) for transformers:" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["complete"]
    assert main(["run", str(cfg), "--out", str(tmp_path / "local"), "--quiet"]) == 0
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["llm"]["last_process"]["requests"] == 7 and m["stages"][-1]["kept"] + m["stages"][1]["dropped_total"] == 7
    assert m["stages"][-1]["kept"] > 0         # the shards hold the engine's text
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_placement_gives_each_model_backend_its_share_of_the_gpus():
    from synthloop.core.llm import BackendSpec

    vllm, openai = BackendSpec(backend="vllm"), BackendSpec(backend="openai")
    assert placement(RaySection(), vllm, 1, 8) == (8, 1.0, 1)              # one engine per GPU
    assert placement(RaySection(), vllm, 2, 8) == (4, 1.0, 1)              # generator + teacher
    assert placement(RaySection(gpus_per_engine=2), vllm, 1, 8) == (4, 2, 1)   # tensor parallel 2
    assert placement(RaySection(), vllm, 1, 0) == (1, 0.0, 1)              # no GPUs: one engine
    assert placement(RaySection(), openai, 1, 8) == (1, 0.0, 1)            # an HTTP client needs no GPU
    assert placement(RaySection(engines=3, cpus_per_engine=4), vllm, 1, 0) == (3, 0.0, 4)
    with pytest.raises(ValueError, match=r"gpus_per_engine = 1, but the cluster has 0 GPU"):
        placement(RaySection(gpus_per_engine=1), vllm, 1, 0)



def test_rounds_flags_reach_every_round(tmp_path):
    """`synthloop rounds --executor ray --address A`: every round's run config names the ray
    executor and the cluster (each round's generation is then a run like the ones above)."""
    from synthloop.engine.cli import parser, _place
    from synthloop.engine.rounds import load_rounds_config, round_config

    path = tmp_path / "loop.toml"
    path.write_text(CONFIG.format(limit=12, cache="off", kill_at=-1) + "\n[rounds]\ncount = 2\n")
    args = parser().parse_args(["rounds", str(path), "--executor", "ray", "--address", "10.0.0.1:6379"])
    cfg = load_rounds_config(path)
    _place(cfg.run.run, args)
    for r in range(2):
        run = round_config(cfg, r, adapter=None, seeds=None, earlier=[]).run
        assert (run.executor, run.ray) == ("ray", {"engines": 2, "cpus_per_engine": 0, "address": "10.0.0.1:6379"})
