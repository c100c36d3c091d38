"""The `mix` source: turn order by weight, parts that stop, config errors, state round trip.
(The end-to-end run that mixes every method, with a crash and resume, is in test_evol.py.)"""
from __future__ import annotations

import polars as pl
import pytest
from scripted_llm import PRE_QUERY, Batches, ScriptedLLM, context

from synthloop.core.config import ConfigError, parse_config
from synthloop.core.registry import build
from synthloop.core.schema import SCHEMA

SI = {"type": "self_instruct", "prompts_per_step": 2}
MAGPIE = {"type": "magpie", "pre_query": PRE_QUERY, "end_of_turn": "<|im_end|>", "requests_per_step": 3}


def _mix(**table):
    ctx = context({"generator": ScriptedLLM()})
    return build("source", {"type": "mix", **table}, ctx, "source")


def _methods(batches):
    return [b["method"][0] for b in batches]


def test_weights_set_the_turn_order_and_stopped_parts_drop_out():
    mix = _mix(sources=[SI, {**MAGPIE, "max_steps": 2}], weights=[2, 1])
    batches = Batches(mix)
    got = _methods(b for _, b in zip(range(9), batches))
    batches.close()
    # Two self-instruct batches, one Magpie batch; after Magpie's two steps only self-instruct runs.
    assert got == ["self_instruct", "self_instruct", "magpie"] * 2 + ["self_instruct"] * 3
    assert mix.stopped == [False, True]


def test_parts_count_their_drops_under_the_mix_name():
    mix = _mix(sources=[SI, MAGPIE])
    mix.name = "grow"
    assert [p.name for p in mix.parts] == ["grow", "grow"]


def test_state_round_trip_continues_with_the_same_part_and_step():
    a = _mix(sources=[SI, MAGPIE], weights=[1, 2])
    stream = Batches(a)
    first = [next(stream) for _ in range(4)]
    state = a.state()
    assert state["pos"] == 1 and [p["step"] for p in state["parts"]] == [2, 2]

    class Nothing:           # a committed view with no rows: restore only replays the counters
        def kept(self):
            return pl.LazyFrame(schema={**SCHEMA, "drop_stage": pl.String})
        rejects = passed = kept
    b = _mix(sources=[SI, MAGPIE], weights=[1, 2])
    b.restore(state, Nothing())
    stream_b = Batches(b)
    nxt_a, nxt_b = next(stream), next(stream_b)
    stream.close()
    stream_b.close()
    assert _methods([nxt_a, nxt_b]) == ["magpie", "magpie"]
    assert nxt_a["instruction"].to_list() == nxt_b["instruction"].to_list()
    assert _methods(first) == ["self_instruct", "magpie", "magpie", "self_instruct"]


def test_every_part_stopping_ends_the_source():
    mix = _mix(sources=[{**SI, "max_steps": 1}, {**MAGPIE, "max_steps": 1}])
    assert _methods(list(Batches(mix))) == ["self_instruct", "magpie"]


@pytest.mark.parametrize("table, match", [
    ({"sources": []}, "at least one source"),
    ({"sources": [SI, MAGPIE], "weights": [1]}, "one integer >= 1 per source"),
    ({"sources": [SI], "weights": [0]}, "one integer >= 1 per source"),
    ({"sources": [{"type": "mix", "sources": [SI]}]}, "cannot contain another mix"),
])
def test_bad_mix_is_refused(table, match):
    with pytest.raises(ValueError, match=match):
        _mix(**table)


def test_a_bad_part_is_named_with_file_and_line_before_anything_runs():
    text = ('[llm.generator]\nbackend = "transformers"\n[source]\ntype = "mix"\n'
            'sources = [\n  { type = "self_instruct" },\n  { type = "magpie", request_per_step = 3 },\n]\n')
    with pytest.raises(ConfigError, match=r"run\.toml:7: \[source\.sources\.1\] unknown key 'request_per_step'"):
        parse_config(text, path="run.toml")
