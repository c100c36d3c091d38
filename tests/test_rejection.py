"""Rejection sampling: n verified samples per row, the best kept, failures routed as counted rejects
with the row's id, pass rates recorded, seeds keyed by row id (not by batch order)."""
from __future__ import annotations

import json

import polars as pl
import pytest

from scripted_llm import FnLLM, context, run_batch
from synthloop.core.llm.base import Completion
from synthloop.generator.rejection import RejectionConfig, RejectionSampling, sample_seed
from synthloop.core.schema import make_batch

NO_COMMA = [{"id": "punctuation:no_comma", "kwargs": "{}"}]
LOWER_SHORT = [{"id": "change_case:english_lowercase", "kwargs": "{}"},
               {"id": "length_constraints:number_words", "kwargs": json.dumps({"num_words": 6, "relation": "less than"})}]


def _rows():
    return make_batch([
        {"instruction": "Describe rain. Use no commas.", "constraints": NO_COMMA, "method": "seed"},
        {"instruction": "Name a fruit, in lowercase, in under six words.", "constraints": LOWER_SHORT},
        {"instruction": "Say hello.", "method": "self_instruct"},                      # no constraints
    ])


def _stage(fn, **cfg):
    llm = FnLLM(fn, "student")
    return RejectionSampling(RejectionConfig(**cfg), context({"generator": llm})), llm


def _by_sample(texts):
    """Answer sample j of every row with texts[j] (sample index recovered from the seed)."""
    index = {}

    def fn(req, params):
        key = req[-1]["content"]
        j = index.setdefault(key, [0])
        out = texts[j[0] % len(texts)]
        j[0] += 1
        return out
    return fn


def test_keeps_first_passing_sample_and_routes_failures_with_reasons():
    texts = ["Rain falls, softly, everywhere.", "Rain falls softly on the roofs.", "An Apple, sure.", "a ripe apple is sweet"]
    st, llm = _stage(_by_sample(texts), n=4)
    out = run_batch(st, _rows())
    assert len(llm.sent) == 12
    kept = out.filter(pl.col("drop_reason").is_null())
    assert kept["response"].to_list() == ["Rain falls softly on the roofs.", "a ripe apple is sweet", "Rain falls, softly, everywhere."]
    rates = kept["scores"].struct.field("pass_rate").to_list()
    assert rates[0] == pytest.approx(2 / 4)         # samples 1 and 3 have commas
    assert rates[1] == pytest.approx(1 / 4)         # only "apple" is lowercase and short
    assert rates[2] == 1.0                          # no constraints: any completed sample passes
    assert kept["scores"].struct.field("verified_all").to_list() == [True, True, None]
    drops = out.filter(pl.col("drop_reason").is_not_null())
    counts = drops.group_by("drop_reason").len().sort("drop_reason").rows()
    assert dict(counts) == {"failed_check": 2 + 3, "not_selected": 1 + 3}
    # Failed samples share the row id and say how much of the row they followed.
    fails = drops.filter(pl.col("drop_reason") == "failed_check")
    assert set(fails["id"]) <= set(kept["id"])
    row2 = fails.filter(pl.col("id") == kept["id"][1])
    assert sorted(row2["scores"].struct.field("verified").to_list()) == [0.0, 0.5, 0.5]
    assert st.state()["by_constraint"]["punctuation:no_comma"] == {"checked": 4, "followed": 2}
    assert st.state()["rows"] == 3 and st.state()["rows_kept"] == 3 and not st.ordered
    assert (out["model"] == "student").all()


def test_row_without_a_passing_sample_is_dropped_once_with_its_best_failure():
    st, _ = _stage(_by_sample(["Wet, cold, grey.", "APPLE PIE IS NICE TODAY, YES"]), n=2)
    out = run_batch(st, _rows()[:2])
    assert out["drop_reason"].is_not_null().all()
    nps = out.filter(pl.col("drop_reason") == "no_passing_sample")
    assert nps.height == 2                                     # one per instruction
    assert nps["scores"].struct.field("pass_rate").to_list() == [0.0, 0.0]
    row2 = nps.filter(pl.col("id") == _rows()["id"][1])
    # "Wet, cold, grey." is short enough (1 of 2 rules), the all-caps answer follows neither: the
    # instruction is dropped on the near miss.
    assert row2["response"].item() == "Wet, cold, grey."
    assert row2["scores"].struct.field("verified").item() == 0.5
    assert out.filter(pl.col("drop_reason") == "failed_check").height == 2


def test_truncated_and_failed_requests_are_never_kept():
    def fn(req, params):
        return Completion("cut off mid", "length", 10, 5) if params["seed"] % 2 else Completion("", "error", error="boom")
    st, _ = _stage(fn, n=3)
    out = run_batch(st, _rows()[2:])
    assert out["drop_reason"].is_not_null().all()
    assert set(out["drop_reason"]) <= {"truncated", "generation_error"}
    assert out.height == 3


def test_seeds_are_keyed_by_row_id_not_batch_position():
    st, llm = _stage(lambda r, p: "fine answer", n=2)
    rows = _rows()
    run_batch(st, rows)
    first = {(m[-1]["content"], p["seed"]) for m, p in llm.sent}
    st2, llm2 = _stage(lambda r, p: "fine answer", n=2)
    run_batch(st2, rows.reverse())
    assert {(m[-1]["content"], p["seed"]) for m, p in llm2.sent} == first
    assert llm.sent[0][1]["seed"] == sample_seed(0, "rejection_sampling", 0, rows["id"][0], 0)


def test_rows_already_dropped_pass_through_and_config_is_checked():
    rows = _rows().with_columns(pl.lit("too_short").alias("drop_reason"))
    st, llm = _stage(lambda r, p: "x")
    assert run_batch(st, rows).equals(rows) and not llm.sent
    with pytest.raises(ValueError, match="verify"):
        _stage(lambda r, p: "x", verify="sometimes")
    with pytest.raises(ValueError, match="n must"):
        _stage(lambda r, p: "x", n=0)


def test_loose_verification_forgives_a_preamble_line():
    st, _ = _stage(lambda r, p: "Sure! Here:\na ripe apple is sweet", n=1, verify="loose")
    kept = run_batch(st, _rows()[1:2])
    assert kept["drop_reason"].to_list() == [None]
    st, _ = _stage(lambda r, p: "Sure! Here:\na ripe apple is sweet", n=1)
    assert run_batch(st, _rows()[1:2])["drop_reason"].to_list() == ["no_passing_sample"]


def test_verdicts_stay_deterministic_when_someone_resets_langdetect():
    from langdetect import DetectorFactory

    from synthloop.filters import checks

    # langdetect's unseeded answer for this text varies between en, so, cy and tl.
    text = "a tiny dog named max"
    first = checks.check_one(text, "change_case:english_lowercase", {})
    DetectorFactory.seed = None            # another library (or a test) resets it
    try:
        assert all(checks.check_one(text, "change_case:english_lowercase", {}) == first for _ in range(40))
    finally:
        DetectorFactory.seed = 0
