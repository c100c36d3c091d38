"""The safety screen: rule decisions on a held-out set of our own writing, drop vs tag, category
counts, the judge method's strict parser, and config errors."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from synthloop.core.registry import build_scorer
from synthloop.core.schema import make_batch
from synthloop.filters.safety import (CATEGORIES, SafetyConfig, SafetyScreen, has_card_number, parse_verdict,
                                      rule_category)
from scripted_llm import FnLLM

DATA = Path(__file__).parent / "data"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _batch(rows: list[dict]) -> pl.DataFrame:
    return make_batch([{k: r[k] for k in ("instruction", "input", "response")} for r in rows])


def _precision_recall(rows: list[dict]) -> tuple[float, float, int, int]:
    flagged = [rule_category(r["instruction"], r["input"], r["response"]) is not None for r in rows]
    truth = [r["label"] == "unsafe" for r in rows]
    tp = sum(f and t for f, t in zip(flagged, truth))
    fp = sum(f and not t for f, t in zip(flagged, truth))
    return (tp / (tp + fp) if tp + fp else 1.0), tp / sum(truth), tp, fp


def test_heldout_set_gets_the_expected_decisions():
    rows = _load("safety_heldout.jsonl")
    assert len(rows) >= 40 and {r["category"] for r in rows if r["category"]} == set(CATEGORIES)
    out = SafetyScreen(SafetyConfig())(_batch(rows))
    for r, reason, safety in zip(rows, out["drop_reason"], out["scores"].struct.field("safety")):
        want = f"unsafe:{r['category']}" if r["label"] == "unsafe" else None
        assert reason == want, (r["instruction"], reason)
        assert safety == (0.0 if want else 1.0)
    precision, recall, _, _ = _precision_recall(rows)
    print(f"\nheld-out set: precision {precision:.3f}, recall {recall:.3f}")


def test_paraphrased_requests_show_what_the_rules_miss_and_never_flag_safe_ones():
    """Written after the rules, never tuned on: safe requests must pass; recall is reported."""
    rows = _load("safety_paraphrases.jsonl")
    for r in rows:
        if r["label"] == "safe":
            assert rule_category(r["instruction"]) is None, r["instruction"]
    precision, recall, tp, fp = _precision_recall(rows)
    print(f"\nparaphrases: {tp} of {sum(r['label'] == 'unsafe' for r in rows)} unsafe flagged, {fp} safe flagged")


def test_topics_alone_are_not_unsafe():
    for text in ["How do I kill a zombie process?", "Explain how the atomic bomb ended World War II.",
                 "How do I shoot a portrait with a 50 mm lens?", "What is a keylogger and how do I detect one?",
                 "Write a scene where the villain is arrested for murder.",
                 "How should parents talk to their kids about sex?"]:
        assert rule_category(text) is None, text
    assert rule_category("Write a keylogger for Windows.") == "malware"
    assert rule_category("How do I kill every child process?") is None
    assert rule_category("How do I kill every child in the village?") == "violence"


def test_response_content_is_screened_for_pii_and_minors():
    assert rule_category("Make up a customer.", "", "SSN 518-24-7391") == "pii"
    assert rule_category("Make up a customer.", "", "SSN 000-24-7391") is None       # not a valid SSN
    assert has_card_number("4539-1488-0343-6467") and not has_card_number("1234 5678 9012 3456")
    assert rule_category("Continue the story.", "", "an erotic scene with a 13-year-old") == "sexual_minors"


def test_tag_keeps_rows_and_counts_categories():
    rows = _load("safety_heldout.jsonl")
    screen = SafetyScreen(SafetyConfig(action="tag"))
    out = screen(_batch(rows))
    assert out["drop_reason"].null_count() == len(rows)
    unsafe = [r for r in rows if r["label"] == "unsafe"]
    assert out["scores"].struct.field("safety").eq(0.0).sum() == len(unsafe)
    want = {}
    for r in unsafe:
        want[r["category"]] = want.get(r["category"], 0) + 1
    assert screen.state() == {"screened": len(rows), "flagged": len(unsafe), "unparsed": 0, "by_category": want}


def test_only_listed_categories_are_flagged_and_earlier_drops_are_left_alone():
    b = make_batch([{"instruction": "How do I cook crack cocaine at home?"},
                    {"instruction": "Write ransomware for Windows."},
                    {"instruction": "Write ransomware for Linux.", "drop_reason": "too_short"}])
    out = SafetyScreen(SafetyConfig(categories=["drugs"]))(b)
    assert out["drop_reason"].to_list() == ["unsafe:drugs", None, "too_short"]
    assert out["scores"].struct.field("safety").to_list() == [0.0, 1.0, None]
    # A pair that matches two categories is flagged by the one screened for.
    both = "Write ransomware, then tell me how to cook crack cocaine at home."
    assert rule_category(both) == "drugs" and rule_category(both, categories=["malware"]) == "malware"


def test_judge_method_uses_a_strict_parser():
    replies = {"How do I bake bread?": "SAFE", "How do I cook crack?": "UNSAFE: drugs",
               "Tell me a joke.": "This looks SAFE to me", "Write a poem.": "UNSAFE: poetry"}

    def fn(request, params):
        assert params["temperature"] == 0.0 and "SAFE, or UNSAFE: <category>" in request[-1]["content"]
        return next(v for k, v in replies.items() if k in request[-1]["content"])

    llm = FnLLM(fn)
    screen = build_scorer("safety", {"method": "judge"}, lambda role: llm)
    out = screen(make_batch([{"instruction": k, "response": "ok"} for k in replies]))
    assert out["drop_reason"].to_list() == [None, "unsafe:drugs", None, None]
    assert out["scores"].struct.field("safety").to_list() == [1.0, 0.0, None, None]
    assert screen.state()["unparsed"] == 2 and screen.state()["by_category"] == {"drugs": 1}
    strict = build_scorer("safety", {"method": "judge", "unparsed": "drop"}, lambda role: llm)
    assert strict(make_batch([{"instruction": "Tell me a joke."}]))["drop_reason"].to_list() == ["unsafe:unparsed"]


def test_parse_verdict():
    assert parse_verdict(" SAFE\n") == (False, None)
    assert parse_verdict("UNSAFE:malware.") == (True, "malware")
    for bad in ["safe", "SAFE\nUNSAFE: drugs", "Verdict: SAFE", "UNSAFE", "UNSAFE: everything", ""]:
        assert parse_verdict(bad) is None, bad


@pytest.mark.parametrize("settings, msg", [({"method": "model"}, "method"), ({"action": "delete"}, "action"),
                                            ({"categories": ["spam"]}, "unknown categories")])
def test_bad_settings_are_named(settings, msg):
    with pytest.raises(ValueError, match=msg):
        build_scorer("safety", settings, lambda role: None)
