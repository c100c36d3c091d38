"""Self-instruct prompt, parsing and the paper's filters."""
from __future__ import annotations

import pytest

from synthloop.generator.self_instruct import build_prompt, parse_list, rule_reason
from synthloop.generator.instances import parse_input_first, parse_output_first


def test_prompt_numbers_eight_examples_and_asks_for_the_ninth():
    p = build_prompt([f"Task number {i} here." for i in range(8)])
    assert "8. Task number 7 here." in p and p.endswith("\n9.")


def test_parse_numbered_continuation():
    text = " Explain tides.\n10. Name two   prime numbers.\n11) List fruits.\n\n12."
    assert parse_list(text) == ["Explain tides.", "Name two prime numbers.", "List fruits."]


@pytest.mark.parametrize("inst,reason", [
    ("Hi there", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image of a sunset.", "unsupported_modality"),
    ("Go to the store and buy milk for me.", "unsupported_modality"),
    ("Make a flowchart of the process.", "unsupported_modality"),
    ("Write a program that sorts numbers.", "write_a_program"),
    ("- List three colours please.", "starts_with_punctuation"),
    ("→ Liste drei Farben auf.", "non_ascii_start"),
    ("Écris une phrase en français.", None),           # a letter, if not an ASCII one
    ("Übersetze den Satz ins Englische.", None),
    ("请写一首关于秋天的短诗。", None),                 # 12 characters: 11 words, not one
    ("你好", "too_short"),
    ("Explain why the sky is blue.", None),
    ("Describe the profile of a good teacher.", None),   # 'file' inside a word is fine
])
def test_rule_reasons(inst, reason):
    assert rule_reason(inst) == reason


def test_instance_parsers():
    assert parse_input_first(" The cat sat.\nOutput: Le chat.") == ("The cat sat.", "Le chat.")
    assert parse_input_first(" no output marker") is None
    assert parse_output_first(" Negative\nInput: It broke on day one.") == ("It broke on day one.", "Negative")


def test_in_context_examples_do_not_depend_on_pool_order():
    """A resumed run rebuilds the machine pool in another order; it must draw the same examples."""
    import random
    from types import SimpleNamespace

    from scripted_llm import ScriptedLLM
    from synthloop.generator.self_instruct import SelfInstruct, SelfInstructConfig
    from synthloop.seeds.loaders import load_seeds

    ctx = SimpleNamespace(seeds=load_seeds(), seed=0, round=0, llm=lambda role: ScriptedLLM())
    a, b = SelfInstruct(SelfInstructConfig(), ctx), SelfInstruct(SelfInstructConfig(), ctx)
    pool = [f"Machine task number {i} about rivers." for i in range(20)]
    a.machine, b.machine = list(pool), list(reversed(pool))
    assert a._examples(random.Random(7), a._pool(3)) == b._examples(random.Random(7), b._pool(3))
