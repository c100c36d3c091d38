"""Tuning strategies ([train] peft = lora | ia3 | prefix | none) on the tiny random Llama: each trains
exactly the parameters it should and nothing else, DPO's reference is the student it starts from,
and evaluation and the transformers backend load every kind of result."""
from __future__ import annotations

import json
import math
import re

import polars as pl
import pytest
from test_tuner import TINY, shard  # noqa: F401  (shard: the curated shard fixture)

from synthloop.core.models import merged_model, student_kind
from synthloop.tuner.evaluate import load_student, reference_loss
from synthloop.tuner.heldout import load_heldout
from synthloop.tuner.sft import TrainConfig, train

STRATEGIES = ("lora", "ia3", "prefix", "none")
#: The parameters each strategy may change; "none" must change every one.
TRAINED = {"lora": r"\.lora_[AB]\.default\.weight$", "ia3": r"\.ia3_l\.default$",
           "prefix": r"^prompt_encoder\.default\.", "none": r""}
KIND = {"lora": "lora", "ia3": "ia3", "prefix": "prefix", "none": "full"}


class Snapshots:
    """Every parameter of the model a trainer trains, before and after `train` (SFT and DPO alike)."""

    def __init__(self, mp):
        import trl
        self.runs: list[tuple[dict, dict]] = []
        for cls in (trl.SFTTrainer, trl.DPOTrainer):
            mp.setattr(cls, "train", self._wrap(cls.train))

    def _wrap(self, real):
        def train(trainer, *a, **k):
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            out = real(trainer, *a, **k)
            self.runs.append((before, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
            return out
        return train


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {n for n in before if not before[n].equal(after[n])}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"Maybe {2 * i + 1}, I am not sure."}]} for i in range(6)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, shard):
    """SFT (2 steps) with every strategy: {peft: (folder, metrics, parameters before, after)}."""
    from safetensors.torch import load_file

    base_before = load_file(f"{tiny_model}/model.safetensors")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        snaps = Snapshots(mp)
        for peft in STRATEGIES:
            folder = tmp_path_factory.mktemp(f"sft-{peft}") / "adapter"
            metrics = train(TrainConfig(base_model=tiny_model, peft=peft, prefix_tokens=4, **TINY), shard, folder)
            out[peft] = (folder, metrics, *snaps.runs[-1])
    base_after = load_file(f"{tiny_model}/model.safetensors")
    assert all(base_before[k].equal(base_after[k]) for k in base_before)    # the base folder is never written
    return out


@pytest.mark.parametrize("peft", STRATEGIES)
def test_weights_change_where_they_should_and_nowhere_else(trained, peft):
    folder, metrics, before, after = trained[peft]
    changed = _changed(before, after)
    allowed = {n for n in before if re.search(TRAINED[peft], n)}
    assert changed and changed == allowed, (sorted(changed - allowed)[:3], sorted(allowed - changed)[:3])
    assert metrics["peft"]["type"] == peft
    assert student_kind(folder) == KIND[peft]
    if peft == "none":     # a complete model folder: every weight trained, saved with tokenizer and generation config
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= \
            {p.name for p in folder.iterdir()}
        assert metrics["peft"]["trainable_parameters"] == sum(t.numel() for t in after.values())
    else:                  # the adapter file holds exactly the trained tensors
        from safetensors.torch import load_file
        saved = load_file(folder / "adapter_model.safetensors")
        assert len(saved) == len(changed) and metrics["peft"]["trainable_parameters"] == \
            sum(t.numel() for t in saved.values())


def test_evaluation_loads_every_kind_and_it_is_the_trained_student(trained, tiny_model):
    """load_student applies each result (merged, prefix applied, or the full folder): the held-out
    loss moves away from the base model's, and a LoRA/IA3 merge equals the adapter applied."""
    items = load_heldout()[:3]
    base = reference_loss(*load_student(tiny_model), items)["loss"]
    for peft, (folder, *_rest) in trained.items():
        loss = reference_loss(*load_student(tiny_model, str(folder)), items)["loss"]
        assert math.isfinite(loss) and loss != pytest.approx(base, abs=1e-6), peft


def test_ia3_merge_equals_the_adapter_applied_and_prefix_cannot_merge(trained, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 17, 230, 5, 9]])
    folder = str(trained["ia3"][0])
    applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_model(tiny_model, folder, root=tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(applied(ids).logits, merged(ids).logits, atol=1e-5)
    for peft in ("prefix", "none"):
        with pytest.raises(ValueError, match="nothing to merge"):
            merged_model(tiny_model, str(trained[peft][0]), root=tmp_path)


def test_transformers_backend_answers_with_every_kind(trained, tiny_model):
    """The generator's backend runs exactly the student evaluation scores (same logits as
    load_student's model, different from the base's) and answers through it."""
    import torch

    from synthloop.core.llm.transformers_backend import TransformersLLM

    ids = torch.tensor([[1, 17, 230, 5, 9]])
    base = TransformersLLM(tiny_model, batch_size=1)
    with torch.no_grad():
        base_logits = base.model(ids).logits
    for peft, (folder, *_rest) in trained.items():
        llm = TransformersLLM(tiny_model, adapter=str(folder), batch_size=1)
        assert "@" in llm.name and "@" not in base.name       # a student's name carries its content hash
        evaluated, _ = load_student(tiny_model, str(folder))
        with torch.no_grad():
            logits = llm.model(ids).logits
            assert torch.allclose(logits, evaluated(ids).logits, atol=1e-5), peft
        assert not torch.allclose(logits, base_logits, atol=1e-6), peft
        (c,) = llm.generate([[{"role": "user", "content": "Say something."}]], {"max_tokens": 4, "temperature": 0})
        assert c.ok and c.completion_tokens >= 1, peft


def test_dpo_reference_is_the_student_it_starts_from(trained, tiny_model, pairs, tmp_path):
    """DPO continuing each SFT result: the reference scores like the policy at the start, so the first
    step's sigmoid loss is exactly log 2 (IA3 and full fine-tune need our own reference model; prefix
    needs a trainable reload), and only the strategy's parameters move."""
    with pytest.MonkeyPatch.context() as mp:
        snaps = Snapshots(mp)
        for peft in STRATEGIES:
            start = str(trained[peft][0])
            m = train(TrainConfig(base_model=tiny_model, peft=peft, method="dpo", init_adapter=start,
                                  **{**TINY, "max_length": 64}), pairs, tmp_path / peft)
            assert m["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6), peft
            before, after = snaps.runs[-1]
            changed = _changed(before, after)
            assert changed and all(re.search(TRAINED[peft], n) for n in changed), peft
            assert student_kind(tmp_path / peft) == KIND[peft]


def test_strategy_settings_are_checked(tiny_model, tmp_path, shard):
    with pytest.raises(ValueError, match="peft must be lora, ia3, prefix or none"):
        TrainConfig(peft="qlora")
    with pytest.raises(ValueError, match="gradient_checkpointing cannot be used with peft = \"prefix\""):
        TrainConfig(peft="prefix", gradient_checkpointing=True)
    with pytest.raises(ValueError, match="prefix_tokens must be an int >= 1"):
        TrainConfig(peft="prefix", prefix_tokens=0)
    with pytest.raises(ValueError, match="is a full model folder, but peft = \"lora\""):
        train(TrainConfig(base_model=tiny_model, init_adapter=tiny_model, **TINY), shard, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_vllm_backend_loads_each_kind_and_refuses_prefix(trained, tiny_model, monkeypatch, tmp_path):
    """What the vllm engine is started on for each kind (a stand-in engine: the routing is ours): a
    LoRA adapter merged or as a LoRARequest, IA3 always merged, a full fine-tune as the model itself;
    prefix tuning is refused before any engine starts."""
    pytest.importorskip("vllm")
    from test_backends import _FakeAsyncLLM

    from synthloop.core.llm import vllm_backend

    seen = []

    async def start(args):
        seen.append(args)
        return _FakeAsyncLLM()
    monkeypatch.setattr(vllm_backend, "_start", start)
    monkeypatch.setenv("SYNTHLOOP_CACHE", str(tmp_path))          # merged copies go here

    def open_(peft, **options):
        llm = vllm_backend.VLLMLLM(tiny_model, adapter=str(trained[peft][0]), **options)
        llm.close()
        return seen[-1], llm

    args, llm = open_("lora", adapter_mode="lora")
    assert args.model == tiny_model and args.enable_lora and llm.adapter == str(trained["lora"][0])
    for peft in ("lora", "ia3"):
        args, llm = open_(peft, adapter_mode="merge" if peft == "lora" else "auto")
        assert args.model == str(merged_model(tiny_model, str(trained[peft][0]))) and llm.adapter is None
    args, llm = open_("none")
    assert args.model == str(trained["none"][0]) and llm.adapter is None
    started = len(seen)
    with pytest.raises(ValueError, match="IA3 adapter; LoRARequest takes LoRA only"):
        open_("ia3", adapter_mode="lora")
    with pytest.raises(ValueError, match="prefix-tuning adapter; vLLM cannot apply one"):
        open_("prefix")
    assert len(seen) == started


def test_rounds_refuse_prefix_with_a_vllm_generator(tmp_path):
    from test_rounds import CONFIG

    from synthloop.core.config import ConfigError
    from synthloop.engine.rounds import load_rounds_config

    text = CONFIG.format(cache="off", model="embedded", train_from="base").replace(
        'backend = "transformers"', 'backend = "vllm"') + 'peft = "prefix"\n'
    path = tmp_path / "loop.toml"
    path.write_text(text)
    line = text.splitlines().index('peft = "prefix"') + 1
    with pytest.raises(ConfigError, match=f"loop.toml:{line}: .train. peft = \"prefix\" needs .llm.generator. "
                                          f"backend = \"transformers\""):
        load_rounds_config(path)


def test_rounds_loop_with_a_full_fine_tune(tmp_path, tiny_model):
    """Two rounds with peft = "none", round 1 continuing round 0's model: each round's `adapter/` is
    a complete model folder, round 1 generates with it, and evaluation scores it."""
    from test_rounds import CONFIG, _factory

    from synthloop.engine.rounds import load_rounds_config, run_rounds

    path = tmp_path / "loop.toml"
    text = CONFIG.format(cache=tmp_path / "req.sqlite", model=tiny_model, train_from="last")
    path.write_text(text.replace("hard_examples = 3", "hard_examples = 0\nwin_rate = false") + 'peft = "none"\n')
    specs: list = []
    entries = run_rounds(load_rounds_config(path), tmp_path / "out", show_progress=False, backend_factory=_factory(specs))
    assert [e["round"] for e in entries] == [0, 1]
    for e in entries:
        folder = tmp_path / "out" / e["adapter"]
        assert student_kind(folder) == "full" and (folder / "model.safetensors").exists()
        assert math.isfinite(e["eval"]["loss"]) and e["eval"]["loss"] != e["eval"]["previous_loss"]
    round1 = json.loads((tmp_path / "out" / entries[1]["adapter"] / "train_metrics.json").read_text())
    assert round1["init_adapter"] == str(tmp_path / "out" / entries[0]["adapter"])
    assert any(s.options.get("adapter") == str(tmp_path / "out" / entries[0]["adapter"]) for s in specs)
