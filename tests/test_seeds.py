"""Seed loaders: every supported shape, and one-line errors naming path, line and field."""
from __future__ import annotations

import json

import polars as pl
import pytest

from synthloop.engine.cli import main
from synthloop.generator.rouge import rouge_l, tokenize
from synthloop.seeds.loaders import SeedError, load_seeds


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundled_seed_set_is_large_diverse_and_valid():
    seeds = load_seeds()
    df = seeds.records
    assert df["instruction"].n_unique() >= 150
    assert (df["response"] != "").all()
    assert len(seeds.classification) >= 12
    toks = [tokenize(t) for t in df["instruction"].unique().to_list()]
    worst = max(rouge_l(a, b) for i, a in enumerate(toks) for b in toks[i + 1:])
    assert worst <= 0.7


def test_self_instruct_shape(tmp_path):
    p = write(tmp_path / "s.jsonl", [json.dumps({
        "id": "t1", "name": "n", "instruction": "Label the review as positive or negative.",
        "instances": [{"input": "Great!", "output": "positive"}, {"input": "Awful.", "output": "negative"}],
        "is_classification": True})])
    s = load_seeds(p)
    assert s.records.height == 2 and len(s.classification) == 2
    assert s.records["input"].to_list() == ["Great!", "Awful."]


def test_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add 2 and 2.", "input": "", "output": "4"},
            {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    for name in ("a.json", "a.jsonl"):
        df = load_seeds(tmp_path / name).records
        assert df["response"].to_list() == ["4", "tac"]


def test_sharegpt_both_shapes(tmp_path):
    write(tmp_path / "c.jsonl", [json.dumps({"conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]})])
    write(tmp_path / "m.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello!"}]})])
    assert load_seeds(tmp_path / "c.jsonl").records["response"].to_list() == ["Hi!"]
    assert load_seeds(tmp_path / "m.jsonl").records["response"].to_list() == ["Hello!"]


def test_generic_jsonl_and_parquet_with_field_mapping(tmp_path):
    write(tmp_path / "g.jsonl", [json.dumps({"q": "Name a planet.", "a": "Mars"})])
    pl.DataFrame({"q": ["Name a moon."], "a": ["Titan"]}).write_parquet(tmp_path / "g.parquet")
    f = {"instruction": "q", "output": "a"}
    assert load_seeds(tmp_path / "g.jsonl", format="jsonl", fields=f).records["response"].to_list() == ["Mars"]
    assert load_seeds(tmp_path / "g.parquet", fields=f).records["response"].to_list() == ["Titan"]


def test_txt_one_instruction_per_line(tmp_path):
    write(tmp_path / "t.txt", ["Name a colour.", "", "List three trees."])
    df = load_seeds(tmp_path / "t.txt").records
    assert df["instruction"].to_list() == ["Name a colour.", "List three trees."]
    assert (df["response"] == "").all()


@pytest.mark.parametrize("lines,fmt,expect", [
    (['{"instruction": "ok", "instances": [{"input": "", "output": "x"}]}', '{"instruction": "b", "instances": ['],
     "self_instruct", "s.jsonl:2: not valid JSON"),
    (['{"instruction": "ok", "instances": []}'], "self_instruct", "s.jsonl:1: field 'instances'"),
    (['{"name": "x", "instances": [{"input": "", "output": "y"}]}'], "self_instruct", "s.jsonl:1: field 'instruction': missing"),
    (['{"instruction": "a", "input": "", "output": 3}'], "alpaca", "s.jsonl:1: field 'output': must be a string"),
    (['{"instruction": "ok", "instances": [{"input": "", "output": "y"}], "is_classification": "yes"}'],
     "self_instruct", "field 'is_classification'"),
    (['{"conversations": [{"from": "gpt", "value": "hi"}]}'], "sharegpt", "s.jsonl:1: field 'conversations': has no user turn"),
])
def test_malformed_inputs_name_path_line_and_field(tmp_path, lines, fmt, expect):
    p = write(tmp_path / "s.jsonl", lines)
    with pytest.raises(SeedError) as e:
        load_seeds(p, format=fmt)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_cli_run_with_bad_seeds_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", ['{"instruction": "x", "instances": [{"input": ""}]}'])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[seeds]\npath = "{bad}"\n[source]\ntype = "self_instruct"\n')
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith("bad.jsonl:1: field 'instances[0].output': missing")
    assert not out.exists()
