"""The verified loop end to end: constraints -> rejection sampling (scripted student) -> preference
pairs -> SFT+DPO of a tiny random Llama -> benchmark scores per round -> reseeding by pass rate;
plus `synthloop export` in every format and a loop killed in round 1 that resumes to the clean result."""
from __future__ import annotations

import json

import polars as pl
import pytest
from scripted_llm import scripted_factory

from synthloop.engine.cli import main
from synthloop.outputs.run_reader import read_kept, read_rejects
from synthloop.engine.rounds import load_rounds_config, run_rounds

BENCH = [
    {"key": 1, "prompt": "Describe a river. Use no commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a comet in at least 40 words.", "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 40, "relation": "at least"}]},
]

CONFIG = """
[run]
name = "verified"
limit = 10
shard_rows = 8
cache = "{cache}"

[llm.generator]
backend = "transformers"
model = "{model}"

[source]
type = "seeds"
batch_size = 6

[[stages]]
type = "constraints"
k_min = 1
k_max = 2
weights = {{ "punctuation:no_comma" = 4, "length_constraints:number_words" = 4, "keywords:existence" = 2 }}

[[stages]]
type = "rejection_sampling"
n = 3
sampling = {{ temperature = 1.0, max_tokens = 64 }}

[[stages]]
type = "exact_dedup"

[rounds]
count = 2
hard_examples = 2
reseed = "pass_rate"
win_rate = false
eval_limit = 2
benchmark = "{bench}"
benchmark_sampling = {{ temperature = 0, max_tokens = 16 }}

[train]
method = "sft+dpo"
replay = ["bundled"]
max_steps = 1
batch_size = 2
max_length = 128
learning_rate = 5e-3
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
"""


def _config(tmp_path, model):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(b) + "\n" for b in BENCH))
    path = tmp_path / "verified.toml"
    path.write_text(CONFIG.format(cache=tmp_path / "req.sqlite", model=model, bench=bench))
    return load_rounds_config(path)


def _comparable(entries):
    keep = ("loss", "previous_loss", "hard_examples", "benchmark", "previous_benchmark")
    return [{"round": e["round"], "records": e["records"], "final_loss": e["train_metrics"]["final_loss"],
             "eval": {k: {kk: vv for kk, vv in v.items() if kk not in ("answer_seconds", "benchmark", "adapter", "base_model")} if isinstance(v, dict) else v
                      for k, v in e["eval"].items() if k in keep}} for e in entries]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("verified")
    entries = run_rounds(_config(tmp, tiny_model), tmp / "out", show_progress=False,
                         backend_factory=scripted_factory())
    return tmp / "out", entries


def test_every_round_samples_verifies_pairs_trains_and_scores(loop):
    out, entries = loop
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds["base"]["benchmark"]["n_prompts"] == 2
    assert [e["round"] for e in entries] == [0, 1]
    for e in entries:
        rdir = out / e["run_dir"]
        kept = read_kept(rdir)
        assert kept.height == e["records"] > 0
        # Every kept response passed every constraint of its row, and the row says how often its task passed.
        assert kept["constraints"].list.len().min() >= 1
        assert kept["scores"].struct.field("verified_all").all()
        assert kept["scores"].struct.field("pass_rate").is_between(1 / 3, 1.0).all()
        rej = read_rejects(rdir)
        assert {"failed_check", "no_passing_sample"} & set(rej["drop_reason"])
        pairs = pl.read_parquet(rdir / "pairs" / "pairs-00000.parquet")
        assert pairs.height > 0 and set(pairs["id"]) <= set(kept["id"])
        assert (pairs["rejected_verified"] < 1).all()
        metrics = json.loads((out / e["adapter"] / "train_metrics.json").read_text())
        dpo = metrics["dpo"]
        assert metrics["method"] == "sft+dpo" and dpo["pairs"] + sum(dpo["skipped"].values()) == pairs.height
        # The seeds' own answers join the SFT phase only (replay); DPO sees the pairs alone.
        assert metrics["sft"]["replayed"] == 182 and metrics["sft"]["examples"] + sum(metrics["sft"]["skipped"].values()) == 182 + kept.height
        bench = e["eval"]["benchmark"]
        assert bench["n_prompts"] == 2 and 0 <= bench["prompt_loose"] <= 1 and "per_prompt" not in bench
    r0, r1 = entries
    assert r0["eval"]["previous_benchmark"] == rounds["base"]["benchmark"]
    assert r1["eval"]["previous_benchmark"] == r0["eval"]["benchmark"]
    assert r1["eval"]["previous_loss"] == r0["eval"]["loss"]


def test_next_round_is_reseeded_with_the_least_passed_tasks_and_their_constraints(loop):
    out, entries = loop
    seeds = pl.read_parquet(out / entries[0]["next_seeds"])
    assert entries[0]["eval"]["hard_examples"] == 2 and seeds.height == 182 + 2
    hard = seeds.head(2)                       # first, so a round stopped by its limit still retries them
    assert hard["constraints"].list.len().min() >= 1 and (hard["response"] == "").all()
    rdir = out / "round-00"
    tried = pl.concat([read_kept(rdir), read_rejects(rdir).filter(pl.col("drop_reason") == "no_passing_sample")
                       .drop("drop_stage")])
    lowest = tried["scores"].struct.field("pass_rate").sort().head(2).to_list()
    assert hard["scores"].struct.field("pass_rate").to_list() == lowest
    # Round 1 samples those tasks again as they are (their constraints are not redrawn).
    r1_tasks = set(read_kept(out / "round-01")["id"]) | set(read_rejects(out / "round-01")["id"])
    assert set(hard["id"]) <= r1_tasks


def test_export_writes_every_format(loop, tmp_path, capsys):
    out, entries = loop
    kept = pl.concat([read_kept(out / e["run_dir"]) for e in entries])
    for fmt, name in (("sft", "sft-00000.parquet"), ("dpo", "pairs-00000.parquet"),
                      ("alpaca", "alpaca.json"), ("sharegpt", "sharegpt.json")):
        assert main(["export", str(out), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        res = json.loads(capsys.readouterr().out)
        path = tmp_path / fmt / name
        assert res["path"] == str(path) and path.exists()
    assert pl.read_parquet(tmp_path / "sft" / "sft-00000.parquet").height == kept.height
    alpaca = json.loads((tmp_path / "alpaca" / "alpaca.json").read_text())
    assert [a["output"] for a in alpaca] == kept["response"].to_list()
    share = json.loads((tmp_path / "sharegpt" / "sharegpt.json").read_text())
    assert share[0]["conversations"][1] == {"from": "gpt", "value": kept["response"][0]}
    pairs = pl.read_parquet(tmp_path / "dpo" / "pairs-00000.parquet")
    row = pairs.row(0, named=True)
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert main(["export", str(tmp_path / "nothing"), "--format", "sft", "--out", str(tmp_path / "x")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_report_draws_the_benchmark_per_round(loop):
    from synthloop.outputs.report import write_report

    out, _ = loop
    index = write_report(out)
    assert (index.parent / "benchmark.png").exists()
    assert "benchmark of the base model" in index.read_text()


def test_killed_in_round_one_resumes_to_the_clean_result(tmp_path, tiny_model, loop, monkeypatch):
    from synthloop.tuner import sft

    real = sft.train_in_fresh_process

    def dies_in_round_one(cfg, data, out, **kw):
        if "round-01" in str(out):
            raise RuntimeError("killed")
        return real(cfg, data, out, **kw)
    monkeypatch.setattr(sft, "train_in_fresh_process", dies_in_round_one)
    cfg = _config(tmp_path, tiny_model)
    with pytest.raises(RuntimeError, match="killed"):
        run_rounds(cfg, tmp_path / "out", show_progress=False, backend_factory=scripted_factory())
    assert (tmp_path / "out" / "round-01" / "pairs" / "pairs-00000.parquet").exists()
    monkeypatch.setattr(sft, "train_in_fresh_process", real)
    entries = run_rounds(cfg, tmp_path / "out", show_progress=False, backend_factory=scripted_factory())
    assert _comparable(entries) == _comparable(loop[1])
    for r in ("round-00", "round-01"):
        assert read_kept(tmp_path / "out" / r).equals(read_kept(loop[0] / r))
        assert pl.read_parquet(tmp_path / "out" / r / "pairs" / "pairs-00000.parquet").equals(
            pl.read_parquet(loop[0] / r / "pairs" / "pairs-00000.parquet"))
