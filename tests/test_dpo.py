"""Preference training: pair files, DPO with LoRA, and SFT followed by DPO, on the tiny random Llama."""
from __future__ import annotations

import json
import math

import polars as pl
import pytest

from synthloop.tuner.dpo import load_pairs, pair_files, train_dpo
from synthloop.tuner.sft import TrainConfig, load_train_config, summarize, train

TINY = dict(max_steps=2, batch_size=2, max_length=64, learning_rate=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0)
REWARD_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}


def write_pairs(path, n=8, *, start=0):
    """n short pairs in the exporter's format (conversational columns plus extra ones to be ignored)."""
    rows = [{"id": f"p{i}",
             "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"Maybe {2 * i + 1}, I am not sure."}],
             "chosen_verified": True, "rejected_verified": False}
            for i in range(start, start + n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A committed run directory (26 curated conversations) with 8 preference pairs."""
    from test_report import make_run
    path = make_run(tmp_path_factory.mktemp("dpo") / "run")
    write_pairs(path / "pairs" / "pairs-00000.parquet")
    return path


class Spy:
    """Keeps every trainer that DPOTrainer.train runs, to look at how it set up the reference."""

    def __init__(self, mp):
        import trl
        self.trainers, real = [], trl.DPOTrainer.train

        def train(trainer, *a, **k):
            self.trainers.append(trainer)
            return real(trainer, *a, **k)
        mp.setattr(trl.DPOTrainer, "train", train)


@pytest.fixture(scope="module")
def dpo_adapter(tmp_path_factory, tiny_model, run):
    from safetensors.torch import load_file

    before = load_file(f"{tiny_model}/model.safetensors")
    out = tmp_path_factory.mktemp("dpo-run") / "adapter"
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        metrics = train_dpo(TrainConfig(base_model=tiny_model, **TINY), run, out)
    after = load_file(f"{tiny_model}/model.safetensors")
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    return out, metrics, spy.trainers[0]


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"method": "ppo"}, {"beta": 0}, {"beta": -0.1}, {"dpo_learning_rate": -1e-5},
                                 {"dpo_max_steps": -1}, {"dpo_loss": "kto"}])
def test_train_config_rejects_bad_dpo_values(bad):
    with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))}"):
        TrainConfig(**bad)


def test_dpo_fields_load_from_toml(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[train]\nmethod = "sft+dpo"\nbeta = 1\ndpo_learning_rate = 5e-6\ndpo_max_steps = 3\n'
                 'dpo_loss = "ipo"\n')
    cfg = load_train_config(f)
    assert (cfg.method, cfg.beta, cfg.dpo_learning_rate, cfg.dpo_max_steps, cfg.dpo_loss) == \
        ("sft+dpo", 1.0, 5e-6, 3, "ipo")
    assert TrainConfig().method == "sft"


# -- data ---------------------------------------------------------------------------------------
def test_pair_files_resolve_runs_rounds_folders_and_files(tmp_path, run):
    from test_report import make_run

    own = run / "pairs" / "pairs-00000.parquet"
    assert pair_files(run) == [own] and pair_files(own) == [own] and pair_files(run / "pairs") == [own]
    loop = tmp_path / "loop"
    make_run(loop / "round-00", rnd=0)                      # a round without pairs
    make_run(loop / "round-01", rnd=1)
    second = write_pairs(loop / "round-01" / "pairs" / "pairs-00000.parquet", start=8)
    assert pair_files(loop) == [second] and pair_files([run, loop]) == [own, second]
    with pytest.raises(FileNotFoundError, match="round-00: no preference pairs"):
        pair_files(loop / "round-00")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        pair_files(tmp_path / "no-such-thing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no preference pairs"):
        pair_files(tmp_path / "empty")


def test_load_pairs_keeps_the_three_columns_and_skips_useless_pairs(tmp_path, run):
    pairs, skipped = load_pairs(run)
    assert len(pairs) == 8 and skipped == {"incomplete": 0, "identical": 0}
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 0 plus 0?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "0."}]
    rows = pl.read_parquet(run / "pairs" / "pairs-00000.parquet").head(3).to_dicts()
    rows[0]["rejected"] = rows[0]["chosen"]                  # identical answers
    rows[2]["rejected"] = [{"role": "assistant", "content": ""}]
    frame = pl.DataFrame(rows)
    pairs, skipped = load_pairs(frame)
    assert len(pairs) == 1 and skipped == {"incomplete": 1, "identical": 1}
    frame.drop("rejected").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: not preference pairs, no column.s. rejected"):
        load_pairs(tmp_path / "bad.parquet")


def test_chat_template_renders_prompts_as_a_prefix_of_prompt_and_answer(tokenizer):
    """What TRL's conversational DPO needs: the completion starts right after the rendered prompt."""
    from trl.data_utils import common_prefix_length

    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    for answer in ("4.", "Maybe 5, I am not sure."):
        p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                             return_dict=True)
        p, full = p["input_ids"], full["input_ids"]
        assert common_prefix_length(p, full) == len(p)
        assert tokenizer.decode(full[len(p):]) == answer + "<|im_end|>\n"     # as our SFT labels train


# -- training (tiny model) ----------------------------------------------------------------------
def test_dpo_changes_adapter_not_base(tiny_model, dpo_adapter):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, metrics, trainer = dpo_adapter
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_metrics.json"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)     # B starts at zero
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(out))
    for name, param in peft.named_parameters():
        if "base_layer" in name:
            orig = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, before[orig]), name
    # No second model: the reference is the policy with its (new) adapter disabled.
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]


def test_dpo_metrics(dpo_adapter):
    out, metrics, _ = dpo_adapter
    assert metrics["method"] == "dpo" and metrics["pairs"] == 8 and metrics["optimizer_steps"] == 2
    assert metrics["skipped"] == {"incomplete": 0, "identical": 0, "prompt_fills_max_length": 0}
    assert [s["step"] for s in metrics["steps"]] == [1, 2]
    assert all(REWARD_KEYS <= set(s) and math.isfinite(s["loss"]) for s in metrics["steps"])
    first, second = metrics["steps"]
    # Step 1 scores the untouched policy: equal to the base-model reference, so the loss is log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert second["rewards/margins"] != 0
    assert metrics["tokens"] > 0 and metrics["pair_tokens"] > 0 and metrics["seconds_per_step"] > 0
    assert metrics["config"]["beta"] == 0.1 and metrics["peft"]["r"] == 4
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == metrics["steps"]
    assert summarize(metrics) == {"method": "dpo", "steps": 2, "final_loss": second["loss"],
                                  "seconds": metrics["train_seconds"], "tokens": metrics["tokens"]}


def test_sft_then_dpo_makes_one_adapter_with_both_phases(tiny_model, run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        metrics = train(TrainConfig(base_model=tiny_model, method="sft+dpo", dpo_max_steps=1, **TINY), run, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_metrics.json"]
    assert list(tmp_path.iterdir()) == [out]                                   # no phase or temp folder left
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))
    sft, dpo = metrics["sft"], metrics["dpo"]
    assert [s["step"] for s in sft["steps"]] == [1, 2] and [s["step"] for s in dpo["steps"]] == [1]
    assert sft["method"] == "sft" and sft["examples"] == 26 and dpo["pairs"] == 8 and REWARD_KEYS <= set(dpo["steps"][0])
    # DPO continued the SFT adapter, and its reference is that adapter (a frozen LoRA copy), not the base.
    trainer = spy.trainers[0]
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    assert dpo["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo["init_adapter"] == "sft phase" and metrics["init_adapter"] is None
    assert summarize(metrics) == {"method": "sft+dpo", "steps": 3, "final_loss": dpo["final_loss"],
                                  "seconds": metrics["train_seconds"], "tokens": sft["tokens"] + dpo["tokens"]}
    assert json.loads((out / "train_metrics.json").read_text())["dpo"]["steps"] == dpo["steps"]


def test_dpo_without_pairs_leaves_nothing(tiny_model, tmp_path):
    from test_report import make_run

    src = make_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no preference pairs"):
        train(TrainConfig(base_model=tiny_model, method="dpo", **TINY), src, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_dpo_in_a_fresh_process(tiny_model, run, dpo_adapter, tmp_path):
    from synthloop.tuner.sft import train_in_fresh_process

    metrics = train_in_fresh_process(TrainConfig(base_model=tiny_model, method="dpo", **TINY), run, tmp_path / "a")
    assert metrics["method"] == "dpo" and metrics["final_loss"] == dpo_adapter[1]["final_loss"]


def test_cli_train_dpo(tiny_model, run, tmp_path, capsys):
    import argparse

    from synthloop.tuner import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "adapter"
    args = parser.parse_args(["train", str(run), "--out", str(out), "--base-model", tiny_model, "--method", "dpo",
                              "--beta", "0.2", "--max-steps", "1", "--batch-size", "2", "--max-length", "64",
                              "--lora-r", "4"])
    assert args.fn(args) == 0
    io = capsys.readouterr()
    res = json.loads(io.out)                                     # stdout holds only the result
    assert res["method"] == "dpo" and res["steps"] == 1 and "step 1/1 loss" in io.err and " margin " in io.err
    assert json.loads((out / "train_metrics.json").read_text())["config"]["beta"] == 0.2
    args = parser.parse_args(["train", str(run), "--out", str(tmp_path / "x"), "--method", "ppo"])
    assert args.fn(args) == 2 and "TrainConfig.method" in capsys.readouterr().err
