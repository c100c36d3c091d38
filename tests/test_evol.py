"""Evol-Instruct: prompts and parsing per operation, every elimination reason, lineage, the
per-operation table, determinism, and an end-to-end scripted run mixing every method."""
from __future__ import annotations

import json
import re

import polars as pl
import pytest

from scripted_llm import FnLLM, context, run_batch, scripted_factory
from synthloop.generator import evol_prompts as P
from synthloop.core.config import parse_config
from synthloop.generator.eliminate import (STOPWORDS, answer_reason, growth_reason, is_refusal, jaccard,
                                           near_identical, stopwords_only, task_reason)
from synthloop.generator.evol import Evol, EvolConfig
from synthloop.core.llm.base import Completion
from synthloop.engine.runner import execute
from synthloop.core.schema import make_batch
from synthloop.outputs.manifest import count_problems

TASK = "Explain why the sky is blue."


# ---------------------------------------------------------------- prompts and parsing


@pytest.mark.parametrize("op", P.DEPTH_OPS)
def test_depth_prompt_carries_task_operation_and_answer_tags(op):
    text = P.evolve_request(op, "  " + TASK + "\n", extra_words=25)[0]["content"]
    assert f"{P.SOURCE_OPEN}\n{TASK}\n{P.SOURCE_CLOSE}" in text
    assert P.DEPTH_HOW[op] in text and "about 25 words" in text
    assert P.HARDER_OPEN in text and P.HARDER_CLOSE in text and P.NEW_OPEN not in text
    others = [h for o, h in P.DEPTH_HOW.items() if o != op]
    assert not any(h in text for h in others)


def test_breadth_prompt_asks_for_a_new_task():
    text = P.evolve_request("breadth", TASK)[0]["content"]
    assert TASK in text and P.NEW_OPEN in text and P.HARDER_OPEN not in text
    assert "same field" in text and "less often" in text
    with pytest.raises(ValueError, match="unknown evol operation"):
        P.evolve_request("shorten", TASK)


def test_our_prompts_are_not_wizardlm_wording():
    texts = [P.evolve_request(op, TASK)[0]["content"] for op in P.OPS] + [P.same_request("a", "b")[0]["content"]]
    for phrase in ("#Given Prompt#", "#Rewritten Prompt#", "#Created Prompt#", "prompt rewriter", "Prompt Creator"):
        assert not any(phrase.lower() in t.lower() for t in texts)


@pytest.mark.parametrize("op", P.OPS)
@pytest.mark.parametrize("reply, want", [
    ("{o}\nExplain why the sky is blue at noon.\n{c}", "Explain why the sky is blue at noon."),
    ("Sure! Here it is:\n{o} Explain why the sky is blue at noon. {c}\nHope this helps.", "Explain why the sky is blue at noon."),
    ("Explain why the sky is blue at noon.", "Explain why the sky is blue at noon."),
    ("{o}\n\"Explain why the sky is blue at noon.\"", "Explain why the sky is blue at noon."),
    ("{o}\n```\nExplain why the sky is blue at noon.\n```\n{c}", "Explain why the sky is blue at noon."),
    ("Explain why the sky is blue at noon.{c} trailing", "Explain why the sky is blue at noon."),
    ("{O}Explain why the sky is blue at noon.{C}", "Explain why the sky is blue at noon."),
])
def test_parse_evolved_per_operation(op, reply, want):
    o, c = (P.NEW_OPEN, P.NEW_CLOSE) if op == "breadth" else (P.HARDER_OPEN, P.HARDER_CLOSE)
    text = reply.format(o=o, c=c, O=o.upper(), C=c.upper())
    assert P.parse_evolved(op, text) == want


def test_other_operations_tags_are_left_for_the_leak_check():
    got = P.parse_evolved("deepen", f"{P.NEW_OPEN}Explain tides.{P.NEW_CLOSE}")
    assert P.leaked_marker(got) == "new_task"


def test_every_marker_comes_from_our_prompts():
    texts = " ".join([P.DEPTH_PROMPT, P.BREADTH_PROMPT, P.SOURCE_OPEN, P.HARDER_OPEN, P.NEW_OPEN]).lower()
    for m in P.MARKERS:
        assert m in texts, m
        assert P.leaked_marker(f"Please {m.upper()} now") == m


@pytest.mark.parametrize("text, want", [
    ("SAME", True), ("same.", True), ("They are equal.", True), ("Identical", True),
    ("DIFFERENT", False), ("Not the same: B adds a limit.", False), ("not equal", False),
    ("**Different** - B is harder, though the same topic", False), ("B differs from A.", False),
    ("", None), ("I think B is harder.", None), (None, None),
])
def test_parse_same(text, want):
    assert P.parse_same(text) is want


# ---------------------------------------------------------------- elimination rules


def test_elimination_reasons_on_crafted_tasks():
    parent = "Write a short poem about the sea."
    assert task_reason(parent, "  ", "deepen") == "empty_instruction"
    assert task_reason(parent, "Rewrite the harder task: write a poem about the sea at dawn.", "deepen") == "prompt_leak"
    assert task_reason(parent, "<source_task> write a poem about dawn at sea", "breadth") == "prompt_leak"
    assert task_reason(parent, "write a SHORT poem   about the sea!", "deepen") == "no_information_gain"
    long_parent = " ".join(f"word{i}" for i in range(30))
    assert task_reason(long_parent, long_parent + " word31", "deepen", jaccard_threshold=0.9) == "no_information_gain"
    assert task_reason(long_parent, long_parent + " word31", "deepen", jaccard_threshold=0.99) is None
    assert task_reason(parent, "Write a poem on the ocean.", "concretize") == "no_growth"
    assert task_reason(parent, "Compose a haiku on rivers.", "breadth") is None          # breadth may shrink
    assert task_reason(parent, parent + " Use this table: " + "| a | b |\n" * 40, "complicate_input") == "overgrown"
    assert task_reason(parent, parent + " Use this table: " + "| a | b |\n" * 40, "complicate_input",
                       max_growth=20) is None
    assert task_reason(parent, "Write a short poem about the sea in exactly four rhyming lines.", "add_constraints") is None


def test_growth_bounds_are_ratios_of_characters():
    assert growth_reason("abcd", "abcdefgh", "deepen", min_growth=2.0) == "no_growth"
    assert growth_reason("abcd", "abcdefghi", "deepen", min_growth=2.0) is None
    assert growth_reason("abcd", "a" * 12, "deepen", max_growth=3.0) is None
    assert growth_reason("abcd", "a" * 13, "deepen", max_growth=3.0) == "overgrown"


def test_near_identity_and_jaccard():
    assert jaccard("a b c d", "a b c e") == pytest.approx(3 / 5)
    assert near_identical("Name a fruit.", "  name A fruit. ")
    assert not near_identical("Name a fruit.", "Name a red fruit.", 0.9)


def test_answer_reasons_on_crafted_answers():
    assert answer_reason("") == "empty_response"
    assert answer_reason("I'm sorry, but I can't help with that request.") == "refusal"
    assert answer_reason("As an AI, I do not have opinions on poetry.") == "refusal"
    assert answer_reason("I apologize; the question is unclear to me.") == "refusal"
    assert answer_reason("I\u2019m unable to do that.") == "refusal"
    assert answer_reason("It is what it is, and so on...") == "stopwords_only"
    assert answer_reason("... ?! ---") == "stopwords_only"
    assert answer_reason("The sky scatters blue light more (Rayleigh scattering).") is None
    long_sorry = "Sorry is a word people use to apologise. " + "It has many uses in daily speech. " * 15
    assert not is_refusal(long_sorry) and answer_reason(long_sorry) is None
    assert is_refusal("Sorry, no.", max_words=3) and not is_refusal("Sorry, I cannot do that.", max_words=3)
    assert stopwords_only("") and {"the", "and", "you"} <= STOPWORDS and "sky" not in STOPWORDS


# ---------------------------------------------------------------- the stage


def _grow(req, p):
    """Rewrites: a grown task; answers and judge verdicts: plain."""
    user = req[-1]["content"]
    if P.SOURCE_OPEN in user:
        task = user.split(P.SOURCE_OPEN)[1].split(P.SOURCE_CLOSE)[0].strip()
        tags = (P.NEW_OPEN, P.NEW_CLOSE) if P.NEW_OPEN in user else (P.HARDER_OPEN, P.HARDER_CLOSE)
        s = p["seed"]
        return f"{tags[0]}{task} Consider the cases {s}a, {s}b, {s}c and {s}d.{tags[1]}"
    if user.endswith("SAME or DIFFERENT."):
        return "DIFFERENT"
    return "Blue light scatters most in the air."


def _evol(fn=_grow, judge=None, **cfg):
    llm = FnLLM(fn, "gen")
    llms = {"generator": llm, **({"judge": judge} if judge else {})}
    return Evol(EvolConfig(**cfg), context(llms)), llm


def _parents():
    return make_batch([{"instruction": TASK, "response": "Rayleigh scattering.", "method": "self_instruct", "round": 0},
                       {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "response": "Cats nap.",
                        "method": "seed", "generation": 2}])


def test_stage_keeps_parents_and_appends_children_with_lineage():
    ev, llm = _evol(generations=1, ops={"deepen": 1})
    parents = _parents()
    out = run_batch(ev, parents)
    assert out.head(2).equals(parents)                       # parents pass through unchanged
    kids = out.slice(2)
    assert kids.height == 2 and kids["drop_reason"].is_null().all()
    assert kids["method"].to_list() == ["evol:deepen"] * 2
    assert kids["parent_id"].to_list() == parents["id"].to_list()
    assert kids["generation"].to_list() == [1, 3]
    assert kids["round"].to_list() == [0, 0] and kids["model"].to_list() == ["gen", "gen"]
    assert (kids["input"] == "").all() and kids["instruction"][1].startswith("Summarise the text.\n\nCats sleep a lot.")
    assert (kids["response"] == "Blue light scatters most in the air.").all()
    assert kids["instruction"][0].startswith(TASK + " Consider the cases")
    assert (kids["messages"].list.len() == 2).all()
    assert "Summarise the text.\n\nCats sleep a lot." in llm.sent[1][0][0]["content"]
    assert llm.sent[0][1]["stop"] == list(P.CLOSE_TAGS) and llm.sent[0][1]["seed"] != llm.sent[1][1]["seed"]
    # Three kinds of request per child: rewrite, judge verdict (judge falls back to generator), answer.
    assert len(llm.sent) == 6


def test_generations_chain_and_failed_evolutions_retry_from_the_parent():
    calls = {"n": 0}

    def fn(req, p):
        user = req[-1]["content"]
        if P.SOURCE_OPEN in user:
            calls["n"] += 1
            if calls["n"] == 2:          # the second row's first evolution fails
                return "I cannot."
        return _grow(req, p)
    ev, _ = _evol(fn, generations=3, ops={"add_constraints": 1, "concretize": 1})
    parents = _parents()
    kids = run_batch(ev, parents).slice(2)
    assert kids.height == 6
    first, second = kids.slice(0, 2), kids.slice(2, 2)
    assert first["drop_reason"].to_list() == [None, "no_growth"]
    assert second["parent_id"].to_list() == [first["id"][0], parents["id"][1]]   # retried from its parent
    assert second["generation"].to_list() == [2, 3]
    third = kids.slice(4, 2)
    assert third["parent_id"].to_list() == second["id"].to_list() and third["generation"].to_list() == [3, 4]
    st = ev.state()
    assert sum(r["proposed"] for r in st["ops"].values()) == 6
    assert sum(r["kept"] for r in st["ops"].values()) == 5
    assert sum(sum(r["dropped"].values()) for r in st["ops"].values()) == 1


def test_every_reason_reaches_the_stage_and_the_per_operation_table():
    """One parent per failure mode, recognised by a keyword in its task."""
    replies = {
        "leak": "<harder_task>Given the source task, solve leak problems with care.</harder_task>",
        "same": None, "noinfo": "<harder_task>noinfo task number seven</harder_task>",
        "shrink": "<harder_task>shrink</harder_task>",
        "error": Completion("", "error", error="boom"),
        "cut": Completion("<harder_task>cut task and then some more", "length", 10, 256),
        "sorry": None, "stop": None, "empty": None, "anscut": None, "anserr": None, "ok": None,
    }
    answers = {"sorry": "Sorry, I can't help with that.", "stop": "It is so.", "empty": "  ",
               "anscut": Completion("Half an ans", "length", 5, 320), "anserr": Completion("", "error", error="x")}

    def fn(req, p):
        user = req[-1]["content"]
        key = re.search(r"(\w+) task number seven", user).group(1)
        if P.SOURCE_OPEN in user:
            return replies[key] or f"<harder_task>{key} task number seven, explained in great detail.</harder_task>"
        if user.endswith("SAME or DIFFERENT."):
            return "Same." if key == "same" else "Different."
        return answers.get(key, "A fine and helpful answer.")
    ev, llm = _evol(fn, ops={"deepen": 1})
    parents = make_batch([{"instruction": f"{k} task number seven"} for k in replies])
    kids = run_batch(ev, parents).slice(parents.height)
    got = dict(zip([k for k in replies], kids["drop_reason"].to_list()))
    assert got == {"leak": "prompt_leak", "same": "no_information_gain", "noinfo": "no_information_gain",
                   "shrink": "no_growth", "error": "generation_error", "cut": "truncated", "sorry": "refusal",
                   "stop": "stopwords_only", "empty": "empty_response", "anscut": "truncated",
                   "anserr": "generation_error", "ok": None}
    table = ev.state()["ops"]["deepen"]
    assert table["proposed"] == 12 and table["kept"] == 1
    assert table["dropped"] == {"prompt_leak": 1, "no_information_gain": 2, "no_growth": 1, "generation_error": 2,
                                "truncated": 2, "refusal": 1, "stopwords_only": 1, "empty_response": 1}
    judged = ev.state()["judge"]
    assert judged["asked"] == 7 and judged["same"] == 1 and judged["different"] == 6
    # Only survivors of the cheap checks cost a judge request; only survivors of the judge an answer.
    assert len(llm.sent) == 12 + 7 + 6


def test_judge_role_and_unclear_verdicts():
    judge = FnLLM(lambda r, p: "Hmm, hard to say.", "judge")
    ev, gen = _evol(judge=judge, ops={"deepen": 1})
    kids = run_batch(ev, _parents()).slice(2)
    assert kids["drop_reason"].is_null().all()               # unclear verdicts keep the child
    assert len(judge.sent) == 2 and ev.state()["judge"]["unclear"] == 2
    assert not any(r[0][-1]["content"].endswith("SAME or DIFFERENT.") for r in gen.sent)
    ev2, gen2 = _evol(judge_role="", ops={"deepen": 1})
    run_batch(ev2, _parents())
    assert len(gen2.sent) == 4 and ev2.state()["judge"]["asked"] == 0


def test_answer_role_is_configurable():
    answerer = FnLLM(lambda r, p: "An answer from elsewhere.", "ans")
    llm = FnLLM(_grow, "gen")
    ev = Evol(EvolConfig(answer_role="answerer"), context({"generator": llm, "answerer": answerer}))
    kids = run_batch(ev, _parents()).slice(2)
    assert kids["model"].to_list() == ["ans", "ans"] and len(answerer.sent) == 2
    assert (kids["response"] == "An answer from elsewhere.").all()


def test_fraction_mix_and_seeded_determinism():
    batch = make_batch([{"instruction": f"Describe animal number {i} in a paragraph."} for i in range(200)])
    opts = dict(fraction=0.25, ops={"deepen": 3, "breadth": 1}, judge_role="")
    ev, llm = _evol(**opts)
    kids = run_batch(ev, batch).slice(200)
    assert 30 <= kids.height <= 70
    counts = kids["method"].value_counts()
    share = dict(zip(counts["method"], counts["count"]))
    assert share["evol:deepen"] > 2 * share["evol:breadth"]
    # A fresh evolver sends the same requests for the same batch id, other ones for another id.
    ev2, llm2 = _evol(**opts)
    run_batch(ev2, batch, 0)
    run_batch(ev2, batch, 1)
    assert llm2.sent[:len(llm.sent)] == llm.sent and llm2.sent[len(llm.sent):] != llm.sent
    ev3, llm3 = _evol(**opts)
    ev3.restore(ev.state(), None)
    run_batch(ev3, batch, 1)
    assert llm3.sent == llm2.sent[len(llm.sent):]
    assert ev3.state() == ev2.state()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown operations"):
        _evol(ops={"shrink": 1})
    with pytest.raises(ValueError, match="at least one"):
        _evol(ops={"deepen": 0})
    with pytest.raises(ValueError, match="generations"):
        _evol(generations=0)
    with pytest.raises(ValueError, match="min_growth"):
        _evol(min_growth=3.0, max_growth=2.0)


# ---------------------------------------------------------------- end to end (scripted backend)

MIXED = """
[run]
name = "mixed"
limit = {limit}
shard_rows = 9
cache = "{cache}"

[llm.generator]
backend = "transformers"

[llm.teacher]
backend = "transformers"
model = "teacher"

[llm.judge]
backend = "transformers"
model = "judge"

[source]
type = "mix"
sources = [
  {{ type = "self_instruct", prompts_per_step = 3 }},
  {{ type = "magpie", pre_query = "<|im_start|>user\\n", end_of_turn = "<|im_end|>", requests_per_step = 4 }},
]
weights = [2, 1]

[[stages]]
type = "instances"

[[stages]]
type = "evol"
fraction = 0.5
generations = 2

[[stages]]
type = "distill"
n = 2
"""


def mixed(tmp_path, limit=40):
    return parse_config(MIXED.format(limit=limit, cache=tmp_path / "req.sqlite"), path="mixed.toml")


def _read(run, key="shards"):
    m = json.loads((run / "manifest.json").read_text())
    return pl.concat([pl.read_parquet(run / e["path"]) for e in m[key]])


def test_end_to_end_self_instruct_instances_evol_distill(tmp_path):
    run = tmp_path / "run"
    m = execute(mixed(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory())
    assert m["complete"] and count_problems(m) == []
    kept, rej = _read(run), _read(run, "rejects")
    assert kept.height >= 40 and kept["id"].is_unique().all()
    methods = set(kept["method"])
    assert {"self_instruct", "magpie"} <= methods and any(x.startswith("evol:") for x in methods)
    # Distill answered everything that reached it: the teacher wrote every kept response.
    assert (kept["model"] == "scripted:teacher").all() and (kept["response"] != "").all()
    evolved = kept.filter(pl.col("method").str.starts_with("evol:"))
    everyone = set(kept["id"]) | set(rej["id"])
    assert set(evolved["parent_id"]) <= everyone and (evolved["generation"] >= 1).all()
    assert (kept.filter(pl.col("method").is_in(["self_instruct", "magpie"]))["generation"] == 0).all()
    stage = {s["name"]: s for s in m["stages"]}
    table = m["state"]["evol"]["ops"]
    assert stage["evol"]["created"] == sum(r["proposed"] for r in table.values())
    merged: dict = {}
    for r in table.values():
        assert r["proposed"] == r["kept"] + sum(r["dropped"].values())
        for k, v in r["dropped"].items():
            merged[k] = merged.get(k, 0) + v
    assert merged == stage["evol"]["dropped"]
    assert "no_information_gain" in merged      # the scripted rewriter repeats ~10% of tasks verbatim
    assert set(rej.filter(pl.col("drop_stage") == "evol")["drop_reason"]) == set(merged)
    assert m["state"]["distill"]["judged_rows"] > 0 and m["state"]["distill"]["samples"] == 2 * stage["distill"]["in"]


def test_mixed_pipeline_resumes_after_a_crash_exactly(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    execute(mixed(tmp_path), out=clean, show_progress=False, backend_factory=scripted_factory())
    from synthloop.outputs import run_store
    real = run_store.RunStore._commit
    calls = {"n": 0}

    def crashing(self, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("crash")
        return real(self, **kw)
    monkeypatch.setattr(run_store.RunStore, "_commit", crashing)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="crash"):
        execute(mixed(tmp_path), out=crashed, show_progress=False, backend_factory=scripted_factory())
    monkeypatch.setattr(run_store.RunStore, "_commit", real)
    m = execute(mixed(tmp_path), out=crashed, show_progress=False, backend_factory=scripted_factory())
    ref = json.loads((clean / "manifest.json").read_text())
    assert count_problems(m) == [] and _read(crashed).equals(_read(clean))
    assert m["stages"] == ref["stages"] and m["state"] == ref["state"]
