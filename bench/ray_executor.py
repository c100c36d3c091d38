"""What the ray executor costs over the pipelined one when the engines are not the bottleneck.

    python bench/ray_executor.py [--latency 0.05] [--engines 2] [--repeat 3]

Runs one config twice in the same process, pipelined and on a local Ray cluster: the bundled seeds
(`repeat` passes, 16 rows a batch), teacher distillation with 2 samples per row, heuristics. The
backend is the scripted one from tests/ (each request waits a random time up to `latency` s), so
the time measured is the executors' own: request routing, actor calls, Arrow batches to the
heuristics tasks and back. Prints both wall times (Ray's cluster start excluded, its engine
actors' start included), requests per second and the ratio; checks the two runs wrote the same
shards.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

CONFIG = """
[run]
name = "bench"
cache = "off"
in_flight = 256

[run.ray]
engines = {engines}
cpus_per_engine = 0

[llm.generator]
backend = "transformers"

[source]
type = "seeds"
batch_size = 16
repeat = {repeat}

[[stages]]
type = "distill"
n = 2
judge_role = ""

[[stages]]
type = "heuristics"
"""


def shards(run: Path) -> list[bytes]:
    m = json.loads((run / "manifest.json").read_text())
    return [(run / e["path"]).read_bytes() for e in m["shards"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import ray
    from scripted_llm import scripted_factory
    from synthloop.core.config import parse_config
    from synthloop.engine.runner import execute

    cfg = parse_config(CONFIG.format(engines=args.engines, repeat=args.repeat), path="bench.toml")
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    start = time.perf_counter() - t0
    times, requests = {}, 0
    for executor in ("pipelined", "ray"):
        t0 = time.perf_counter()
        m = execute(cfg, out=tmp / executor, show_progress=False, executor=executor,
                    backend_factory=scripted_factory(latency=args.latency))
        times[executor] = time.perf_counter() - t0
        requests = m["llm"]["last_process"]["requests"]
    ray.shutdown()
    assert shards(tmp / "ray") == shards(tmp / "pipelined"), "the executors wrote different shards"
    print(f"ray cluster start (not counted): {start:.1f} s; {requests} requests, latency <= {args.latency} s each, "
          f"{args.engines} engine actors")
    for name, t in times.items():
        print(f"{name:10s} {t:7.2f} s  {requests / t:8.1f} requests/s")
    print(f"ratio ray/pipelined wall time: {times['ray'] / times['pipelined']:.2f}x (same shards: yes)")


if __name__ == "__main__":
    main()
