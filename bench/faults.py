"""Fault campaign: SIGKILL every command at 20 seeded points and rerun; a run through a bad server.

    python bench/faults.py [--kills 20] [--commands run,dedup,...] [--seed 0] [--work DIR]
                           [--no-kills] [--no-server] [--requests 182]

Kills (tests/kill_campaign.py): each command of tests/kill_commands.py (run, dedup, score,
select, export, train, rounds) is run once uninterrupted, then `--kills` times in fresh folders,
each time SIGKILLed at a seeded point (inside a shard write, a manifest write or rename, a request
cache write, adapter saving, an output rename, or a random instant), then rerun unkilled and
compared with the uninterrupted run. Generation is the scripted backend (the real CLI, see
tests/scripted_cli.py); training and evaluation are a tiny random Llama's.

The slow variant, `--commands run-embedded`, is `synthloop run` itself generating with the
embedded model (self-instruct, answers by distillation, heuristics; 4 records, a shard per
record). A real model's answers depend on how requests happen to be batched, so no two runs
write the same records; each rerun is held to what its killed run had committed: every
committed id is still there, none twice, the manifest complete and adding up.

Bad server (tests/fault_proxy.py): a seeds -> judge run whose judge is the openai backend, talking
to a fault-injecting proxy (20% of attempts) in front of a local model server; prints the proxy's
and the backend's books side by side.

Prints the table (markdown) and one line per server fact; exits 1 if anything was lost,
duplicated, left running or miscounted.
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

from fault_proxy import FaultProxy, ModelServer, account  # noqa: E402
from kill_campaign import campaign, table  # noqa: E402
from kill_commands import build_inputs, commands  # noqa: E402
from tiny_llama import build_tiny_llama  # noqa: E402

SERVER_CONFIG = """
[run]
name = "badserver"
limit = {limit}
shard_rows = 50
cache = "{cache}"

[llm.generator]
backend = "transformers"
model = "{tiny}"

[llm.judge]
backend = "openai"
model = "tiny"
options = {{ base_url = "http://127.0.0.1:{port}/v1", timeout = {timeout}, max_retries = 2, backoff = 0.05, concurrency = 8 }}

[source]
type = "seeds"
batch_size = 16

[[stages]]
type = "judge"
max_tokens = 6
"""


def kills(work: Path, tiny: str, names: list[str], n: int, seed: int) -> bool:
    inputs = build_inputs(work / "inputs", tiny)
    rows = []
    for cmd in commands(inputs):
        if cmd.name in names:
            rows.append(campaign(cmd, work, n, seed=seed))
            print(f"{cmd.name}: {rows[-1].seconds:.0f}s", file=sys.stderr)
    print(table(rows))
    for r in rows:
        for f in r.failures:
            print(f"FAILED {r.command}: {f}")
    return all(r.ok for r in rows)


def bad_server(work: Path, tiny: str, requests: int, seed: int, timeout: float = 8.0) -> bool:
    from synthloop.core.config import parse_config
    from synthloop.core.llm import open_llm
    from synthloop.core.llm.openai_backend import OpenAILLM
    from synthloop.core.llm.transformers_backend import TransformersLLM
    from synthloop.engine.runner import execute
    from synthloop.outputs.manifest import count_problems

    server = ModelServer(TransformersLLM(tiny))
    proxy = FaultProxy(server.port, rate=0.2, seed=seed, client_timeout=timeout)
    made = []

    def factory(spec, cache=None):
        made.append(open_llm(spec, cache=cache))
        return made[-1]
    cfg = parse_config(SERVER_CONFIG.format(limit=requests, cache=work / "server.sqlite", tiny=tiny,
                                            port=proxy.port, timeout=timeout), path="badserver.toml")
    t0 = time.monotonic()
    try:
        m = execute(cfg, out=work / "badserver", show_progress=False, backend_factory=factory)
    finally:
        proxy.close()
        server.close()
    [judge] = [b.inner for b in made if isinstance(b.inner, OpenAILLM)]
    books = account(proxy, judge)
    ok = m["complete"] and not count_problems(m) and books["match"]
    print(f"bad server: run complete={m['complete']} counts add up={not count_problems(m)} "
          f"rows={m['stages'][-1]['kept']} in {time.monotonic() - t0:.0f}s")
    print(f"proxy: {books['attempts']} attempts, injected {json.dumps(books['injected'], sort_keys=True)}")
    print(f"proxy faults as the client met them: {json.dumps(books['proxy_reasons'], sort_keys=True)}")
    print(f"client: {books['requests']} requests, {books['retries']} retries, {books['errors']} per-row errors, "
          f"reasons {json.dumps(books['client_reasons'], sort_keys=True)}")
    print(f"books match (retries + errors == faults, requests + retries == attempts, reasons equal): {books['match']}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--commands", default="run,dedup,score,select,export,train,rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the trials (default: a temporary one)")
    ap.add_argument("--no-kills", action="store_true")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--requests", type=int, default=182, help="rows (= judge requests) of the bad-server run")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="synthloop-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_llama(work / "tiny-llama") if not (work / "tiny-llama").exists() else str(work / "tiny-llama")
    ok = True
    if not args.no_kills:
        ok &= kills(work, tiny, args.commands.split(","), args.kills, args.seed)
    if not args.no_server:
        ok &= bad_server(work, tiny, args.requests, args.seed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
