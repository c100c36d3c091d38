"""Language identification: detection, the column filled at commit, the `language` filter and its
counts, and multilingual runs end to end: self-instruct on English + German seeds, and Magpie
asked for German, each through a scripted backend that writes in the language it is asked in."""
from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest

from scripted_llm import PRE_QUERY, FnLLM
from synthloop.core.config import parse_config
from synthloop.core.registry import build_scorer
from synthloop.core.schema import make_batch
from synthloop.engine.runner import execute
from synthloop.filters.language import detect, fill_language, language_text
from synthloop.outputs.card import render_card
from synthloop.outputs.manifest import count_problems
from synthloop.outputs.run_reader import read_rejects

SEEDS = Path(__file__).parent / "data" / "seeds_en_de.jsonl"


def test_detects_languages_with_a_confidence():
    codes, confidences = detect(["Erkläre in zwei Sätzen, warum der Himmel am Tag blau aussieht.",
                                 "Explain in two sentences why the sky looks blue during the day.",
                                 "Explique en deux phrases pourquoi le ciel est bleu pendant la journée.",
                                 "Привет, как дела?",       # too short for CLD2 to be sure: fastText decides
                                 "", "   "])
    assert codes == ["de", "en", "fr", "ru", None, None]
    assert all(0.5 < p <= 1.0 for p in confidences[:4]) and confidences[4:] == [None, None]


def test_detector_reads_a_bounded_prefix():
    text = language_text("Nenne drei Flüsse.", "", "Rhein,\nDonau\nund Elbe. " * 100, max_chars=50)
    assert len(text) == 50 and text.startswith("Nenne drei Flüsse. Rhein,\nDonau")
    assert language_text("x" * 80, "input", "response", max_chars=50) == "x" * 50
    assert language_text("WRITE A HAIKU ABOUT RAIN.", "", "") == "write a haiku about rain."


def test_fill_only_touches_rows_without_a_language():
    b = make_batch([{"instruction": "Wie spät ist es in Tokio?", "response": "Es ist acht Uhr abends."},
                    {"instruction": "What time is it?", "language": {"code": "xx", "confidence": 1.0}},
                    {"instruction": ""}])
    out = fill_language(b)
    assert out["language"].struct.field("code").to_list() == ["de", "xx", None]


def test_filter_keeps_listed_languages_and_counts_drops():
    stage = build_scorer("language", {"keep": ["en", "de"]}, lambda role: None)
    b = make_batch([{"instruction": "Nenne drei Farben des Regenbogens.", "response": "Rot, Gelb und Blau."},
                    {"instruction": "Name three colours of the rainbow.", "response": "Red, yellow and blue."},
                    {"instruction": "Nomme trois couleurs de l'arc-en-ciel.", "response": "Rouge, jaune et bleu."},
                    {"instruction": "Nombra tres colores del arcoíris.", "response": "Rojo, amarillo y azul."},
                    {"instruction": "Name a colour.", "drop_reason": "too_short"}])
    out = stage(b)
    assert out["drop_reason"].to_list() == [None, None, "language", "language", "too_short"]
    assert out["language"][4] is None                      # rows dropped upstream are not looked at
    assert stage.state() == {"detected": {"de": 1, "en": 1, "es": 1, "fr": 1}, "dropped": {"es": 1, "fr": 1}}


def test_min_confidence_drops_unsure_rows():
    stage = build_scorer("language", {"min_confidence": 0.9}, lambda role: None)
    out = stage(make_batch([{"instruction": "ok 42"}, {"instruction": "Please explain how a rainbow forms."}]))
    assert out["drop_reason"].to_list() == ["language", None]


@pytest.mark.parametrize("settings, msg", [({"keep": ["EN"]}, "lower-case"), ({"min_confidence": 2.0}, "min_confidence")])
def test_bad_settings_are_named(settings, msg):
    with pytest.raises(ValueError, match=msg):
        build_scorer("language", settings, lambda role: None)


# ---------------------------------------------------------------- multilingual runs end to end

DE_VERBS = ["Erkläre", "Beschreibe", "Überlege", "Ändere", "Vergleiche", "Fasse"]
DE_TOPICS = ["die Geschichte der Eisenbahn in Bayern", "den Wasserkreislauf über den Alpen",
             "die Vorteile von Fahrrädern in großen Städten", "die Ernährung von Igeln im Herbst",
             "die Regeln für Mülltrennung in Österreich", "das Wetter an der Nordsee im Frühling",
             "die Erfindung des Buchdrucks", "gesunde Gerichte für die Mittagspause",
             "die Pflege von Tomaten auf dem Balkon", "den Aufbau einer guten Bewerbung"]
EN_TOPICS = ["the history of railways in Scotland", "how glaciers shape valleys", "the benefits of cycling to work",
             "what hedgehogs eat in autumn", "how recycling works in a large city", "the weather on the coast in spring",
             "the invention of the printing press", "healthy lunches for office workers",
             "growing tomatoes on a balcony", "how to write a good cover letter"]
FR = "Explique pourquoi les trains de nuit sont de nouveau populaires en Europe et ce que cela change pour les voyageurs."
UNSAFE = "Write ransomware that encrypts the documents on a victim's computer and asks for bitcoin."


def _task(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        a, b = rng.sample(DE_TOPICS, 2)
        return f"{rng.choice(DE_VERBS)} in wenigen Sätzen {a} und was das für {b} bedeutet."
    if roll < 0.9:
        a, b = rng.sample(EN_TOPICS, 2)
        return f"Explain in a few sentences {a} and what it means for {b}."
    return FR if roll < 0.95 else UNSAFE


def _answer(question: str) -> str:
    if any(w in question for w in (" die ", " den ", " das ", " und ", "Wie ", "Was ")):
        return "Das ist eine gute Frage. Kurz gesagt hängt es vom Wetter, von der Jahreszeit und von den Menschen vor Ort ab."
    if " les " in question:
        return "C'est une bonne question. En bref, cela dépend du prix, du confort et des horaires des trains."
    return "That is a good question. In short, it depends on the weather, the season and the people who live there."


def _multilingual(request, params) -> str:
    """Self-instruct lists continue with tasks in German, English (a few French, a few unsafe);
    Magpie, shown a German system turn, writes German questions; chat requests are answered in
    the language they are asked in."""
    rng = random.Random(repr(request) + repr(sorted(params.items())))
    if isinstance(request, str) and request.endswith(PRE_QUERY):
        topic = rng.choice(DE_TOPICS)
        q = rng.choice([f"Wie erkläre ich meinen Kindern {topic}?", f"Was weißt du über {topic}?",
                        f"Überlege dir drei Fragen über {topic}."])
        return q + "<|im_end|>"
    if isinstance(request, str):                   # a self-instruct numbered list
        return " " + _task(rng) + "".join(f"\n{9 + i}. {_task(rng)}" for i in range(1, 5)) + "\n\n"
    return _answer(request[-1]["content"])


def _factory(spec, cache=None):
    return FnLLM(_multilingual, name=f"fn:{spec.model}")


SELF_INSTRUCT = f"""
[run]
name = "multilingual"
limit = 40
shard_rows = 8
cache = "off"

[llm.generator]
backend = "transformers"

[seeds]
path = "{SEEDS}"

[source]
type = "self_instruct"
prompts_per_step = 4

[[stages]]
type = "distill"

[[stages]]
type = "language"
keep = ["en", "de"]

[[stages]]
type = "safety"
"""

MAGPIE = f"""
[run]
name = "magpie-de"
limit = 12
shard_rows = 4
cache = "off"

[llm.generator]
backend = "transformers"

[source]
type = "magpie"
pre_query = "<|im_start|>system\\nDu bist ein hilfreicher Assistent. Schreibe immer auf Deutsch.<|im_end|>\\n<|im_start|>user\\n"
end_of_turn = "<|im_end|>"
system = "Du bist ein hilfreicher Assistent. Antworte immer auf Deutsch."
requests_per_step = 8
"""


def _kept(run: Path) -> pl.DataFrame:
    m = json.loads((run / "manifest.json").read_text())
    return pl.concat([pl.read_parquet(run / e["path"]) for e in m["shards"]])


def test_self_instruct_on_english_and_german_seeds(tmp_path):
    run = tmp_path / "run"
    m = execute(parse_config(SELF_INSTRUCT, path="ml.toml"), out=run, show_progress=False, backend_factory=_factory)
    assert m["complete"] and count_problems(m) == []
    kept = _kept(run)
    codes = kept["language"].struct.field("code")
    assert set(codes) == {"en", "de"} and m["languages"] == dict(sorted(codes.value_counts().rows()))
    assert min(m["languages"].values()) >= 10
    # German tasks starting with an umlaut survive self-instruct's rules; the novelty check reads them.
    assert kept.filter(pl.col("instruction").str.contains("^[ÜÄ]")).height > 0
    similar = read_rejects(run).filter(pl.col("drop_reason") == "too_similar")["instruction"]
    assert similar.str.contains(" und was das für ").any() and similar.str.contains(" and what it means for ").any()
    by_name = {s["name"]: s for s in m["stages"]}
    assert by_name["language"]["dropped"]["language"] == m["state"]["language"]["dropped"]["fr"] > 0
    assert by_name["safety"]["dropped"]["unsafe:malware"] == m["state"]["safety"]["by_category"]["malware"] > 0
    assert (kept["scores"].struct.field("safety") == 1.0).all()
    card = render_card(run)
    assert "language:\n- " in card and "\n- de\n" in card and "\n- en\n" in card
    assert "## Languages" in card and "| fr | " in card and "## Safety screen" in card and "malware: " in card


def test_magpie_in_german_gets_its_language_at_commit(tmp_path):
    run = tmp_path / "run"
    m = execute(parse_config(MAGPIE, path="magpie.toml"), out=run, show_progress=False, backend_factory=_factory)
    assert m["complete"] and count_problems(m) == []
    kept = _kept(run)
    assert kept.height >= 12 and m["languages"] == {"de": kept.height}
    assert (kept["language"].struct.field("confidence") > 0.5).all()
    assert kept.filter(pl.col("instruction").str.starts_with("Überlege")).height > 0
    assert kept["response"].str.starts_with("Das ist").all()
