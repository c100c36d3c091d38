"""Teacher distillation: n samples with distinct seeds, best-of-n with a judge, drop reasons,
lineage (the task keeps its method and id; `model` names the teacher), role fallback."""
from __future__ import annotations

import asyncio
import re

import pytest

from scripted_llm import FnLLM, context, run_batch
from synthloop.generator.distill import Distill, DistillConfig, failure_reason, grade_request
from synthloop.core.llm.base import Completion
from synthloop.core.schema import make_batch


def _rows():
    return make_batch([
        {"instruction": "Name a prime number.", "response": "4", "method": "self_instruct", "round": 2},
        {"instruction": "Summarise.", "input": "Cats nap a lot.", "method": "evol:deepen", "parent_id": "p1",
         "generation": 1},
    ])


def _distill(teacher_fn, judge_fn=None, **cfg):
    teacher = FnLLM(teacher_fn, "teach")
    llms = {"generator": FnLLM(lambda r, p: "from the generator", "gen"), "teacher": teacher}
    judge = None
    if judge_fn:
        judge = llms["judge"] = FnLLM(judge_fn, "judge")
    return Distill(DistillConfig(**cfg), context(llms)), teacher, judge


def test_teacher_answers_each_row_and_lineage_is_kept():
    d, teacher, _ = _distill(lambda r, p: f"  answer {p['seed']}  ", system="Be exact.")
    rows = _rows()
    out = run_batch(d, rows)
    assert out["drop_reason"].is_null().all()
    assert out["id"].to_list() == rows["id"].to_list()
    for col in ("method", "parent_id", "generation", "round", "instruction", "input"):
        assert out[col].to_list() == rows[col].to_list(), col
    assert out["model"].to_list() == ["teach", "teach"]
    assert all(re.fullmatch(r"answer \d+", r) for r in out["response"])
    assert out["messages"][1].to_list()[1] == {"role": "assistant", "content": out["response"][1]}
    sys_msg, user = teacher.sent[1][0]
    assert sys_msg == {"role": "system", "content": "Be exact."}
    assert user == {"role": "user", "content": "Summarise.\n\nCats nap a lot."}


def test_n_samples_are_separate_requests_with_consecutive_seeds():
    d, teacher, _ = _distill(lambda r, p: "ok answer", n=3)
    run_batch(d, _rows())
    assert len(teacher.sent) == 6
    seeds = [p["seed"] for _, p in teacher.sent]
    assert seeds[1:3] == [seeds[0] + 1, seeds[0] + 2] and seeds[4:6] == [seeds[3] + 1, seeds[3] + 2]
    assert all(p["temperature"] == 0.7 for _, p in teacher.sent)
    assert d.state()["samples"] == 6 and d.state()["judged_rows"] == 0     # no [llm.judge]: no grading


def test_best_of_n_keeps_the_judges_favourite():
    def teacher(r, p):
        return f"candidate {p['seed'] % 3}"      # seeds are consecutive: three distinct candidates

    def judge(r, p):
        cand = re.search(r"candidate (\d)", r[0]["content"]).group(1)
        return {"0": "Weak. Score: 3", "1": "Great. Score: 9", "2": "Fine. Score: 9"}[cand]
    d, t, j = _distill(teacher, judge, n=3)
    out = run_batch(d, _rows())
    for row, resp in enumerate(out["response"]):
        cands = [f"candidate {p['seed'] % 3}" for _, p in t.sent[3 * row:3 * row + 3]]
        # Candidates 1 and 2 tie at 9: the earlier of the two in sampling order wins.
        assert resp == next(c for c in cands if c != "candidate 0")
    assert len(j.sent) == 6 and d.state()["judged_rows"] == 2
    assert "[Answer]" in j.sent[0][0][0]["content"] and j.sent[0][1]["temperature"] == 0.0


def test_best_of_n_picks_the_highest_score_first_on_ties():
    scores = iter(["Score: 4", "Score: 8", "Score: 8", "no verdict", "Score: 2", "Score: 5"])
    d, teacher, judge = _distill(lambda r, p: f"cand {p['seed']}", lambda r, p: next(scores), n=3)
    out = run_batch(d, _rows())
    seeds = [p["seed"] for _, p in teacher.sent]
    assert out["response"].to_list() == [f"cand {seeds[1]}", f"cand {seeds[5]}"]
    assert d.state()["unscored"] == 1 and d.state()["best_not_first"] == 2


def test_without_judge_the_first_usable_candidate_is_kept():
    replies = iter([Completion("cut", "length", 5, 512), Completion("", "stop"), Completion("good one", "stop"),
                    Completion("later", "stop")])
    d, _, _ = _distill(lambda r, p: next(replies), n=4, judge_role="")
    out = run_batch(d, _rows().head(1))
    assert out["response"].to_list() == ["good one"] and out["drop_reason"][0] is None


def test_drop_reasons():
    replies = {"Name a prime number.": Completion("2 is the smallest prime and", "length", 5, 512),
               "Summarise.": Completion("", "error", error="boom")}
    d, _, _ = _distill(lambda r, p: replies[r[-1]["content"].split("\n")[0]])
    out = run_batch(d, _rows())
    assert out["drop_reason"].to_list() == ["truncated", "generation_error"]
    d, _, _ = _distill(lambda r, p: "   ")
    assert run_batch(d, _rows())["drop_reason"].to_list() == ["empty_response"] * 2
    assert failure_reason(["error", "stop", "length"], ["", "", "x"]) == "truncated"
    assert failure_reason(["error", "stop"], ["", " "]) == "empty_response"
    assert failure_reason(["error"], [""]) == "generation_error"


def test_teacher_falls_back_to_the_generator_and_only_missing():
    gen = FnLLM(lambda r, p: "generator answer", "gen")
    d = Distill(DistillConfig(only_missing=True), context({"generator": gen}))
    out = run_batch(d, _rows())
    assert out["response"].to_list() == ["4", "generator answer"]
    assert out["model"].to_list() == ["", "gen"] and len(gen.sent) == 1


def test_grade_request_and_bad_n():
    text = grade_request("Add 2 and 3.", " 5 ")[0]["content"]
    assert "[Task]\nAdd 2 and 3.\n\n[Answer]\n5\n" in text and 'finish with "Score: N"' in text
    with pytest.raises(ValueError, match="n must be"):
        _distill(lambda r, p: "x", n=0)


def test_seeds_are_reproducible_per_batch_id():
    d1, t1, _ = _distill(lambda r, p: "a", n=2)
    run_batch(d1, _rows(), 0)
    run_batch(d1, _rows(), 1)
    d2, t2, _ = _distill(lambda r, p: "a", n=2)
    d2.restore(d1.state(), None)
    run_batch(d2, _rows(), 1)
    assert t2.sent == t1.sent[4:] and t1.sent[:4] != t1.sent[4:]


def test_counts_of_a_batch_appear_once_it_is_folded():
    d, _, _ = _distill(lambda r, p: f"cand {p['seed']}", lambda r, p: "Score: 5", n=2)
    asyncio.run(d.process(_rows(), 7))
    assert d.state() == {"samples": 0, "judged_rows": 0, "unscored": 0, "best_not_first": 0}
    d.fold(7)
    assert d.state()["samples"] == 4 and d.state()["judged_rows"] == 2
