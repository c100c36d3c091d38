"""Report, dataset card and rounds.json on synthetic run directories written with our own run store."""
from __future__ import annotations

import json
import random

import polars as pl
import pytest

from synthloop.core.schema import SCHEMA, make_batch
from synthloop.outputs.card import render_card, write_card
from synthloop.outputs.manifest import count_problems, stage_row
from synthloop.outputs.report import drop_reason_counts, load_runs, method_counts, score_fields, write_report
from synthloop.outputs.rounds import load_rounds, record_round
from synthloop.outputs.run_reader import kept_paths, read_kept, run_dirs
from synthloop.outputs.run_store import RunStore

METHODS = ["seed", "self_instruct", "evol:deepen", "distill"]


def make_run(path, *, n=40, seed=0, rnd=0):
    """A committed run: a generator stage, a heuristics stage and a quality stage with drops."""
    rng = random.Random(seed)
    rows = [{"instruction": f"Task {rnd}-{i}: explain topic {rng.random():.6f}.", "response": f"Answer {i}.",
             "method": METHODS[i % len(METHODS)], "round": rnd, "model": "embedded",
             "scores": {"quality": rng.uniform(0, 5), "ifd": rng.uniform(0, 1) if i % 2 else None}}
            for i in range(n)]
    batch = make_batch(rows)
    too_short = batch.slice(0, 6).with_columns(drop_reason=pl.lit("too_short"))
    low_q = batch.slice(6, 8).with_columns(drop_reason=pl.lit("low_quality"))
    kept = batch.slice(14)
    store = RunStore(path, config_hash="cfg", rows_per_shard=10)
    store.open(meta={"name": "synthetic", "config_path": "t.toml", "config": "[run]\nname = \"synthetic\"\n",
                     "seeds": {"path": "bundled", "records": 182}, "models": {"generator": "transformers:embedded"},
                     "limit": 0})
    store.reject(too_short, "heuristics")
    store.reject(low_q, "quality")
    store.add(kept)
    stages = [stage_row("self_instruct", 0, n, {}), stage_row("heuristics", n, n - 6, {"too_short": 6}),
              stage_row("quality", n - 6, kept.height, {"low_quality": 8}),
              stage_row("write", kept.height, kept.height, {})]
    store.commit(stages=stages, state={}, llm={"total": {"requests": 50, "errors": 1, "prompt_tokens": 900,
                                                         "completion_tokens": 400}}, complete=True, final=True)
    assert not count_problems(store.manifest)
    return path


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


@pytest.fixture
def rounds_dir(tmp_path):
    root = tmp_path / "loop"
    for rnd in range(3):
        make_run(root / f"round-{rnd:02d}", n=30 + 10 * rnd, seed=rnd, rnd=rnd)
        record_round(root, {"round": rnd, "run_dir": f"round-{rnd:02d}", "adapter": f"round-{rnd:02d}/adapter",
                            "train_metrics": {"steps": 10, "final_loss": 1.5 - 0.1 * rnd},
                            "eval": {"loss": 1.8 - 0.1 * rnd, "previous_loss": 1.9 - 0.1 * rnd,
                                     "previous_adapter": None if rnd == 0 else f"round-{rnd - 1:02d}/adapter",
                                     "win_rate": None if rnd == 0 else 0.5 + 0.05 * rnd,
                                     "wins": 20, "losses": 15, "ties": 5, "parse_failures": 2, "n": 42}})
    return root


def test_report_writes_index_and_pngs(run_dir):
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    pngs = {p.name for p in (run_dir / "report").glob("*.png")}
    assert pngs == {"funnel.png", "drop_reasons.png", "scores.png", "methods.png"}   # no rounds.json: no rounds plot
    for name in pngs:
        assert (run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in index.read_text()
    text = index.read_text()
    assert "too_short: 6" in text and "low_quality: 8" in text


def test_report_data_counts(run_dir):
    runs = load_runs(run_dir)
    assert score_fields(runs) == ["quality", "ifd"]       # null-only fields get no histogram
    reasons = {(r["stage"], r["reason"]): r["count"] for r in drop_reason_counts(runs).to_dicts()}
    assert reasons == {("heuristics", "too_short"): 6, ("quality", "low_quality"): 8}
    methods = {r["method"]: (r["kept"], r["dropped"]) for r in method_counts(runs).to_dicts()}
    assert sum(k for k, _ in methods.values()) == 26 and sum(d for _, d in methods.values()) == 14
    assert methods["seed"] == (sum(1 for i in range(14, 40) if i % 4 == 0), sum(1 for i in range(14) if i % 4 == 0))


def test_report_over_rounds(rounds_dir):
    assert [n for n, _ in run_dirs(rounds_dir)] == [0, 1, 2]
    index = write_report(rounds_dir)
    pngs = {p.name for p in (rounds_dir / "report").glob("*.png")}
    assert "rounds.png" in pngs and "funnel.png" in pngs
    text = index.read_text()
    assert "round 2" in text and "0.6000" in text       # round 2's win-rate in the rounds table
    assert "held-out loss of the base model: 1.9000" in text   # round 0's previous student


def test_card_has_schema_counts_models_and_config(run_dir):
    path = write_card(run_dir)
    card = path.read_text()
    assert card.startswith("---\n") and "path: data/*.parquet" in card
    for column in SCHEMA.names():
        assert f"| {column} |" in card
    assert "| evol:deepen |" in card and "transformers:embedded" in card
    assert "| quality | 34 | 0 | 26 | 8 | low_quality: 8 |" in card
    assert '```toml\n[run]\nname = "synthetic"\n```' in card
    assert "26 records" in card


def test_card_for_rounds(rounds_dir):
    card = render_card(rounds_dir)
    assert "round-*/data/*.parquet" in card and "over 3 rounds" in card
    assert "## Pipeline, round 2" in card and "## Rounds" in card
    total = sum(read_kept(p).height for _, p in run_dirs(rounds_dir))
    assert f"{total} records" in card


def test_rounds_json_replaces_by_round_and_validates(tmp_path):
    record_round(tmp_path, {"round": 1, "eval": {"loss": 2.0}})
    record_round(tmp_path, {"round": 0, "eval": {"loss": 2.5}})
    record_round(tmp_path, {"round": 1, "eval": {"loss": 1.9}})
    assert [(r["round"], r["eval"]["loss"]) for r in load_rounds(tmp_path)] == [(0, 2.5), (1, 1.9)]
    assert json.loads((tmp_path / "rounds.json").read_text())["format"] == 1
    with pytest.raises(ValueError):
        record_round(tmp_path, {"eval": {}})
    (tmp_path / "rounds.json").write_text('{"rounds": [{"eval": 1}]}')
    with pytest.raises(ValueError, match="rounds"):
        load_rounds(tmp_path)


def test_reader_reads_only_committed_rows(run_dir):
    # A shard written after the last commit (a crashed run) is not part of the dataset.
    stray = run_dir / "data" / "shard-00099.parquet"
    read_kept(run_dir).write_parquet(stray)
    assert stray not in kept_paths(run_dir)
    assert read_kept(run_dir).height == 26


def test_cli_report(run_dir, capsys, tmp_path):
    import argparse

    from synthloop.outputs import report_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    report_cli.add_parser(sub)
    args = parser.parse_args(["report", str(run_dir)])
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"].endswith("index.html") and out["card"].endswith("README.md")
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.fn(args) == 2
