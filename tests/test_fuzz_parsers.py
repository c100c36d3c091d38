"""Judge outputs a model can write but nobody can read never raise and never become a score:
the rating parser (filters/scoring.py), the rubric judge and DEITA scorers that count each such
output as unparsed, and the pairwise verdict parser (tuner/judge.py).
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scripted_llm import FnLLM
from synthloop.core.llm.base import Completion
from synthloop.core.schema import make_batch
from synthloop.filters.deita import DeitaConfig, DeitaScorer
from synthloop.filters.judge import JudgeConfig, JudgeScorer
from synthloop.filters.scoring import RatingStats, parse_score, rate
from synthloop.tuner.judge import judge_pairs, parse_verdict

FUZZ = settings(max_examples=100, deadline=None)

#: Judge outputs with no score in them, each a shape small judges really produce.
MALFORMED_RATINGS = [
    "",                                             # empty (stopped at once)
    "   \n\t ",                                     # whitespace only
    "I cannot grade this response.",                # a refusal
    "Score:",                                       # cut off by max_tokens before the number
    "Score: N",                                     # the template echoed back
    "Rate the response on a scale of 1-10.",       # the scale, echoed
    "Score: 42",                                    # off the scale
    "Score: -3",                                    # negative
    "Score: NaN",                                   # not a number
    "Score: 1e999",                                 # overflow notation
    "Score: 7.5.3",                                 # a version string, not a number
    "Score: 7/0",                                   # zero denominator
    "Score: 8/" + "9" * 400,                        # denominator beyond a float
    "Score: " + "9" * 400,                          # a number beyond a float
    '{"score": null}',                              # JSON without a value
    "| criterion | score |\n|---|---|\n| clarity | |",   # an empty table
    "**Score:** **",                                # empty markdown emphasis
    "1. Read the task\n2. Read the answer",         # a numbered list, not a score
    "<|im_end|>",                                   # a bare special token
    "Score: \u2167",                                # a Roman numeral character
]

MALFORMED_VERDICTS = [
    "", "   ", "Verdict:", "Verdict: C", "Verdict: AB", "Verdict: A or B", "[[A]] then [[B]]",
    "Answer A is better. Answer B is better.", "I think the first one.", "<|im_end|>",
    "Verdict: the first one", "Both have problems.",
]


@pytest.mark.parametrize("text", MALFORMED_RATINGS)
def test_malformed_rating_is_no_score(text):
    for lo, hi in ((1, 10), (0, 10), (1, 6)):
        assert parse_score(text, lo, hi) is None


@pytest.mark.parametrize("text", MALFORMED_VERDICTS)
def test_malformed_verdict_names_no_winner(text):
    assert parse_verdict(text) is None


def test_readable_shapes_still_parse():
    """The fixes that refuse the shapes above keep the readable ones."""
    assert parse_score("Score - 7") == 7.0
    assert parse_score("I'd rate it 6 out of 10 because of 2 typos.") == 6.0
    assert parse_score("Rating: 4.5/5") == 9.0
    assert parse_score("**8**") == 8.0
    assert parse_verdict('{"verdict": "B"}') == "B"
    assert parse_verdict("It's a tie.") == "tie"


def _batch(n: int):
    return make_batch([{"instruction": f"Task number {i}.", "response": f"Answer number {i}."} for i in range(n)])


def _answers(texts):
    """A judge that gives the i-th row the i-th text (the row number is in the prompt)."""
    def fn(request, params):
        user = request[-1]["content"]
        i = int(user.split("Task number ")[1].split(".")[0])
        t = texts[i]
        return t if isinstance(t, Completion) else Completion(t, "stop", 10, 5)
    return fn


def test_judge_scorer_counts_every_malformed_output_and_keeps_the_rows():
    texts = MALFORMED_RATINGS + [Completion("", "error", error="server said no"), "Score: 7"]
    scorer = JudgeScorer(FnLLM(_answers(texts)), JudgeConfig(min_score=0.5))
    out = scorer(_batch(len(texts)))
    assert scorer.stats.as_dict() == {"requests": len(texts), "parsed": 1,
                                      "unparsed": len(MALFORMED_RATINGS), "errors": 1}
    judge = out["scores"].struct.field("judge").to_list()
    assert judge == [None] * (len(texts) - 1) + [0.7]
    # Unreadable is not low quality: nothing is dropped for it.
    assert out["drop_reason"].is_null().all() and out.height == len(texts)
    assert scorer.state() == {"ratings": scorer.stats.as_dict()}


def test_deita_scorer_counts_malformed_outputs_per_score():
    texts = MALFORMED_RATINGS
    scorer = DeitaScorer(FnLLM(_answers(texts)), DeitaConfig(min_quality=0.5, min_complexity=0.5))
    out = scorer(_batch(len(texts)))
    for what in ("complexity", "quality"):
        assert scorer.stats[what].unparsed == len(texts) and scorer.stats[what].parsed == 0
        assert out["scores"].struct.field(what).is_null().all()
    assert out["drop_reason"].is_null().all()


def test_pairwise_judge_counts_malformed_verdicts_as_parse_failures():
    texts = MALFORMED_VERDICTS
    judge = FnLLM(lambda request, params: texts[int(request[-1]["content"].split("Task number ")[1].split(".")[0])])
    res = judge_pairs(judge, [f"Task number {i}." for i in range(len(texts))],
                      [f"new {i}" for i in range(len(texts))], [f"old {i}" for i in range(len(texts))])
    assert res["parse_failures"] == len(texts)
    assert res["win_rate"] is None and res["wins"] == res["losses"] == res["ties"] == 0


judge_text = (st.text(max_size=200)
              | st.lists(st.sampled_from(["Score", "score:", "Rating", "/", "out of", "%", "**", "[[", "]]",
                                          "-", "\u2212", ".", "e", "10", "7", "0", "999999999999", " ", "\n",
                                          "Verdict:", "A", "B", "tie", "or", "seven", "Answer", "is better"]),
                         max_size=20).map("".join))


@FUZZ
@given(text=judge_text, scale=st.sampled_from([(1, 10), (0, 10), (1, 6), (0, 1)]))
def test_any_text_parses_to_nothing_or_a_score_on_the_scale(text, scale):
    lo, hi = scale
    v = parse_score(text, lo, hi)
    assert v is None or (math.isfinite(v) and lo <= v <= hi)
    assert parse_verdict(text) in (None, "A", "B", "tie")


@FUZZ
@given(texts=st.lists(judge_text, min_size=1, max_size=8))
def test_rate_accounts_for_every_output(texts):
    stats = RatingStats()
    llm = FnLLM(lambda request, params: texts[int(request[-1]["content"])])
    scores = rate(llm, [[{"role": "user", "content": str(i)}] for i in range(len(texts))],
                  lo=1, hi=10, params={}, stats=stats)
    assert stats.requests == stats.parsed + stats.unparsed == len(texts)
    assert sum(s is not None for s in scores) == stats.parsed
