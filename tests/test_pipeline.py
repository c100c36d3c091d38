"""The runner, run store and self-instruct plumbing on a scripted backend: counts, rejects, resume."""
from __future__ import annotations

import json

import polars as pl
import pytest

from scripted_llm import scripted_factory
from synthloop.core.config import parse_config
from synthloop.engine.runner import execute
from synthloop.outputs.manifest import count_problems
from synthloop.outputs.shards import REJECTS_SCHEMA
from synthloop.core.schema import SCHEMA

CONFIG = """
[run]
name = "t"
limit = {limit}
shard_rows = 7
cache = "{cache}"

[llm.generator]
backend = "transformers"

[source]
type = "self_instruct"
prompts_per_step = 3

[[stages]]
type = "instances"
"""


def config(tmp_path, limit=30):
    return parse_config(CONFIG.format(limit=limit, cache=tmp_path / "req.sqlite"), path="t.toml")


def read(run):
    kept = pl.concat([pl.read_parquet(run / e["path"]) for e in json.loads((run / "manifest.json").read_text())["shards"]])
    return kept


def test_run_writes_shards_rejects_and_consistent_counts(tmp_path):
    run = tmp_path / "run"
    m = execute(config(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory())
    assert m["complete"] and not count_problems(m)
    kept = read(run)
    assert kept.schema == SCHEMA
    assert kept.height >= 30 and kept["id"].is_unique().all()
    assert all(e["rows"] == 7 for e in m["shards"][:-1])
    assert (kept["response"] != "").all() and (kept["method"] == "self_instruct").all()
    rej = pl.concat([pl.read_parquet(run / e["path"]) for e in m["rejects"]])
    assert rej.schema == REJECTS_SCHEMA
    assert set(rej["drop_reason"]) >= {"unsupported_modality"}
    si = next(s for s in m["stages"] if s["name"] == "self_instruct")
    assert si["dropped"]["unsupported_modality"] >= 1
    assert (kept["messages"].list.len() == 2).all()


def test_rerun_of_complete_run_does_nothing(tmp_path):
    run, backends = tmp_path / "run", []
    execute(config(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory())
    before = (run / "manifest.json").read_text()
    execute(config(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory(backends))
    assert backends == [] and (run / "manifest.json").read_text() == before


def test_cache_makes_a_fresh_rerun_free_and_identical(tmp_path):
    backends = []
    execute(config(tmp_path), out=tmp_path / "a", show_progress=False, backend_factory=scripted_factory())
    execute(config(tmp_path), out=tmp_path / "b", show_progress=False, backend_factory=scripted_factory(backends))
    assert sum(b.stats.requests for b in backends) == 0
    assert read(tmp_path / "a").equals(read(tmp_path / "b"))


class Boom(Exception):
    pass


# Exact dedup, then a near-duplicate filter that drops some of the rows exact dedup let through:
# a resumed exact_dedup must index those rows too, as the uninterrupted run did.
DEDUP = """
[[stages]]
type = "exact_dedup"
text_columns = ["instruction"]

[[stages]]
type = "minhash_dedup"
text_columns = ["instruction"]
shingle = "char"
ngram = 3
threshold = 0.3
"""


@pytest.mark.parametrize("stages", ["", DEDUP], ids=["instances", "instances+dedup"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch, stages):
    """Crash mid-run (after some commits), resume, and compare with a clean run of the same config."""
    def config(tmp_path, limit):
        return parse_config(CONFIG.format(limit=limit, cache=tmp_path / "req.sqlite") + stages, path="t.toml")
    clean = tmp_path / "clean"
    ref = execute(config(tmp_path, limit=40), out=clean, show_progress=False, backend_factory=scripted_factory())
    if stages:
        assert ref["stages"][-2]["name"] == "minhash_dedup" and ref["stages"][-2]["dropped_total"] > 0
    from synthloop.outputs import run_store
    real = run_store.RunStore._commit
    calls = {"n": 0}

    def crashing(self, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom
        return real(self, **kw)
    monkeypatch.setattr(run_store.RunStore, "_commit", crashing)
    crashed = tmp_path / "crashed"
    with pytest.raises(Boom):
        execute(config(tmp_path, limit=40), out=crashed, show_progress=False, backend_factory=scripted_factory())
    monkeypatch.setattr(run_store.RunStore, "_commit", real)
    assert not json.loads((crashed / "manifest.json").read_text())["complete"]
    m = execute(config(tmp_path, limit=40), out=crashed, show_progress=False, backend_factory=scripted_factory())
    assert not count_problems(m)
    assert read(crashed).equals(read(clean))
    assert m["stages"] == ref["stages"] and m["state"] == ref["state"]


def test_other_config_in_same_dir_is_refused(tmp_path):
    from synthloop.outputs.run_store import ConfigMismatch
    run = tmp_path / "run"
    execute(config(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory())
    other = parse_config(CONFIG.format(limit=30, cache=tmp_path / "r.sqlite").replace("shard_rows = 7", "shard_rows = 8"))
    with pytest.raises(ConfigMismatch):
        execute(other, out=run, show_progress=False, backend_factory=scripted_factory())


def test_raising_the_limit_continues_the_run(tmp_path):
    run = tmp_path / "run"
    execute(config(tmp_path, limit=10), out=run, show_progress=False, backend_factory=scripted_factory())
    m = execute(config(tmp_path, limit=25), out=run, show_progress=False, backend_factory=scripted_factory())
    kept = read(run)
    assert kept.height >= 25 and kept["id"].is_unique().all() and not count_problems(m)


def test_step_wise_sources_stop_at_max_steps_or_after_patience_idle_steps(capsys):
    from scripted_llm import Batches
    from synthloop.core.schema import make_batch
    from synthloop.core.stages import run_steps

    class Source:                      # keeps a row on steps listed in `keeps`, nothing otherwise
        def __init__(self, keeps, ahead=1):
            self.step, self.keeps, self.ahead, self.launched = 0, keeps, ahead, []

        def __call__(self):
            return run_steps(self, "demo", max_steps=self.max_steps, patience=2, ahead=self.ahead)

        async def _answer(self, step):
            return step

        def launch(self, step):
            # never more than `ahead` steps past the last finished one
            assert step < self.step + self.ahead
            self.launched.append(step)
            return self._answer(step)

        async def finish(self, step, answer):
            assert step == answer == self.step          # in step order
            self.step += 1
            return make_batch([{"instruction": "Task number one here.",
                                "drop_reason": None if self.step in self.keeps else "too_similar"}])
    for ahead in (1, 3):
        src = Source(keeps={1, 4}, ahead=ahead)
        src.max_steps = 0
        assert len(list(Batches(src))) == 3      # 1 kept, 2 and 3 idle
        assert "demo: no new instruction in 2 steps" in capsys.readouterr().err
        assert src.launched == list(range(3 + ahead))        # the next steps launched, then cancelled
        src = Source(keeps=set(range(1, 100)), ahead=ahead)
        src.max_steps = 5
        assert len(list(Batches(src))) == 5 and src.step == 5 and src.launched == list(range(5))
