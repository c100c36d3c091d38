"""Self-improvement rounds end to end: generation on the scripted backend, real LoRA training and
evaluation of a tiny random Llama (tests/conftest.py), every file contract between the phases,
and a loop that crashes in round 1's training and resumes to the same result as a clean loop."""
from __future__ import annotations

import json
import math

import polars as pl
import pytest
from scripted_llm import scripted_factory

from synthloop.core.config import ConfigError
from synthloop.outputs.run_reader import read_kept
from synthloop.engine.rounds import load_rounds_config, run_rounds

CONFIG = """
[run]
name = "loop"
limit = 12
shard_rows = 8
cache = "{cache}"

[llm.generator]
backend = "transformers"
model = "{model}"

[source]
type = "self_instruct"
prompts_per_step = 3

[[stages]]
type = "instances"

[[stages]]
type = "exact_dedup"

[rounds]
count = 2
train_from = "{train_from}"
hard_examples = 3
eval_limit = 3

[train]
max_steps = 2
batch_size = 2
max_length = 128
learning_rate = 5e-3
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
"""


def _config(tmp_path, model, train_from="base"):
    path = tmp_path / f"loop-{train_from}.toml"
    path.write_text(CONFIG.format(cache=tmp_path / "req.sqlite", model=model, train_from=train_from))
    return load_rounds_config(path)


def _factory(specs):
    inner = scripted_factory()

    def factory(spec, cache=None):
        specs.append(spec)
        return inner(spec, cache)
    return factory


def _comparable(entries):
    """What must not depend on being interrupted: everything but wall-clock times."""
    keep = ("loss", "previous_loss", "wins", "losses", "ties", "n", "hard_examples")
    return [{"round": e["round"], "records": e["records"], "final_loss": e["train_metrics"]["final_loss"],
             "eval": {k: e["eval"].get(k) for k in keep}} for e in entries]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("clean")
    specs: list = []
    entries = run_rounds(_config(tmp, tiny_model), tmp / "out", show_progress=False, backend_factory=_factory(specs))
    return tmp / "out", entries, specs


def test_two_rounds_write_every_file_contract(clean):
    out, entries, specs = clean
    assert [e["round"] for e in entries] == [0, 1]
    for e in entries:
        rdir = out / e["run_dir"]
        manifest = json.loads((rdir / "manifest.json").read_text())
        assert manifest["complete"] and e["records"] == read_kept(rdir).height >= 12
        assert (out / e["adapter"] / "adapter_config.json").exists()
        assert e["train_metrics"]["steps"] == 2 and math.isfinite(e["train_metrics"]["final_loss"])
        ev = e["eval"]
        assert math.isfinite(ev["loss"]) and math.isfinite(ev["previous_loss"]) and ev["n_heldout"] == 3
        assert ev["wins"] + ev["losses"] + ev["ties"] + ev["parse_failures"] + ev["judge_errors"] == 3
    r0, r1 = entries
    # Round 0 is judged against the base model, round 1 against round 0's student.
    assert r0["eval"]["previous_adapter"] is None
    assert r1["eval"]["previous_adapter"] == str(out / r0["adapter"])
    # Round 1 generates with round 0's adapter ...
    assert [s.options.get("adapter") for s in specs] == [None, str(out / r0["adapter"])]
    # ... from the original seeds plus round 0's hardest instructions (last round writes none) ...
    seeds = json.loads((out / r0["next_seeds"]).read_text())
    kept0 = set(read_kept(out / "round-00")["instruction"])
    assert r0["eval"]["hard_examples"] == 3 and len(seeds) == 182 + 3
    assert {s["instruction"] for s in seeds[-3:]} <= kept0 and r1["next_seeds"] is None
    # ... and never re-emits a record that round 0 kept.
    ids0, ids1 = set(read_kept(out / "round-00")["id"]), set(read_kept(out / "round-01")["id"])
    assert ids0.isdisjoint(ids1)
    m1 = json.loads((out / "round-01" / "manifest.json").read_text())
    assert m1["config_hash"] != json.loads((out / "round-00" / "manifest.json").read_text())["config_hash"]


def test_hard_examples_are_the_highest_loss_instructions(clean):
    from synthloop.tuner.evaluate import load_student, reference_loss

    out, entries, _ = clean
    kept = read_kept(out / "round-00", columns=["instruction", "input", "response"])
    items = [{"instruction": i, "input": x, "output": y} for i, x, y in kept.iter_rows()]
    model, tok = load_student(str(json.loads((out / "round-00" / "adapter" / "train_metrics.json")
                                             .read_text())["base_path"]), str(out / "round-00" / "adapter"))
    losses = sorted(((reference_loss(model, tok, [it])["loss"], it["instruction"]) for it in items), reverse=True)
    hard = [s["instruction"] for s in json.loads((out / entries[0]["next_seeds"]).read_text())[-3:]]
    assert hard == [inst for _, inst in losses[:3]]


def test_a_complete_loop_is_skipped(clean, tiny_model):
    out, entries, _ = clean
    specs: list = []
    again = run_rounds(_config(out.parent, tiny_model), out, show_progress=False, backend_factory=_factory(specs))
    assert again == entries and specs == []


def test_crash_in_round_one_training_resumes_to_the_clean_result(tmp_path, tiny_model, clean, monkeypatch):
    from synthloop.tuner import sft

    real = sft.train_in_fresh_process

    def dies_in_round_one(cfg, data, out, **kw):
        if "round-01" in str(out):
            raise RuntimeError("killed")       # as a kill would, mid-training
        return real(cfg, data, out, **kw)
    monkeypatch.setattr(sft, "train_in_fresh_process", dies_in_round_one)
    cfg = _config(tmp_path, tiny_model)
    with pytest.raises(RuntimeError, match="killed"):
        run_rounds(cfg, tmp_path / "out", show_progress=False, backend_factory=_factory([]))
    assert [e["round"] for e in json.loads((tmp_path / "out" / "rounds.json").read_text())["rounds"]] == [0]
    assert not (tmp_path / "out" / "round-01" / "adapter").exists()
    monkeypatch.setattr(sft, "train_in_fresh_process", real)

    specs: list = []
    entries = run_rounds(cfg, tmp_path / "out", show_progress=False, backend_factory=_factory(specs))
    # Round 0 is not touched again; round 1's complete generation is reused, not redone.
    assert len(specs) <= 1 and all(s.options.get("adapter") for s in specs)
    assert _comparable(entries) == _comparable(clean[1])
    assert read_kept(tmp_path / "out" / "round-01").equals(read_kept(clean[0] / "round-01"))


def test_train_from_last_continues_the_previous_adapter(tmp_path, tiny_model):
    entries = run_rounds(_config(tmp_path, tiny_model, "last"), tmp_path / "out", show_progress=False,
                         backend_factory=_factory([]))
    meta = json.loads((tmp_path / "out" / "round-01" / "adapter" / "train_metrics.json").read_text())
    assert meta["init_adapter"] == str(tmp_path / "out" / entries[0]["adapter"])


@pytest.mark.parametrize("table, match", [
    ("[rounds]\ncount = 0\n", "count >= 1"),
    ('[rounds]\ntrain_from = "first"\n', "train_from"),
    ("[rounds]\ncounts = 2\n", "unknown key 'counts'"),
    ("[train]\nlora_rank = 8\n", "unknown key 'lora_rank'"),
])
def test_bad_rounds_tables_are_refused(tmp_path, table, match):
    path = tmp_path / "bad.toml"
    path.write_text('[llm.generator]\nbackend = "transformers"\n[source]\ntype = "self_instruct"\n' + table)
    with pytest.raises(ConfigError, match=match):
        load_rounds_config(path)


def test_round_data_frames_share_the_schema(clean):
    out, _, _ = clean
    a, b = read_kept(out / "round-00"), read_kept(out / "round-01")
    assert a.schema == b.schema and set(b["round"]) == {1} and set(a["round"]) == {0}
    assert pl.concat([a, b])["id"].is_unique().all()
