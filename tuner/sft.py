"""SFT of the student on curated shards: TRL's SFTTrainer on labels we build ourselves.

What trains is `TrainConfig.peft`: a LoRA adapter (default), IA3 vectors, a prefix (prefix
tuning), each through PEFT's config, or every weight (``none``: a full fine-tune that writes a
complete model folder). `core.models.student_kind` tells the results apart wherever they are loaded.

Why TRL, and why our own labels: we tried TRL 1.16's ``assistant_only_loss=True`` first. It needs
a chat template with ``{% generation %}`` markers; SmolLM2's has none and TRL ships no patched
training template for it (``get_training_chat_template`` raises "patching is not supported for
this template"). So `tuner/masking.py` locates the assistant turns itself and we hand SFTTrainer
a tokenized dataset (``input_ids`` + ``labels``, -100 outside assistant turns) with dataset
preparation skipped. TRL still does what is worth not rewriting: the LoRA wrap, padding,
token-weighted loss across gradient accumulation (``num_items_in_batch``), its chunked LM head
(no full logits in memory), schedulers, bf16/multi-GPU through accelerate, and per-step logs.
A home-made loop would have been no shorter once those are counted.

Output is written atomically: training happens in ``.<name>.tmp-<pid>/`` next to the target and
is renamed into place when complete, so a killed job leaves no half adapter. The folder holds
``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT; vLLM's ``LoRARequest`` reads the
same two files) and ``train_metrics.json``.

``TrainConfig.method`` picks SFT (here), DPO on preference pairs (`tuner/dpo.py`) or SFT then DPO;
`train` is the one entry for all three and `train_in_fresh_process` runs it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import polars as pl

from synthloop.core.models import resolve_model, student_kind
from synthloop.outputs.run_reader import kept_paths, round_dirs
from synthloop.tuner.masking import IGNORE, tokenize_chat

#: Every linear layer of a Llama-style block: LoRA on all of them learns most per parameter
#: (QLoRA paper), and vLLM's LoRA kernels support each of them.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS_FILE = "train_metrics.json"
METHODS = ("sft", "dpo", "sft+dpo")
#: Tuning strategies: which parameters train. "none" is a full fine-tune of every weight.
PEFTS = ("lora", "ia3", "prefix", "none")
#: TRL 1.16's DPO loss types that need no knob we do not expose (exo_pair needs label_smoothing > 0).
DPO_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop")


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how. Validated on construction; a TOML ``[train]`` table maps onto it.

    >>> TrainConfig(lora_r=8, max_steps=100, learning_rate=1e-4).batch_size
    4
    """

    base_model: str = "embedded"          # `embedded` or a local HF folder
    init_adapter: str | None = None       # continue training this adapter / model folder (its shape is kept)
    peft: str = "lora"                    # lora | ia3 | prefix (prefix tuning) | none (full fine-tune)
    prefix_tokens: int = 16               # prefix tuning: virtual tokens per layer
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = 0                    # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4                   # sequences per device per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    max_length: int = 512                 # tokens per sequence; longer ones are cut at the end
    warmup_steps: int = 0
    lr_scheduler: str = "linear"          # any transformers scheduler name
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "auto"                   # auto (fp32 on CPU, bf16 on a GPU that has it) | float32 | bfloat16
    gradient_checkpointing: bool = False  # trades ~30% speed for memory; off for small models
    method: str = "sft"                   # sft | dpo (preference pairs) | sft+dpo (SFT, then DPO from that adapter)
    beta: float = 0.1                     # DPO temperature: higher keeps the student closer to its reference
    dpo_learning_rate: float = 0.0        # 0: use learning_rate
    dpo_max_steps: int = 0                # 0: use max_steps (and epochs when that is 0 too)
    dpo_loss: str = "sigmoid"             # TRL's DPOConfig.loss_type: sigmoid (DPO), ipo, hinge, robust, ...
    replay: list[str] = field(default_factory=list)   # seed files ("bundled" = ours) whose worked answers
                                          # join the SFT data: human-written text keeps the student's style
    replay_max: int = 0                   # > 0: a seeded sample of at most this many replayed answers

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name} {rule}, got {getattr(self, name)!r}")

        need(self.peft in PEFTS, "peft", "must be " + ", ".join(PEFTS[:-1]) + " or " + PEFTS[-1])
        need(isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 1, "prefix_tokens", "must be an int >= 1")
        need(not (self.peft == "prefix" and self.gradient_checkpointing), "gradient_checkpointing",
             "cannot be used with peft = \"prefix\" (checkpointing turns the attention cache off, the "
             "prefix lives there, and attention then fails on a mask longer than its keys)")
        need(isinstance(self.lora_r, int) and self.lora_r >= 1, "lora_r", "must be an int >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(isinstance(self.target_modules, list) and bool(self.target_modules)
             and all(isinstance(m, str) and m for m in self.target_modules),
             "target_modules", "must be a non-empty list of module names")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 unless max_steps is set")
        need(isinstance(self.max_steps, int) and self.max_steps >= 0, "max_steps", "must be an int >= 0")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an int >= 1")
        need(isinstance(self.grad_accum, int) and self.grad_accum >= 1, "grad_accum", "must be an int >= 1")
        need(isinstance(self.max_length, int) and self.max_length >= 16, "max_length", "must be an int >= 16")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16")
        need(self.method in METHODS, "method", "must be " + ", ".join(METHODS[:-1]) + " or " + METHODS[-1])
        need(self.beta > 0, "beta", "must be > 0")
        need(self.dpo_learning_rate >= 0, "dpo_learning_rate", "must be >= 0 (0: use learning_rate)")
        need(isinstance(self.dpo_max_steps, int) and self.dpo_max_steps >= 0, "dpo_max_steps",
             "must be an int >= 0 (0: use max_steps)")
        need(self.dpo_loss in DPO_LOSSES, "dpo_loss", "must be one of " + ", ".join(DPO_LOSSES))
        need(isinstance(self.replay, list) and all(isinstance(p, str) and p for p in self.replay),
             "replay", "must be a list of seed files (or \"bundled\")")
        need(isinstance(self.replay_max, int) and self.replay_max >= 0, "replay_max", "must be an int >= 0")


def load_train_config(path: str | Path, *, table: str = "train") -> TrainConfig:
    """Read a TOML file's ``[train]`` table into a TrainConfig (unknown keys and wrong types named)."""
    import tomllib

    from synthloop.core.config import ConfigError, from_dict

    text = Path(path).read_text()
    try:
        raw = tomllib.loads(text).get(table, {})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return from_dict(TrainConfig, raw, path=str(path), text=text, table=table)
    except ConfigError:
        raise
    except ValueError as e:   # TrainConfig's own range checks
        raise ConfigError(f"{path}: [{table}] {e}") from None


# -- data ---------------------------------------------------------------------------------------
def shard_files(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Parquet files behind `sources`: run directories (committed shards only), rounds directories
    (every round), folders of Parquet files, or Parquet files.

    >>> shard_files("runs/quickstart")       # doctest: +SKIP
    [PosixPath('runs/quickstart/data/shard-00000.parquet')]
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[Path] = []
    for item in map(Path, items):
        if (item / "manifest.json").exists():
            files += kept_paths(item)
        elif item.is_dir() and round_dirs(item):
            files += [f for _, d in round_dirs(item) for f in kept_paths(d)]
        elif item.is_dir():
            files += sorted(item.rglob("*.parquet"))
        elif item.suffix == ".parquet" and item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: not a run directory, a folder of Parquet shards or a .parquet file")
    return files


def load_conversations(sources: str | Path | Sequence[str | Path] | pl.DataFrame) -> list[list[dict]]:
    """The `messages` column of curated shards (or of a frame), as plain lists of dicts."""
    if isinstance(sources, pl.DataFrame):
        frame = sources.select("messages")
    else:
        files = shard_files(sources)
        if not files:
            raise ValueError(f"no Parquet shards found in {sources}")
        frame = pl.concat([pl.read_parquet(f, columns=["messages"]) for f in files], how="vertical")
    return [list(m) for m in frame["messages"].to_list() if m]


def replay_conversations(seed_files: Sequence[str], *, limit: int = 0, seed: int = 0) -> list[list[dict]]:
    """The worked answers of seed files (``"bundled"``: our seed set) as conversations; with a
    `limit`, a sample of that many drawn with `seed` (kept in file order).

    >>> len(replay_conversations(["bundled"])) >= 150, len(replay_conversations(["bundled"], limit=5))
    (True, 5)
    """
    import random

    from synthloop.seeds.loaders import load_seeds

    out = []
    for path in seed_files:
        records = load_seeds(path).records.filter(pl.col("response").str.strip_chars() != "")
        out += [list(m) for m in records["messages"].to_list()]
    if 0 < limit < len(out):
        keep = sorted(random.Random(seed).sample(range(len(out)), limit))
        out = [out[i] for i in keep]
    return out


def build_examples(tokenizer, conversations: Iterable[Sequence[dict]], *, max_length: int) -> tuple[list[dict], dict]:
    """Tokenize conversations with assistant-only labels; returns (examples, counts of what was skipped)."""
    examples, skipped = [], {"no_assistant_turn": 0, "prompt_fills_max_length": 0}
    for msgs in conversations:
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            skipped["no_assistant_turn"] += 1
            continue
        ex = tokenize_chat(tokenizer, msgs, max_length=max_length)
        if all(lab == IGNORE for lab in ex["labels"]):
            skipped["prompt_fills_max_length"] += 1   # nothing left to learn from after truncation
            continue
        examples.append(ex)
    return examples, skipped


# -- training -----------------------------------------------------------------------------------
def _dtype(cfg: TrainConfig, on_cuda: bool):
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished `tmp` folder to `out`, replacing an older `out` (rename is the commit)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh ``.<name>.tmp-<pid>/`` beside `out` to fill; it becomes `out` when the block ends cleanly.

    Refuses an existing `out` without `overwrite` before anything is done; removes leftovers of
    killed jobs into the same target, and the temp folder when the block raises.

    >>> with atomic_dir("runs/quickstart/adapter") as tmp:      # doctest: +SKIP
    ...     (tmp / "adapter_config.json").write_text("{}")
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed trainings into the same target are garbage by construction.
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(cfg: TrainConfig, data, out: str | Path, *, overwrite: bool = False) -> dict:
    """Train `cfg.base_model` on `data` the way `cfg.method` and `cfg.peft` say; write the adapter (or,
    for ``peft = "none"``, the model folder) to `out`.

    `data` are sources as `shard_files` reads them (or a frame). ``sft`` trains on their curated
    shards (`messages`); ``dpo`` on their preference pairs (`tuner.dpo.pair_files`; a frame needs
    `prompt`, `chosen`, `rejected`); ``sft+dpo`` runs SFT, then DPO continuing that adapter, whose
    start is also DPO's reference. The SFT phase's own adapter is discarded: `out` holds one adapter
    and metrics ``{"sft": {...}, "dpo": {...}}`` plus the totals `summarize` reads.
    Returns the metrics also written to ``out/train_metrics.json``.

    >>> m = train(TrainConfig(max_steps=50), "runs/quickstart", "runs/quickstart/adapter")  # doctest: +SKIP
    >>> m["steps"][-1]["loss"] < m["steps"][0]["loss"]                                      # doctest: +SKIP
    True
    """
    from synthloop.tuner.dpo import _dpo_into

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if cfg.method == "sft":
            metrics = _sft_into(cfg, data, tmp)
        elif cfg.method == "dpo":
            metrics = _dpo_into(cfg, data, tmp)
        else:
            phase = tmp / "sft-phase"
            phase.mkdir()
            sft = _sft_into(cfg, data, phase)
            dpo = _dpo_into(dataclasses.replace(cfg, init_adapter=str(phase)), data, tmp)
            shutil.rmtree(phase)
            metrics = _combine(cfg, sft, dpo)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    print(f"adapter -> {out} ({metrics['optimizer_steps']} steps, final loss {metrics['final_loss']}, "
          f"{metrics['train_seconds']:.0f}s)", file=sys.stderr)
    return metrics


def _combine(cfg: TrainConfig, sft: dict, dpo: dict) -> dict:
    """Metrics of an sft+dpo training: both phases, with totals where totals mean something."""
    for phase in (sft, dpo):
        phase.pop("config", None)                   # once, at the top
    dpo["init_adapter"] = "sft phase"               # its folder was temporary
    tokens = [p["tokens"] for p in (sft, dpo) if p["tokens"] is not None]
    return {
        "method": cfg.method, "base_model": cfg.base_model, "base_path": sft["base_path"],
        "init_adapter": cfg.init_adapter, "config": dataclasses.asdict(cfg), "peft": dpo["peft"],
        "optimizer_steps": sft["optimizer_steps"] + dpo["optimizer_steps"],
        "tokens": sum(tokens) if tokens else None,
        "final_loss": dpo["final_loss"],            # the DPO loss: the last objective trained
        "seconds": round(sft["seconds"] + dpo["seconds"], 3),
        "train_seconds": round(sft["train_seconds"] + dpo["train_seconds"], 3),
        "sft": sft, "dpo": dpo,
    }


# Pieces the SFT and DPO phases share (tuner/dpo.py uses them too).
def _load_base(cfg: TrainConfig):
    """(base model path, tokenizer with a pad token)."""
    from transformers import AutoTokenizer

    base = resolve_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def _start_path(cfg: TrainConfig, base) -> str:
    """The weights training starts from: the base, or for ``peft = "none"`` continuing, that model folder."""
    return cfg.init_adapter if cfg.peft == "none" and cfg.init_adapter else str(base)


def _load_policy(cfg: TrainConfig, base, dtype):
    """(model, peft_config) for `cfg.peft`: `cfg.init_adapter` loaded trainable, or the base model plus
    the PEFT config the trainer wraps it with (None for a full fine-tune, where every weight trains).
    Seed first: LoRA's A matrices and the prefix embeddings are drawn at wrap time."""
    from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig
    from transformers import AutoModelForCausalLM

    if cfg.init_adapter:
        kind = student_kind(cfg.init_adapter)
        if kind != ("full" if cfg.peft == "none" else cfg.peft):
            raise ValueError(f"init_adapter {cfg.init_adapter} is a {kind} "
                             f"{'model folder' if kind == 'full' else 'adapter'}, but peft = \"{cfg.peft}\"")
    model = AutoModelForCausalLM.from_pretrained(_start_path(cfg, base), dtype=dtype)
    if cfg.peft == "none":
        return model, None
    if cfg.init_adapter and cfg.peft == "prefix":
        # PEFT loads prompt-learning adapters for inference only ("Cannot set a prompt learning adapter
        # to trainable"): build a trainable one of the same shape and load the saved prefix into it.
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file
        config = PeftConfig.from_pretrained(cfg.init_adapter)
        config.inference_mode = False
        model = get_peft_model(model, config)
        set_peft_model_state_dict(model, load_file(Path(cfg.init_adapter) / "adapter_model.safetensors"))
        return model, None
    if cfg.init_adapter:
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True), None
    if cfg.peft == "lora":
        return model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    if cfg.peft == "ia3":
        # PEFT's per-architecture targets (Llama: k_proj, v_proj and down_proj's input), as in the IA3 paper.
        return model, IA3Config(task_type="CAUSAL_LM")
    return model, PrefixTuningConfig(num_virtual_tokens=cfg.prefix_tokens, task_type="CAUSAL_LM")


def peft_summary(model) -> dict:
    """What a trained model's tuning strategy is and its shape (train_metrics.json's ``peft``)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {"type": "none", "trainable_parameters": sum(p.numel() for p in model.parameters())}
    trainable = sum(p.numel() for n, p in model.named_parameters() if ".default" in n)
    kind = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix"}[str(config.peft_type.value)]
    out = {"type": kind, "trainable_parameters": trainable}
    if kind == "lora":
        out.update(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=sorted(config.target_modules))
    elif kind == "ia3":
        out.update(target_modules=sorted(config.target_modules), feedforward_modules=sorted(config.feedforward_modules))
    else:
        out.update(num_virtual_tokens=config.num_virtual_tokens)
    return out


def _trainer_args(cfg: TrainConfig, folder: Path, *, dtype, on_cuda: bool, learning_rate: float,
                  max_steps: int) -> dict:
    """TrainingArguments both SFTConfig and DPOConfig take, spelled out: TRL's defaults differ from ours."""
    import torch

    return dict(
        output_dir=str(folder / "trainer"), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=learning_rate, num_train_epochs=cfg.epochs, max_steps=max_steps or -1,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_scheduler, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, gradient_checkpointing=cfg.gradient_checkpointing,
        # TRL defaults to bf16 autocast everywhere; on a CPU that is slower and less exact.
        bf16=dtype == torch.bfloat16, fp16=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=on_cuda, remove_unused_columns=False,
    )


def _fit(trainer):
    """Train with one stderr line per step (and nothing on stdout); returns (result, train seconds)."""
    from transformers import PrinterCallback

    # transformers prints every log dict to stdout; commands keep stdout for their JSON result.
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_stderr_progress())
    t = time.time()
    result = trainer.train()
    return result, time.time() - t


def _save_adapter(trainer, folder: Path, cfg: TrainConfig, base) -> None:
    """The trained adapter only (not the frozen "ref" copy TRL's DPO adds when it continues one); for
    a full fine-tune a complete model folder (weights, tokenizer, generation config) that every
    backend loads as a model."""
    if cfg.peft == "none":
        from transformers import GenerationConfig
        trainer.model.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)
        start = Path(_start_path(cfg, base))
        if (start / "generation_config.json").exists():
            GenerationConfig.from_pretrained(start).save_pretrained(folder)
    else:
        trainer.model.save_pretrained(folder, selected_adapters=["default"])
    # PEFT's generated model card is a template of "[More Information Needed]" lines.
    (folder / "README.md").unlink(missing_ok=True)
    shutil.rmtree(folder / "trainer", ignore_errors=True)


def _sft_into(cfg: TrainConfig, data, folder: Path) -> dict:
    """SFT into the existing, empty `folder` (adapter files); returns its metrics."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    set_seed(cfg.seed)
    base, tokenizer = _load_base(cfg)
    conversations = load_conversations(data)
    replayed = replay_conversations(cfg.replay, limit=cfg.replay_max, seed=cfg.seed)
    examples, skipped = build_examples(tokenizer, conversations + replayed, max_length=cfg.max_length)
    if not examples:
        raise ValueError(f"no trainable conversations in {data} (skipped: {skipped})")
    on_cuda = torch.cuda.is_available()
    dtype = _dtype(cfg, on_cuda)
    model, peft_config = _load_policy(cfg, base, dtype)
    args = SFTConfig(**_trainer_args(cfg, folder, dtype=dtype, on_cuda=on_cuda, learning_rate=cfg.learning_rate,
                                     max_steps=cfg.max_steps),
                     max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=peft_config)
    result, train_seconds = _fit(trainer)
    _save_adapter(trainer, folder, cfg, base)
    data_counts = {
        "examples": len(examples), "skipped": skipped, "replayed": len(replayed),
        "example_tokens": sum(len(e["input_ids"]) for e in examples),
        "example_assistant_tokens": sum(lab != IGNORE for e in examples for lab in e["labels"]),
    }
    return _metrics(cfg, "sft", trainer, result, base, data_counts, SFT_STEP_KEYS,
                    seconds=time.time() - t0, train_seconds=train_seconds)


def _stderr_progress():
    """A callback printing one line per optimizer step to stderr."""
    from transformers import TrainerCallback

    class StderrProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                line = f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                if "rewards/margins" in logs:
                    line += f" margin {logs['rewards/margins']:.4f} acc {logs['rewards/accuracies']:.2f}"
                print(line, file=sys.stderr)

    return StderrProgress()


SFT_STEP_KEYS = ("step", "loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "epoch")


def _metrics(cfg, method, trainer, result, base, data_counts: dict, step_keys, *, seconds, train_seconds) -> dict:
    steps = [{k: h[k] for k in step_keys if k in h} for h in trainer.state.log_history if "loss" in h]
    n_steps = trainer.state.global_step
    return {
        "method": method, "base_model": cfg.base_model, "base_path": str(base), "init_adapter": cfg.init_adapter,
        "config": dataclasses.asdict(cfg),
        "peft": peft_summary(trainer.model),
        **data_counts,
        "optimizer_steps": n_steps,
        "tokens": int(steps[-1]["num_tokens"]) if steps and "num_tokens" in steps[-1] else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / n_steps, 3) if n_steps else None,
        "steps": steps,
    }


def summarize(metrics: dict) -> dict:
    """The few train_metrics.json numbers a rounds.json entry keeps (an sft+dpo training: its totals,
    with the DPO phase's final loss).

    >>> summarize({"optimizer_steps": 2, "final_loss": 1.5, "train_seconds": 9.0, "tokens": 900})
    {'method': 'sft', 'steps': 2, 'final_loss': 1.5, 'seconds': 9.0, 'tokens': 900}
    """
    return {"method": metrics.get("method", "sft"), "steps": metrics.get("optimizer_steps"),
            "final_loss": metrics.get("final_loss"), "seconds": metrics.get("train_seconds"),
            "tokens": metrics.get("tokens")}


def train_in_fresh_process(cfg: TrainConfig, data, out: str | Path, *, overwrite: bool = False) -> dict:
    """`train` (whichever `cfg.method`) in a spawned interpreter; returns the metrics it wrote.

    The rounds loop trains right after generating in the same process, and training there ran
    3x slower than in a fresh one (about 22 vs 7 s per step for SmolLM2-135M on 2 cores, after a
    vLLM run and the filters; not the environment, the torch thread settings, numba or the engine
    processes, which we checked one by one). A fresh interpreter also returns the memory. Ctrl-C
    or SIGTERM stop the child too, and so does a SIGKILL of this process (the child asks Linux to
    kill it when its parent dies: a killed rounds loop leaves no trainer behind to race the rerun
    for the same adapter folder); a failed child raises with its exit code.
    """
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(os.getpid(), cfg, _picklable(data), str(out), overwrite),
        name="synthloop-train")
    proc.start()
    try:
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"training {out} failed in its process (exit code {proc.exitcode}); see the error above")
    return json.loads((Path(out) / "train_metrics.json").read_text())


def _train_child(parent: int, cfg: TrainConfig, data, out: str, overwrite: bool) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    if os.getppid() != parent:          # the parent died before that took effect
        os._exit(1)
    train(cfg, data, out, overwrite=overwrite)


def _picklable(data):
    if isinstance(data, (pl.DataFrame, str)):
        return data
    return str(data) if isinstance(data, Path) else [str(d) for d in data]
