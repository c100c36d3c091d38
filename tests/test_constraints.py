"""The constraints stage: catalogue, conflict-free drawing, phrasing, checker behaviour, the stage."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthloop.filters import checks
from synthloop.generator import constraints as C
from synthloop.core.config import ConfigError, parse_config
from synthloop.generator.constraint_phrasings import AT_LEAST, LESS, PHRASINGS
from synthloop.core.registry import _REGISTRY, names
from synthloop.core.schema import SCHEMA, make_batch, record_id, to_messages

IDS = """keywords:existence keywords:frequency keywords:forbidden_words keywords:letter_frequency
length_constraints:number_sentences length_constraints:number_paragraphs length_constraints:number_words
detectable_content:number_placeholders detectable_content:postscript detectable_format:number_bullet_lists
detectable_format:number_highlighted_sections detectable_format:multiple_sections detectable_format:json_format
detectable_format:title combination:repeat_prompt startend:end_checker startend:quotation
change_case:english_lowercase change_case:english_capital change_case:capital_word_frequency
punctuation:no_comma""".split()

VOCAB = ["garden", "budget", "planet", "recipe", "museum", "poetry", "winter", "coffee", "bicycle",
         "history", "climate", "market", "ocean", "teacher", "camera", "dinosaur", "puzzle", "jazz"]
RELATION_WORDS = {LESS: ("fewer than", "less than", "under"), AT_LEAST: ("at least", "or more", "no fewer than")}


def c_(cid: str, **kwargs) -> dict:
    return {"id": cid, "kwargs": kwargs}


def mentions(cid: str, kwargs: dict) -> list[str]:
    """What a sentence stating (cid, kwargs) must contain: its numbers, words, markers, phrases."""
    out = []
    for key, v in kwargs.items():
        if key == "prompt_to_repeat" or key.endswith("relation"):
            continue
        out += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return out


def relation_of(kwargs: dict) -> str | None:
    return next((kwargs[k] for k in ("relation", "let_relation", "capital_relation") if k in kwargs), None)


# --------------------------------------------------------------------------------------------
# Catalogue and conflict table

def test_catalogue_covers_the_ids_and_every_id_is_checkable():
    assert sorted(C.CATALOGUE) == sorted(IDS)
    known = set(checks.known_ids())
    rng = np.random.default_rng(0)
    for cid in IDS:
        assert cid in known
        for _ in range(30):
            checks.validate(cid, C.CATALOGUE[cid].sample(rng, "Plan a week of meals on a small budget."))


def test_conflict_table_is_a_symmetric_closure_of_ifeval():
    ids = checks.known_ids()
    for a in ids:
        assert checks.conflicts(a) <= C.id_conflicts(a), a
        assert a in C.id_conflicts(a)
        for b in ids:
            assert (b in C.id_conflicts(a)) == (a in C.id_conflicts(b)), (a, b)
    # IFEval lists these one way round only; the closure has both
    assert "detectable_format:title" in C.id_conflicts("startend:quotation")
    assert "startend:quotation" in C.id_conflicts("detectable_format:title")
    assert "detectable_format:json_format" in C.id_conflicts("punctuation:no_comma")


def test_every_phrasing_formats_and_states_its_values():
    rng = np.random.default_rng(1)
    for cid in IDS:
        ph = PHRASINGS[cid]
        variants = ph if isinstance(ph, dict) else {None: ph}
        for variant, templates in variants.items():
            assert len(templates) >= 3, (cid, variant)
            assert len(set(templates)) == len(templates)
            if variant is not None:
                assert all(any(w in t for w in RELATION_WORDS[variant]) for t in templates), (cid, variant)
        for _ in range(40):
            kw = C.CATALOGUE[cid].sample(rng, "Describe the history of the bicycle in the city.")
            for t in C._templates(ph, kw):
                text = t.format(**C._view(cid, kw))
                assert "{" not in text and "}" not in text, text
                for m in mentions(cid, kw):
                    assert m in text, (cid, m, text)


def test_keywords_come_from_the_instruction_when_it_has_content_words():
    rng = np.random.default_rng(2)
    ins = "Plan a weekend hiking trip in the mountains."
    drawn = [C.CATALOGUE["keywords:existence"].sample(rng, ins)["keywords"] for _ in range(100)]
    from_ins = sum(all(w in ins.lower() for w in kws) for kws in drawn)
    assert from_ins > 60                      # mostly its own words, sometimes a generic fallback
    assert all(set(kws) <= set(C.topic_words(ins)) | set(C.GENERIC_KEYWORDS) for kws in drawn)
    assert all(w in C.GENERIC_KEYWORDS for kws in
               [C.CATALOGUE["keywords:existence"].sample(rng, "Do it.")["keywords"] for _ in range(20)] for w in kws)


def test_sampled_values_are_in_reach_of_a_small_model():
    rng = np.random.default_rng(3)
    for _ in range(200):
        w = C.CATALOGUE["length_constraints:number_words"].sample(rng, "x")
        assert (40 <= w["num_words"] <= 120) if w["relation"] == LESS else (30 <= w["num_words"] <= 80)
        assert 2 <= C.CATALOGUE["detectable_format:number_bullet_lists"].sample(rng, "x")["num_bullets"] <= 4
        assert 2 <= C.CATALOGUE["length_constraints:number_paragraphs"].sample(rng, "x")["num_paragraphs"] <= 3
        s = C.CATALOGUE["length_constraints:number_sentences"].sample(rng, "x")
        assert 2 <= s["num_sentences"] <= (5 if s["relation"] == AT_LEAST else 6)


# --------------------------------------------------------------------------------------------
# Drawing: property test

instructions = st.one_of(
    st.lists(st.sampled_from(VOCAB), max_size=4).map(
        lambda ws: ("Write about the " + " and the ".join(ws) + ".") if ws else "Write something nice."),
    st.lists(st.sampled_from(VOCAB + ["a", "the", "with", ",", "python code", "three sentences"]),
             min_size=1, max_size=12).map(" ".join),
    st.text(max_size=60),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), instruction=instructions)
def test_draws_are_compatible_valid_and_phrased(seed, instruction):
    rng = np.random.default_rng(seed)
    cs = C.draw_constraints(instruction, rng)
    assert 1 <= len(cs) <= 3
    ids = [c["id"] for c in cs]
    assert len(set(ids)) == len(ids)
    for i, a in enumerate(cs):
        checks.validate(a["id"], a["kwargs"])
        for b in cs[i + 1:]:
            assert b["id"] not in checks.conflicts(a["id"]) and a["id"] not in checks.conflicts(b["id"])
            assert C.pair_conflict(a, b) is None
    assert C.conflict_reason(cs) is None
    assert not set(ids) & C.instruction_excludes(instruction)
    if "combination:repeat_prompt" in ids:
        assert instruction.strip()
    text = C.phrase(instruction, cs, rng)
    assert text.startswith(instruction.strip())
    tail = text[len(instruction.strip()):]
    for c in cs:
        for m in mentions(c["id"], c["kwargs"]):
            assert m in tail, (c, tail)
        rel = relation_of(c["kwargs"])
        sentence = C.render(c, np.random.default_rng(seed + 1))
        assert all(m in sentence for m in mentions(c["id"], c["kwargs"]))
        if rel:
            assert any(w in sentence for w in RELATION_WORDS[rel])
    # deterministic given the rng
    again = np.random.default_rng(seed)
    assert C.draw_constraints(instruction, again) == cs and C.phrase(instruction, cs, again) == text


def test_draw_respects_k_and_weights():
    rng = np.random.default_rng(4)
    for _ in range(50):
        assert len(C.draw_constraints("Write about the ocean.", rng, k_min=2, k_max=2)) == 2
    only = {cid: 0 for cid in IDS} | {"punctuation:no_comma": 1}
    assert all(C.draw_constraints("Write about the ocean.", rng, weights=only)
               == [c_("punctuation:no_comma")] for _ in range(20))
    with pytest.raises(ValueError, match="'no:such'"):
        C.draw_constraints("x", rng, weights={"no:such": 1})
    with pytest.raises(ValueError, match="k_min"):
        C.draw_constraints("x", rng, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="could not draw 2"):       # json conflicts with no_comma
        C.draw_constraints("x", rng, k_min=2, k_max=2, weights={cid: 0 for cid in IDS} | {
            "punctuation:no_comma": 1, "detectable_format:json_format": 1})


def test_instruction_rules_keep_ids_off_clashing_tasks():
    rng = np.random.default_rng(5)
    code = "Write a Python function that sorts a list of numbers."
    counted = "Write three sentences about the sea."
    for _ in range(200):
        ids = {c["id"] for c in C.draw_constraints(code, rng)}
        assert not ids & {"punctuation:no_comma", "change_case:english_lowercase", "detectable_format:json_format"}
        ids = {c["id"] for c in C.draw_constraints(counted, rng)}
        assert not ids & {"length_constraints:number_sentences", "length_constraints:number_words"}


# --------------------------------------------------------------------------------------------
# Each checker: a passing and a failing response written by hand

EXAMPLES = [
    ("keywords:existence", {"keywords": ["budget", "travel"]},
     "Plan your travel around a fixed budget.", "Plan your trip around a fixed amount of money."),
    ("keywords:frequency", {"keyword": "river", "frequency": 3, "relation": AT_LEAST},
     "The river bends. A river runs. Every river ends.", "The river bends once and then runs to the sea."),
    ("keywords:frequency", {"keyword": "river", "frequency": 2, "relation": LESS},
     "The river bends once and then runs to the sea.", "The river bends. The river runs."),
    ("keywords:forbidden_words", {"forbidden_words": ["really", "very"]},
     "Everything here is quite good.", "It is Very good."),          # whole words, any case
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 5, "let_relation": AT_LEAST},
     "Eleven eels swam.", "A cat sat on a mat."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": LESS},
     "A lazy cat.", "Pizza with Zest."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": AT_LEAST},
     "The sun rose. The birds sang. We went outside.", "The sun rose. The birds sang."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LESS},
     "The sun rose. The birds sang.", "The sun rose. The birds sang. We went outside."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "The first paragraph is here.\n***\nThe second paragraph follows.",
     "The first paragraph is here.\n\nThe second paragraph follows."),     # blank lines are not ***
    ("length_constraints:number_words", {"num_words": 10, "relation": LESS},
     "A short answer of six words.", "This answer has far too many words in it to pass the limit."),
    ("length_constraints:number_words", {"num_words": 8, "relation": AT_LEAST},
     "This answer has comfortably more than eight words in it.", "Too short."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [place].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "See you at noon.\nP.S. Bring water.", "See you at noon. PS bring water."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "See you at noon.\nP.P.S. Bring water.", "See you at noon.\nP.S. Bring water."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Options:\n* walk\n* cycle\n* drive", "Options:\n* walk\n* cycle"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "This is *quick* and *cheap*.", "This is *quick* and cheap."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe setting.\nSection 2\nThe plot.", "Part 1\nThe setting.\nPart 2\nThe plot."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nThe setting.\nSECTION 2\nThe plot.", "Section 1\nThe setting.\nSection 2\nThe plot."),
    ("detectable_format:json_format", {},
     '```json\n{"colour": "blue"}\n```', 'Here it is: {"colour": "blue"}'),
    ("detectable_format:title", {},
     "<<Autumn Notes>>\nLeaves fall in October.", "Autumn Notes\nLeaves fall in October."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name a colour."},
     "Name a colour. Blue.", "Blue. Name a colour."),
    ("startend:end_checker", {"end_phrase": "I hope this helps."},
     "Blue is calm. I hope this helps.", "I hope this helps. Blue is calm."),
    ("startend:quotation", {}, '"Blue is calm."', 'Blue is "calm".'),
    ("change_case:english_lowercase", {},
     "the weather today is lovely and we will walk to the park with our friends.",
     "The weather today is lovely and we will walk to the park with our friends."),
    ("change_case:english_capital", {},
     "THE WEATHER TODAY IS LOVELY AND WE WILL WALK TO THE PARK WITH OUR FRIENDS.",
     "THE WEATHER TODAY IS LOVELY and we will walk to the park with our friends."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AT_LEAST},
     "This is VERY IMPORTANT news.", "This is very important news."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LESS},
     "I like it a lot.", "I like NASA a lot."),                       # "I" counts as an all-caps word
    ("punctuation:no_comma", {}, "Red and blue and green.", "Red, blue and green."),
]


def test_examples_cover_every_catalogue_id():
    assert {e[0] for e in EXAMPLES} == set(C.CATALOGUE)


@pytest.mark.parametrize("cid,kwargs,passing,failing", EXAMPLES,
                         ids=[f"{e[0]}-{relation_of(e[1]) or i}" for i, e in enumerate(EXAMPLES)])
def test_checker_passes_and_fails_hand_written_responses(cid, kwargs, passing, failing):
    ok, bad = checks.check_one(passing, cid, kwargs), checks.check_one(failing, cid, kwargs)
    assert ok.strict and ok.loose
    assert not bad.strict and not bad.loose


def test_loose_forgives_a_preamble_line_but_strict_does_not():
    r = checks.check_one('Sure, here it is:\n{"colour": "blue"}', "detectable_format:json_format", {})
    assert (r.strict, r.loose) == (False, True)


def test_sentences_are_counted_offline():
    # nltk's punkt data is not available offline; checks.py falls back to an untrained splitter
    assert checks.sentence_splitter() in ("punkt-untrained", "punkt-english")
    text = "Rain fell all night. The river rose. By morning the road was closed. We stayed home."
    kw = {"num_sentences": 4, "relation": AT_LEAST}
    assert checks.check_one(text, "length_constraints:number_sentences", kw).strict
    assert not checks.check_one(text, "length_constraints:number_sentences", {"num_sentences": 4, "relation": LESS}).strict
    assert C._count_sentences(text) == 4


# --------------------------------------------------------------------------------------------
# Our conflict rules, each with the checker behaviour that motivates it (or shows a pair is fine)

def _all_pass(text: str, cs: list[dict]) -> bool:
    return all(checks.check_one(text, c["id"], c["kwargs"]).strict for c in cs)


def test_case_rules_follow_the_checkers():
    lower, upper = c_("change_case:english_lowercase"), c_("change_case:english_capital")
    sec = c_("detectable_format:multiple_sections", section_spliter="Section", num_sections=2)
    SEC = c_("detectable_format:multiple_sections", section_spliter="SECTION", num_sections=2)
    body = "Section 1\nthe weather today is lovely and warm.\nSection 2\nwe will walk to the park with our friends."
    # the section splitter is case-sensitive, so lowercase text has no sections
    assert not _all_pass(body.lower(), [lower, sec]) and C.pair_conflict(lower, sec)
    assert C.pair_conflict(lower, SEC)
    # all caps works with "SECTION" but not with "Section"
    assert _all_pass(body.upper(), [upper, SEC]) and C.pair_conflict(upper, SEC) is None
    assert not _all_pass(body.upper(), [upper, sec]) and C.pair_conflict(upper, sec)
    # all caps with a lowercase letter count is fine: the letter checker ignores case
    letter = c_("keywords:letter_frequency", letter="e", let_frequency=3, let_relation=AT_LEAST)
    caps = "THE WEATHER TODAY IS LOVELY AND WE WILL WALK TO THE PARK WITH OUR FRIENDS."
    assert _all_pass(caps, [upper, letter]) and C.conflict_reason([upper, letter]) is None
    # titles carry no case requirement
    title = c_("detectable_format:title")
    assert _all_pass("<<a walk>>\n" + caps.lower(), [lower, title]) and C.conflict_reason([lower, title]) is None
    assert _all_pass("<<A WALK>>\n" + caps, [upper, title])
    # capital_word_frequency with either case rule is in IFEval's table
    assert C.pair_conflict(lower, c_("change_case:capital_word_frequency", capital_frequency=2,
                                     capital_relation=AT_LEAST)) == "IFEval conflict table"


def test_quotation_and_end_phrase_are_compatible():
    cs = [c_("startend:quotation"), c_("startend:end_checker", end_phrase="Thanks for reading.")]
    assert _all_pass('"Blue is calm. Thanks for reading."', cs)   # the end checker strips quotes
    assert C.conflict_reason(cs) is None
    for other in ("detectable_format:title", "detectable_format:json_format", "combination:repeat_prompt"):
        assert other in C.id_conflicts("startend:quotation")


def test_forbidden_words_never_forbid_required_text():
    forbid = c_("keywords:forbidden_words", forbidden_words=["budget"])
    assert "forbidden_words rejects" in C.conflict_reason([forbid, c_("keywords:existence", keywords=["budget"])])
    assert C.conflict_reason([forbid, c_("keywords:frequency", keyword="budget", frequency=2, relation=AT_LEAST)])
    # "less than" forces nothing, and a longer word containing it is not the forbidden word
    assert C.conflict_reason([forbid, c_("keywords:frequency", keyword="budget", frequency=2, relation=LESS)]) is None
    assert C.conflict_reason([forbid, c_("keywords:existence", keywords=["budgeting"])]) is None
    assert C.conflict_reason([c_("keywords:forbidden_words", forbidden_words=["hope"]),
                              c_("startend:end_checker", end_phrase="I hope this helps.")])
    assert C.conflict_reason([c_("keywords:forbidden_words", forbidden_words=["section"]),
                              c_("detectable_format:multiple_sections", section_spliter="Section", num_sections=2)])
    assert C.conflict_reason([c_("keywords:forbidden_words", forbidden_words=["ps"]),
                              c_("detectable_content:postscript", postscript_marker="P.S.")]) is None


def test_limits_accept_the_text_the_others_force():
    repeat = c_("combination:repeat_prompt", prompt_to_repeat="Name a colour, then a fruit.")
    assert C.conflict_reason([c_("punctuation:no_comma"), repeat])           # the copy has a comma
    assert C.conflict_reason([c_("punctuation:no_comma"),
                              c_("combination:repeat_prompt", prompt_to_repeat="Name a colour.")]) is None
    z_cap = c_("keywords:letter_frequency", letter="z", let_frequency=3, let_relation=LESS)
    assert C.conflict_reason([z_cap, c_("keywords:existence", keywords=["jazz"])]) is None          # 2 < 3
    assert C.conflict_reason([z_cap, c_("keywords:existence", keywords=["jazz"]),
                              c_("keywords:frequency", keyword="pizza", frequency=2, relation=AT_LEAST)])
    few_caps = c_("change_case:capital_word_frequency", capital_frequency=2, capital_relation=LESS)
    assert C.conflict_reason([few_caps, c_("startend:end_checker", end_phrase="I hope this helps."),
                              c_("detectable_content:postscript", postscript_marker="P.S.")])  # "I" and "P.S."
    assert C.conflict_reason([few_caps, c_("detectable_format:multiple_sections", section_spliter="SECTION",
                                            num_sections=2)])
    assert C.conflict_reason([c_("keywords:frequency", keyword="help", frequency=2, relation=LESS),
                              c_("startend:end_checker", end_phrase="I hope this helps."),
                              c_("keywords:existence", keywords=["helpful"])])


def test_room_rules():
    words = lambda rel, n: c_("length_constraints:number_words", num_words=n, relation=rel)  # noqa: E731
    sents = lambda rel, n: c_("length_constraints:number_sentences", num_sentences=n, relation=rel)  # noqa: E731
    paras = c_("length_constraints:number_paragraphs", num_paragraphs=3)
    bullets = c_("detectable_format:number_bullet_lists", num_bullets=4)
    ps = c_("detectable_content:postscript", postscript_marker="P.S.")
    end = c_("startend:end_checker", end_phrase="Thanks for reading.")
    assert C.conflict_reason([words(LESS, 60), paras])            # 3 paragraphs need ~60 words + the answer
    assert C.conflict_reason([words(LESS, 100), paras]) is None
    assert C.conflict_reason([words(LESS, 60), bullets]) is None
    assert C.conflict_reason([words(LESS, 60), bullets, paras])   # each fits alone, not together
    assert C.conflict_reason([words(LESS, 40), c_("combination:repeat_prompt",
                                                   prompt_to_repeat=" ".join(["word"] * 30) + ".")])
    assert C.conflict_reason([words(LESS, 40), sents(AT_LEAST, 5)])
    assert C.conflict_reason([sents(LESS, 4), bullets])           # four bullets are four sentences
    assert C.conflict_reason([sents(LESS, 3), ps])                # "P.S." is split off as a sentence
    assert C.conflict_reason([sents(LESS, 4), ps]) is None
    assert C.conflict_reason([sents(LESS, 4), ps, end])
    assert C.conflict_reason([words(AT_LEAST, 80), sents(LESS, 4)])   # 27 words a sentence
    assert C.conflict_reason([words(AT_LEAST, 60), sents(LESS, 4)]) is None
    assert C.conflict_reason([words(AT_LEAST, 60), sents(LESS, 4), ps])
    # the P.S. splitting that motivates the rule
    assert C._count_sentences("Bring water.\nP.S. See you at noon.") == 3


# --------------------------------------------------------------------------------------------
# Joint satisfiability: for many draws, build an answer that the real checkers pass

FILLER = ("the sun rose past the green hill and the birds sang their soft songs near the old stone "
          "walls while the rain fell on the tall trees").split()


def _sentence(i: int, n: int, extra: list[str]) -> str:
    words = [FILLER[(i * 7 + j) % len(FILLER)] for j in range(n)]
    words[1:1] = extra
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _write(cs: list[dict], n_body: int, n_words: int) -> str | None:
    """An answer shaped by the constraints: repeated prompt, title, sections, paragraphs, bullets,
    required words, postscript, end phrase, case and quotes; n_body sentences of n_words words."""
    k = {c["id"]: c["kwargs"] for c in cs}
    if "detectable_format:json_format" in k:
        return json.dumps({"answer": " ".join(k.get("keywords:existence", {}).get("keywords", []) + FILLER[:n_words])})
    extra = list(k.get("keywords:existence", {}).get("keywords", []))
    if k.get("keywords:frequency", {}).get("relation") == AT_LEAST:
        extra += [k["keywords:frequency"]["keyword"]] * k["keywords:frequency"]["frequency"]
    if k.get("keywords:letter_frequency", {}).get("let_relation") == AT_LEAST:
        extra += [k["keywords:letter_frequency"]["letter"] * 3] * 4
    if k.get("change_case:capital_word_frequency", {}).get("capital_relation") == AT_LEAST:
        extra += ["NOTE"] * k["change_case:capital_word_frequency"]["capital_frequency"]
    extra += ["[name]"] * k.get("detectable_content:number_placeholders", {}).get("num_placeholders", 0)
    extra += ["**bright**"] * k.get("detectable_format:number_highlighted_sections", {}).get("num_highlights", 0)
    n_bullets = k.get("detectable_format:number_bullet_lists", {}).get("num_bullets", 0)
    n_paras = k.get("length_constraints:number_paragraphs", {}).get("num_paragraphs", 1)
    sec = k.get("detectable_format:multiple_sections")
    n_secs = sec["num_sections"] if sec else 0
    if n_body < max(n_bullets, n_paras, n_secs, 1):
        return None
    breaks = {i * n_body // n_paras for i in range(1, n_paras)}
    lines = []
    for i in range(n_body):
        if i in breaks:
            lines.append("***")
        if i < n_secs:
            lines.append(f"{sec['section_spliter']} {i + 1}")
        lines.append(("* " if i >= n_body - n_bullets else "") + _sentence(i, n_words, extra if i == 0 else []))
    if "detectable_format:title" in k:
        lines.insert(0, "<<Some Title>>")
    if "combination:repeat_prompt" in k:
        lines.insert(0, k["combination:repeat_prompt"]["prompt_to_repeat"])
    if "detectable_content:postscript" in k:
        lines.append(k["detectable_content:postscript"]["postscript_marker"] + " see you soon.")
    if "startend:end_checker" in k:
        lines.append(k["startend:end_checker"]["end_phrase"])
    text = "\n".join(lines)
    if "change_case:english_lowercase" in k:
        text = text.lower()
    if "change_case:english_capital" in k:
        text = text.upper()
    if "startend:quotation" in k:
        text = f'"\n{text}"'           # the closing quote right after the end phrase
    return text


def _satisfy(cs: list[dict]) -> str | None:
    for n_body in range(1, 16):
        for n_words in (6, 12, 25, 4):
            text = _write(cs, n_body, n_words)
            if text is not None and _all_pass(text, cs):
                return text
    return None


def test_drawn_sets_are_jointly_satisfiable():
    # Weighted towards the ids that limit or need room, so the rules are exercised.
    heavy = {"length_constraints:number_words": 4, "length_constraints:number_sentences": 4,
             "keywords:letter_frequency": 3, "keywords:forbidden_words": 3, "punctuation:no_comma": 2,
             "change_case:capital_word_frequency": 3, "detectable_content:postscript": 2,
             "startend:end_checker": 2, "combination:repeat_prompt": 2, "startend:quotation": 2}
    unsolved = []
    for s in range(240):
        rng = np.random.default_rng(s)
        words = [VOCAB[int(i)] for i in rng.choice(len(VOCAB), size=int(rng.integers(0, 4)), replace=False)]
        ins = ("Write about the " + (", and the " if s % 3 else " and the ").join(words) + ".") if words \
            else "Write something nice."
        cs = C.draw_constraints(ins, rng, k_min=3 if s % 2 else 1, k_max=3 if s % 5 else 4,
                                weights=heavy if s % 4 < 2 else None)
        if _satisfy(cs) is None:
            unsolved.append(cs)
    assert not unsolved, unsolved[:3]


# --------------------------------------------------------------------------------------------
# Phrasing

def test_phrase_appends_shuffled_sentences_deterministically():
    cs = [c_("punctuation:no_comma"), c_("detectable_format:title"),
          c_("length_constraints:number_words", num_words=50, relation=LESS)]
    texts = {C.phrase("Describe a lighthouse.", cs, np.random.default_rng(s)) for s in range(40)}
    assert len(texts) > 10
    assert all(t.startswith("Describe a lighthouse.") and "50" in t and "<<" in t for t in texts)
    joins = {t[len("Describe a lighthouse.")] for t in texts}
    assert joins == {" ", "\n"}
    firsts = {re.split(r"(?<=\.)[ \n]", t)[1][:12] for t in texts}
    assert len(firsts) >= 3                                # the order varies
    assert C.phrase("Describe a lighthouse.", cs, np.random.default_rng(7)) == \
        C.phrase("Describe a lighthouse.", cs, np.random.default_rng(7))
    # no end punctuation: always a new line, so the sentences do not run together
    assert all(C.phrase("Name a colour", cs[:1], np.random.default_rng(s)).startswith("Name a colour\n")
               for s in range(20))
    assert C.phrase("Name a colour.", [], np.random.default_rng(0)) == "Name a colour."


def test_repeat_prompt_phrasing_points_at_the_request():
    cs = [c_("combination:repeat_prompt", prompt_to_repeat="Explain how tides work in simple terms.")]
    for s in range(20):
        text = C.phrase("Explain how tides work in simple terms.", cs, np.random.default_rng(s))
        assert text.startswith("Explain how tides work in simple terms.")
        assert re.search("word[- ]for[- ]word", text)
    sentences = {C.render(cs[0], np.random.default_rng(s)) for s in range(30)}
    assert any('"tides work in simple terms."' in t for t in sentences)      # the request's last words


# --------------------------------------------------------------------------------------------
# The stage

ROWS = [
    {"instruction": "Describe a rainy afternoon in a small town.", "response": "It rained.", "method": "self_instruct"},
    {"instruction": "Give advice to a new gardener.", "response": "Water often.", "method": "evol:deepen"},
    {"instruction": "Summarise the text.", "input": "The cat sat on the mat all day long.", "response": "A cat sat."},
    {"instruction": "Explain why the sky is blue.", "response": "Scattering."},
]


def _stage(seed=0, round=0, **cfg) -> C.ConstraintsStage:
    return C.ConstraintsStage(C.ConstraintsConfig(**cfg), seed=seed, round=round)


def test_stage_replaces_each_row_by_constrained_copies():
    batch = make_batch(ROWS)
    out = _stage(copies=2).apply(batch)
    assert out.schema == SCHEMA
    assert out.height == 2 * batch.height
    parents = dict(zip(batch["id"], batch.to_dicts()))
    for r in out.to_dicts():
        p = parents[r["parent_id"]]
        assert 1 <= len(r["constraints"]) <= 3
        assert r["id"] == record_id(r["instruction"], r["input"]) != p["id"]
        assert r["instruction"].startswith(p["instruction"]) and r["instruction"] != p["instruction"]
        assert r["input"] == p["input"] and r["response"] == "" and r["method"] == p["method"]
        assert r["messages"] == to_messages(r["instruction"], r["input"], "")
        for c in r["constraints"]:
            checks.validate(c["id"], c["kwargs"])
            assert c["kwargs"] == json.dumps(json.loads(c["kwargs"]), sort_keys=True)
        cs = [{"id": c["id"], "kwargs": json.loads(c["kwargs"])} for c in r["constraints"]]
        assert C.conflict_reason(cs) is None
        repeat = [c for c in cs if c["id"] == "combination:repeat_prompt"]
        assert all(c["kwargs"]["prompt_to_repeat"] == p["instruction"] for c in repeat)
    assert out["id"].n_unique() == out.height


def test_stage_passes_constrained_and_rejected_rows_through():
    done = {"instruction": "Name a colour.\nDo not use commas.", "response": "Blue",
            "constraints": [{"id": "punctuation:no_comma", "kwargs": "{}"}]}
    rejected = {"instruction": "Name a fruit.", "drop_reason": "too_short"}
    batch = make_batch([done, rejected, ROWS[0]])
    out = _stage().apply(batch)
    assert out.height == 3
    assert out.head(2).equals(batch.head(2))
    assert out["parent_id"][2] == batch["id"][2]
    kept = _stage(keep_original=True, copies=2).apply(make_batch(ROWS))
    assert kept.height == 3 * len(ROWS)
    assert kept.filter(pl.col("constraints").list.len() == 0).equals(make_batch(ROWS))


def test_stage_drops_a_row_no_allowed_constraint_fits():
    rows = [{"instruction": "Write a Python function that reverses a string."}, ROWS[0]]
    out = _stage(include=["punctuation:no_comma"]).apply(make_batch(rows))
    assert out["drop_reason"].to_list() == ["no_compatible_constraints", None]
    assert out["id"][0] == make_batch(rows)["id"][0] and out["constraints"][0].to_list() == []
    with pytest.raises(C.DrawError):
        C.draw_constraints(rows[0]["instruction"], np.random.default_rng(0),
                           specs={"punctuation:no_comma": C.CATALOGUE["punctuation:no_comma"]})


def test_stage_draws_are_keyed_by_row_not_arrival_order():
    batch = make_batch(ROWS)
    a = _stage(seed=3).apply(batch)
    b = _stage(seed=3).apply(batch.reverse())
    c = pl.concat([_stage(seed=3).apply(batch.head(2)), _stage(seed=3).apply(batch.tail(2))])
    key = lambda df: df.sort("id").select("id", "instruction", "constraints")  # noqa: E731
    assert key(a).equals(key(b)) and key(a).equals(key(c))
    assert not key(a).equals(key(_stage(seed=3, round=1).apply(batch)))   # another round draws anew
    assert not key(a).equals(key(_stage(seed=4).apply(batch)))
    assert not key(a).equals(key(_stage(seed=3, seed_offset=1).apply(batch)))
    assert _stage(seed=3, round=2).apply(batch)["round"].unique().to_list() == [2]


def test_stage_state_counts_draws():
    from collections import Counter

    st_ = _stage(copies=2)
    out = st_.apply(make_batch(ROWS))
    assert st_.apply(make_batch([])).is_empty()
    state = st_.state()
    assert state["rows"] == len(ROWS)
    assert state["drawn"] == dict(Counter(c["id"] for cs in out["constraints"].to_list() for c in cs))
    other = _stage()
    other.restore(state, None)
    assert other.state() == state


def test_stage_include_exclude_and_weights():
    out = _stage(include=["punctuation:no_comma", "detectable_format:title"], k_min=1, k_max=1).apply(make_batch(ROWS))
    assert {c["id"] for cs in out["constraints"].to_list() for c in cs} <= {"punctuation:no_comma",
                                                                            "detectable_format:title"}
    out = _stage(exclude=[cid for cid in IDS if cid != "startend:quotation"]).apply(make_batch(ROWS))
    assert all([c["id"] for c in cs] == ["startend:quotation"] for cs in out["constraints"].to_list())
    out = _stage(weights={cid: 0 for cid in IDS if cid != "detectable_format:title"}).apply(make_batch(ROWS))
    assert all([c["id"] for c in cs] == ["detectable_format:title"] for cs in out["constraints"].to_list())


@pytest.mark.parametrize("cfg,match", [
    ({"weights": {"keywords:nonsense": 1}}, "'keywords:nonsense'"),
    ({"weights": {"language:response_language": 1}}, "'language:response_language'"),
    ({"include": ["nope:x"]}, "'nope:x'"),
    ({"exclude": ["nope:y"]}, "'nope:y'"),
    ({"weights": {"punctuation:no_comma": -1}}, "'punctuation:no_comma'"),
    ({"k_min": 0}, "k_min"),
    ({"k_min": 3, "k_max": 2}, "k_min"),
    ({"copies": 0}, "copies"),
    ({"include": ["punctuation:no_comma"], "k_min": 2, "k_max": 2}, "k_min=2"),
    ({"custom": [{"id": "x:y", "check": "custom_checks:has_exclamation"}]}, "phrasings"),
    ({"custom": [{"id": "x:y", "check": "nomodule", "phrasings": ["Shout."]}]}, "module.path:function"),
    ({"custom": [{"id": "x:y", "check": "a:b", "phrasings": ["Use {n} marks."]}]}, "'x:y'"),
    ({"custom": [{"id": "punctuation:no_comma", "check": "a:b", "phrasings": ["Shout."]}]}, "already taken"),
])
def test_config_errors_name_the_problem(cfg, match):
    with pytest.raises(ConfigError, match=match):
        C.ConstraintsConfig(**cfg)


def test_config_errors_from_toml_and_the_registry():
    assert "constraints" in names("stage")
    bad = '[[stages]]\ntype = "constraints"\nweights = { "keywords:nope" = 2 }\n'
    with pytest.raises(ConfigError, match="'keywords:nope'"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="k_min"):
        parse_config('[[stages]]\ntype = "constraints"\nk_min = 4\nk_max = 1\n')


CUSTOM_TOML = """
[[stages]]
type = "constraints"
copies = 3
k_min = 2
k_max = 2
include = ["test:exclaim", "punctuation:no_comma", "detectable_format:title"]
[[stages.custom]]
id = "test:exclaim"
check = "custom_checks:has_exclamation"
kwargs = { at_least = 2 }
phrasings = ["Use at least {at_least} exclamation marks.", "Include {at_least} or more '!' marks."]
"""


def test_custom_check_from_config_is_registered_and_drawable():
    cfg = parse_config(CUSTOM_TOML)
    cls, build = _REGISTRY[("stage", "constraints")]
    table = {k: v for k, v in cfg.stages[0].items() if k != "type"}
    stage = build(cls(**table), SimpleNamespace(seed=1, round=0))
    out = stage.fn(make_batch(ROWS))
    assert out.height == 3 * len(ROWS)
    seen = set()
    for r in out.to_dicts():
        assert len(r["constraints"]) == 2
        for c in r["constraints"]:
            seen.add(c["id"])
            if c["id"] == "test:exclaim":
                assert json.loads(c["kwargs"]) == {"at_least": 2}
                assert ("at least 2 exclamation marks" in r["instruction"]
                        or "2 or more '!' marks" in r["instruction"])
    assert "test:exclaim" in seen and "test:exclaim" in checks.known_ids()
    assert checks.check_one("Wow! Great!", "test:exclaim", '{"at_least": 2}').strict
    assert not checks.check_one("Wow! Great.", "test:exclaim", '{"at_least": 2}').loose
    assert stage.state()["drawn"]["test:exclaim"] >= 1


def test_a_bad_constraints_table_is_one_line_with_file_and_line(tmp_path, capsys):
    from synthloop.engine.cli import main

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[llm.generator]\nmodel = "x"\n[source]\ntype = "seeds"\n\n[[stages]]\ntype = "constraints"\n'
                   'weights = { "nope:unknown" = 2 }\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {cfg}:8: [stages.0]") and "nope:unknown" in err
    assert not (tmp_path / "out").exists()
