"""LoRA SFT, held-out evaluation and judging.

Most training tests use a tiny random Llama that shares the embedded model's tokenizer and chat
template (fast); the `model` tests train the real embedded model for 2 steps and load the adapter
back with PEFT (and with vLLM's LoRA loader where vllm is installed).
"""
from __future__ import annotations

import json
import math

import pytest

from synthloop.core.llm import BackendSpec
from synthloop.core.llm.base import Completion, Stats, per_request
from synthloop.core.schema import make_batch
from synthloop.outputs.shards import write_parquet_atomic
from synthloop.tuner.evaluate import evaluate, load_student, reference_loss
from synthloop.tuner.heldout import load_heldout, reference_messages
from synthloop.tuner.judge import judge_pairs, parse_verdict
from synthloop.tuner.masking import IGNORE, tokenize_chat
from synthloop.tuner.sft import TrainConfig, load_conversations, load_train_config, shard_files, train

TINY = dict(max_steps=2, batch_size=2, max_length=128, learning_rate=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0)


@pytest.fixture(scope="session")
def shard(tmp_path_factory):
    """The held-out pairs written as one curated shard of our schema."""
    items = load_heldout()
    batch = make_batch([{"instruction": it["instruction"], "input": it["input"], "response": it["output"]}
                        for it in items])
    path = tmp_path_factory.mktemp("data") / "shard-00000.parquet"
    write_parquet_atomic(batch, path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model, shard):
    from safetensors.torch import load_file

    before = load_file(f"{tiny_model}/model.safetensors")
    out = tmp_path_factory.mktemp("tiny-run") / "adapter"
    metrics = train(TrainConfig(base_model=tiny_model, **TINY), shard, out)
    after = load_file(f"{tiny_model}/model.safetensors")
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    return out, metrics


# -- masking ------------------------------------------------------------------------------------
def test_assistant_only_labels(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 more?"},
            {"role": "assistant", "content": "Then 9."}]
    ex = tokenize_chat(tokenizer, msgs)
    assert ex["input_ids"] == tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False),
                                        add_special_tokens=False)["input_ids"]
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tokenizer.decode(trained) == "5<|im_end|>\nThen 9.<|im_end|>\n"   # answers and their stop token
    assert all(lab in (tid, IGNORE) for tid, lab in zip(ex["input_ids"], ex["labels"]))
    # Every token of the system and user turns (and of the assistant headers) is ignored.
    first = ex["labels"].index(next(lab for lab in ex["labels"] if lab != IGNORE))
    assert "Be brief." in tokenizer.decode(ex["input_ids"][:first])
    assert "Add 2 and 3." in tokenizer.decode(ex["input_ids"][:first])
    assert tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    cut = tokenize_chat(tokenizer, msgs, max_length=10)
    assert cut["input_ids"] == ex["input_ids"][:10] and all(lab == IGNORE for lab in cut["labels"])


def test_conversation_starting_with_assistant_is_refused(tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        tokenize_chat(tokenizer, [{"role": "assistant", "content": "hi"}])


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"lora_r": 0}, {"lora_dropout": 1.0}, {"target_modules": []},
                                 {"learning_rate": 0}, {"epochs": 0}, {"batch_size": 0}, {"max_length": 4},
                                 {"dtype": "float16"}])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))}"):
        TrainConfig(**bad)


def test_train_config_is_keyword_only_and_loads_from_toml(tmp_path):
    with pytest.raises(TypeError):
        TrainConfig("embedded")   # type: ignore[misc]
    f = tmp_path / "t.toml"
    f.write_text("[train]\nlora_r = 8\nmax_steps = 10\ntarget_modules = [\"q_proj\", \"v_proj\"]\n")
    cfg = load_train_config(f)
    assert (cfg.lora_r, cfg.max_steps, cfg.target_modules) == (8, 10, ["q_proj", "v_proj"])
    from synthloop.core.config import ConfigError
    f.write_text("[train]\nlora_rank = 8\n")
    with pytest.raises(ConfigError, match="t.toml:2.*unknown key 'lora_rank'"):
        load_train_config(f)
    f.write_text("[train]\nlora_dropout = 2.0\n")
    with pytest.raises(ConfigError, match="lora_dropout"):
        load_train_config(f)


# -- data ---------------------------------------------------------------------------------------
def test_shards_from_a_run_directory(tmp_path):
    from test_report import make_run
    run = make_run(tmp_path / "run")
    files = shard_files(run)
    assert files and all(f.suffix == ".parquet" for f in files)
    convs = load_conversations(run)
    assert len(convs) == 26 and all(c[-1]["role"] == "assistant" for c in convs)
    with pytest.raises(FileNotFoundError):
        shard_files(tmp_path / "nothing-here")


# -- training (tiny model) ----------------------------------------------------------------------
def test_lora_changes_adapter_not_base(tiny_model, tiny_adapter):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, metrics = tiny_adapter
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_metrics.json"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)           # nothing of the base is saved
    # LoRA initialises B to zero: a non-zero B means training moved the adapter.
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(out))
    for name, param in peft.named_parameters():
        if "base_layer" in name:
            orig = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, before[orig]), name
    assert [s["step"] for s in metrics["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in metrics["steps"])
    assert metrics["tokens"] > 0 and metrics["seconds_per_step"] > 0 and metrics["examples"] > 0
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == metrics["steps"]


def test_training_is_seeded(tiny_model, shard, tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    again = train(TrainConfig(base_model=tiny_model, **TINY), shard, tmp_path / "again")
    assert [s["loss"] for s in again["steps"]] == pytest.approx([s["loss"] for s in tiny_adapter[1]["steps"]])
    a, b = load_file(tiny_adapter[0] / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert all(a[k].allclose(b[k]) for k in a)


def test_continue_from_adapter(tiny_model, shard, tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    first, _ = tiny_adapter
    m = train(TrainConfig(base_model=tiny_model, init_adapter=str(first), max_steps=1, batch_size=2,
                          max_length=128, learning_rate=5e-3, lora_r=64), shard, tmp_path / "next")
    assert m["init_adapter"] == str(first) and m["peft"]["r"] == 4          # the adapter's shape is kept
    a, b = load_file(first / "adapter_model.safetensors"), load_file(tmp_path / "next" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not a[k].allclose(b[k]) for k in a)


def test_training_in_a_fresh_process_gives_the_same_adapter(tiny_model, shard, tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    from synthloop.tuner.sft import train_in_fresh_process
    metrics = train_in_fresh_process(TrainConfig(base_model=tiny_model, **TINY), shard, tmp_path / "a")
    assert metrics["final_loss"] == tiny_adapter[1]["final_loss"]
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tiny_adapter[0] / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(RuntimeError, match="failed in its process"):
        train_in_fresh_process(TrainConfig(base_model=tiny_model, **TINY), tmp_path / "no-such-run", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_merged_model_equals_the_adapter_applied_and_is_cached(tiny_model, tiny_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from synthloop.core.models import merged_model
    path = merged_model(tiny_model, str(tiny_adapter[0]), root=tmp_path)
    assert merged_model(tiny_model, str(tiny_adapter[0]), root=tmp_path) == path
    assert [p.name for p in (tmp_path / "merged").iterdir()] == [path.name]      # no temp folder left
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    merged = AutoModelForCausalLM.from_pretrained(path).eval()
    applied, _ = load_student(tiny_model, str(tiny_adapter[0]))
    base, _ = load_student(tiny_model)
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (merged, applied, base))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-5)
    assert (path / "tokenizer_config.json").exists()


def test_killed_training_leaves_no_adapter(tiny_model, shard, tmp_path, monkeypatch):
    import trl

    out = tmp_path / "adapter"
    (tmp_path / ".adapter.tmp-99999").mkdir()          # left by an earlier killed job
    def boom(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(trl.SFTTrainer, "train", boom)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(base_model=tiny_model, **TINY), shard, out)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(FileExistsError):
        train(TrainConfig(base_model=tiny_model, **TINY), shard, out)


# -- evaluation (tiny model) ---------------------------------------------------------------------
class ScriptedJudge:
    """Prefers the answer that contains GOOD; otherwise replies `fallback`."""

    def __init__(self, fallback="Verdict: A"):
        self.name, self.stats, self.fallback, self.prompts = "judge", Stats(), fallback, []

    def generate(self, requests, params):
        out = []
        for req, _ in zip(requests, per_request(params, len(requests))):
            text = req[0]["content"]
            self.prompts.append(text)
            a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            b = text.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
            if "ERR" in a + b:
                out.append(Completion("", "error", error="scripted"))
            elif ("GOOD" in a) != ("GOOD" in b):
                out.append(Completion("Verdict: A" if "GOOD" in a else "Verdict: B", "stop"))
            else:
                out.append(Completion(self.fallback, "stop"))
        return out

    def close(self):
        pass


@pytest.mark.parametrize("text,want", [
    ("Verdict: A", "A"), ("verdict: b", "B"), ("Verdict: tie", "tie"), ("**Verdict:** [[B]]", "B"),
    ("[[A]]", "A"), ("B.", "B"), ("(A)", "A"), ("Answer B", "B"), ("Tie", "tie"), ("Verdict: a tie", "tie"),
    ("Answer B is better.", "B"), ("Response A is clearly better than response B.", "A"), ("B is better", "B"),
    ("Both answers are equally good.", "tie"), ("The winner is B", "B"), ("A looks fine. Verdict: B", "B"),
    ("", None), ("I cannot decide.", None), ("Verdict: C", None), ("This is a better answer than the other", None),
    ("Answer A is better. Answer B is better.", None), ("[[A]] or [[B]]", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_judge_unswaps_positions_and_counts():
    ins = [f"task {i}" for i in range(40)]
    new = [f"GOOD answer {i}" for i in range(40)]
    old = [f"answer {i}" for i in range(40)]
    res = judge_pairs(ScriptedJudge(), ins, new, old, seed=3)
    assert res["win_rate"] == 1.0 and res["wins"] == 40
    assert 10 < res["new_shown_first"] < 30                       # both orders are used
    # A judge that always says "A" gives the new student exactly the pairs where it was shown first.
    res = judge_pairs(ScriptedJudge(), ins, old, [o + "!" for o in old], seed=3)
    assert res["wins"] == res["new_shown_first"] and res["losses"] == 40 - res["new_shown_first"]
    res = judge_pairs(ScriptedJudge("no idea"), ins[:4], ["x", "same", "ERR", "GOOD"], ["y", "same", "z", "w"])
    assert (res["parse_failures"], res["judge_errors"], res["identical"]) == (1, 1, 1)
    assert (res["wins"], res["ties"], res["win_rate"]) == (1, 1, 0.75)   # ties count half; failures left out


def test_reference_loss_matches_hf_loss(tiny_model, tokenizer):
    import torch

    model, tok = load_student(tiny_model)
    items = load_heldout()[:5]
    res = reference_loss(model, tok, items, batch_size=2)
    total = count = 0
    for it in items:
        ex = tokenize_chat(tok, reference_messages(it))
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss.item()
        n = int((labels[:, 1:] != IGNORE).sum())
        total, count = total + loss * n, count + n
    assert res["tokens"] == count and res["loss"] == pytest.approx(total / count, rel=1e-4)


def test_evaluate_end_to_end_through_the_llm_seam(tiny_model, tiny_adapter, monkeypatch):
    from synthloop.tuner import evaluate as ev

    opened = []
    real_open = ev.open_llm

    def spy(spec, **kw):
        opened.append(spec)
        return real_open(spec, **kw)
    monkeypatch.setattr(ev, "open_llm", spy)
    judge = BackendSpec(backend="transformers", model=tiny_model)
    res = evaluate(base_model=tiny_model, adapter=str(tiny_adapter[0]), heldout=load_heldout()[:4], judge=judge,
                   answer_params={"temperature": 0, "max_tokens": 6}, judge_params={"temperature": 0, "max_tokens": 4})
    assert [s.options.get("adapter") for s in opened[:2]] == [str(tiny_adapter[0]), None]
    assert math.isfinite(res["loss"]) and math.isfinite(res["previous_loss"])
    assert res["wins"] + res["losses"] + res["ties"] + res["parse_failures"] + res["judge_errors"] == 4
    assert res["n"] == 4


# -- the real embedded model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_adapter(tmp_path_factory):
    """2 LoRA steps on the embedded model over two held-out pairs (their own references)."""
    items = sorted(load_heldout(), key=lambda it: len(it["instruction"] + it["input"] + it["output"]))[:2]
    frame = make_batch([{"instruction": it["instruction"], "input": it["input"], "response": it["output"]}
                        for it in items])
    out = tmp_path_factory.mktemp("real") / "adapter"
    metrics = train(TrainConfig(max_steps=2, batch_size=2, max_length=128, learning_rate=2e-3, lora_r=8,
                                lora_alpha=16, lora_dropout=0.0), frame, out)
    return out, metrics, items


@pytest.mark.model
def test_real_model_adapter_loads_with_peft_and_fits_its_references(real_adapter, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthloop.core.models import prepare_embedded
    out, metrics, items = real_adapter
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"}
    assert len(metrics["steps"]) == 2 and all(math.isfinite(s["loss"]) for s in metrics["steps"])
    base = AutoModelForCausalLM.from_pretrained(prepare_embedded(), dtype=torch.float32).eval()
    before = reference_loss(base, tokenizer, items)["loss"]
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    # A real property: an adapter trained on these references makes them more likely.
    after = reference_loss(model.merge_and_unload().eval(), tokenizer, items)["loss"]
    assert math.isfinite(before) and after < before


@pytest.mark.model
@pytest.mark.vllm
def test_real_model_adapter_loads_with_vllm_lora_loader(real_adapter):
    pytest.importorskip("vllm")
    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    out = str(real_adapter[0])
    helper = PEFTHelper.from_local_dir(out, 2048)
    helper.validate_legal(LoRAConfig(max_lora_rank=64))          # the vllm backend's max_lora_rank
    lora = LoRAModel.from_local_checkpoint(out, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}, helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float32)
    assert len(lora.loras) == 30 * 7                               # 30 layers x 7 projections


# -- the held-out set ---------------------------------------------------------------------------
def test_heldout_set_is_ours_and_novel():
    from rouge_score import rouge_scorer

    from synthloop.seeds.loaders import load_seeds
    from synthloop.tuner.heldout import bundled_heldout
    items = load_heldout()
    assert len(items) >= 40 and bundled_heldout().read_bytes().isascii()
    assert all(len(it["output"].split()) <= 120 for it in items)
    assert sum(bool(it["input"]) for it in items) >= 10                 # rewriting, summaries, classification
    assert len({it["instruction"] for it in items}) == len(items)
    seeds = load_seeds().records["instruction"].unique().to_list()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    worst = max(scorer.score(s, it["instruction"])["rougeL"].fmeasure for it in items for s in seeds)
    assert worst < 0.7


def test_heldout_errors_name_the_line(tmp_path):
    f = tmp_path / "h.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"h.jsonl:2: 'output'"):
        load_heldout(f)
    f.write_text('{"instruction": "a", "output": "b", "answer": "x"}\n')
    with pytest.raises(ValueError, match="h.jsonl:1: unknown fields"):
        load_heldout(f)


def test_cli_train_and_eval(tiny_model, shard, tmp_path, capsys):
    import argparse

    from synthloop.tuner import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "adapter"
    args = parser.parse_args(["train", str(shard), "--out", str(out), "--base-model", tiny_model, "--max-steps", "1",
                              "--batch-size", "2", "--max-length", "64", "--lora-r", "4"])
    assert args.fn(args) == 0
    io = capsys.readouterr()
    assert json.loads(io.out)["steps"] == 1 and "step 1/1 loss" in io.err   # stdout holds only the result
    assert args.fn(args) == 2                                    # exists: refuses without --overwrite
    args = parser.parse_args(["train", str(shard), "--out", str(tmp_path / "x"), "--lora-r", "0"])
    assert args.fn(args) == 2 and "lora_r" in capsys.readouterr().err
    args = parser.parse_args(["eval", "--base-model", tiny_model, "--adapter", str(out), "--limit", "2"])
    assert args.fn(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_heldout"] == 2 and math.isfinite(res["loss"]) and res["win_rate"] is None
