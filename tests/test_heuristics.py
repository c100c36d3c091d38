"""Heuristic filters: every drop reason on crafted responses, and good responses left alone."""
from __future__ import annotations

import polars as pl
import pytest

from scripted_llm import run_batch
from synthloop.filters.heuristics import (REASONS, HeuristicsConfig, apply_heuristics,
                                          longest_char_run, loop_fraction)
from synthloop.core.config import parse_config
from synthloop.core.schema import SCHEMA, make_batch

LOOP = "The answer is simple and clear. " * 12
PROSE = ("Photosynthesis lets plants turn light into chemical energy. Chlorophyll absorbs light, "
         "water is split, and carbon dioxide is fixed into sugars in the Calvin cycle.")

# (instruction, response, expected reason) — one or more crafted cases per reason.
CASES = [
    ("Say hello.", "", "empty"),
    ("Say hello.", "   \n\t ", "empty"),
    ("Write a loop in Python.", "Here you go:\n```python\nfor i in range(3):\n    print(i)\n", "truncated"),
    ("Explain gravity.", "Gravity pulls masses together. It is the force that keeps the planets "
                         "moving in their orbits around the", "truncated"),
    ("Explain gravity.", "Gravity pulls masses together. Newton described it with a law that relates "
                         "mass, distance,", "truncated"),
    ("Explain gravity.", "I'm sorry, but I can't help with that request.", "refusal"),
    ("Explain gravity.", "I’m really sorry, but I cannot do that.", "refusal"),
    ("Explain gravity.", "As an AI, I do not have opinions about gravity.", "refusal"),
    ("Write a joke.", "Sure. As an AI language model I cannot be funny.", "refusal"),
    ("Write a story.", "I cannot create content like that.", "refusal"),
    ("Write a story.", "**I apologize, but** that is not something I do.", "refusal"),
    ("Describe how plants make their own food.", "Describe how plants make their own food.", "echo"),
    ("Describe how plants make their own food.",
     "Describe how plants make their own food. Plants use sunlight to make sugar.", "echo"),
    ("Describe how plants make their own food.", "Plants make their own food: describe how!", "echo"),
    ("Name a fruit.", "Apple", "too_short"),                      # with min_words=2 below
    ("Describe the sea.", "The sea is wide and deep. " * 30, "too_long"),   # max_words=100 below
    ("Describe the sea.", "@@ ## $$ %% ^^ && ** (( )) !! ?? ~~ ++ == <<", "junk_symbols"),
    ("Say wow.", "Wow" + "o" * 40 + ", that is great.", "char_run"),
    ("Describe the sea.", LOOP, "ngram_loop"),
]

GOOD = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Correct the grammar: He go to school every day.", "He goes to school every day."),
    ("Explain photosynthesis.", PROSE),
    ("Write Python that builds a dict.", "```python\nx = {'a': [1, 2], 'b': (3, 4)}\n```\nThis builds a dict."),
    ("List three fruits.", "- apple\n- banana\n- cherry, the small red one that grows on trees in summer"),
    ("Write a pangram.", "The quick brown fox jumps over the lazy dog"),
    ("Classify the sentiment: I love it.", "Positive"),
    ("Write a markdown table of two animals.", "| animal | legs |\n|---|---|\n| dog | 4 |\n| bird | 2 |"),
    ("Why is the sky blue?", "Sorry to say it is not always blue: at sunset it is red. Rayleigh "
                             "scattering favours short wavelengths."),
]

CFG = HeuristicsConfig(min_words=2, max_words=100)


def _run(rows, cfg=CFG):
    return apply_heuristics(make_batch([{"instruction": i, "response": r} for i, r, *_ in rows]), cfg)


@pytest.mark.parametrize("instruction,response,reason", CASES)
def test_each_reason(instruction, response, reason):
    assert _run([(instruction, response)])["drop_reason"].to_list() == [reason]


def test_every_reason_is_covered():
    assert {r for *_, r in CASES} == set(REASONS)


def test_good_responses_are_kept():
    out = _run(GOOD, HeuristicsConfig())                 # defaults: a one-word answer is fine
    assert out["drop_reason"].to_list() == [None] * len(GOOD), out.select("response", "drop_reason")


def test_checks_can_be_switched_off_and_keep_upstream_reasons():
    off = HeuristicsConfig(empty=False, truncated=False, refusal=False, echo=False, min_words=0,
                           max_words=0, max_symbol_ratio=0, max_char_run=0, max_loop_fraction=0)
    assert _run(CASES, off)["drop_reason"].null_count() == len(CASES)
    # A row the generator already marked keeps its reason; others get theirs; schema unchanged.
    b = make_batch([{"instruction": "Hi", "response": "", "drop_reason": "duplicate"},
                    {"instruction": "Hi", "response": "I'm sorry, but no."}])
    out = apply_heuristics(b)
    assert out["drop_reason"].to_list() == ["duplicate", "refusal"]
    assert out.schema == SCHEMA


def test_first_reason_wins_and_empty_batch_passes():
    # An empty response is also "too short": the earlier check names it.
    assert _run([("Say hi.", "")])["drop_reason"].to_list() == ["empty"]
    assert apply_heuristics(make_batch([])).height == 0


def test_helpers():
    assert longest_char_run("abc") == 1 and longest_char_run("") == 0
    assert longest_char_run("a      b") == 1          # indentation is not junk
    assert loop_fraction(PROSE) < 0.1 < 0.8 < loop_fraction(LOOP)


def test_stage_from_toml_config():
    cfg = parse_config('[source]\ntype = "self_instruct"\n'
                       '[[stages]]\ntype = "heuristics"\nmax_words = 5\nrefusal = false\n')
    from types import SimpleNamespace

    from synthloop.core.registry import _REGISTRY, names
    assert "heuristics" in names("scorer") and "heuristics" in names("stage", tag="scorer")
    cls, build = _REGISTRY[("stage", "heuristics")]
    stage = build(cls(**{k: v for k, v in cfg.stages[0].items() if k != "type"}),
                  SimpleNamespace(llm=None))          # heuristics opens no backend
    batches = [make_batch([{"instruction": "Hi", "response": "one two three four five six"}]),
               make_batch([{"instruction": "Hi", "response": "I'm sorry, but no."}])]
    out = [run_batch(stage, b, i) for i, b in enumerate(batches)]
    assert not stage.ordered                             # no state: batches may run concurrently
    assert [b["drop_reason"].to_list() for b in out] == [["too_long"], [None]]
