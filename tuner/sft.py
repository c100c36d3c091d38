"""LoRA SFT of the student on curated shards: TRL's SFTTrainer on labels we build ourselves.

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
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

from synthloop.generator.models import resolve_model
from synthloop.outputs.run_reader import kept_paths, round_dirs
from synthloop.tuner.masking import IGNORE, tokenize_chat

#: Every linear layer of a Llama-style block: LoRA on all of them learns most per parameter
#: (QLoRA paper), and vLLM's LoRA kernels support each of them.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS_FILE = "train_metrics.json"


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how. Validated on construction; a TOML ``[train]`` table maps onto it.

    >>> TrainConfig(lora_r=8, max_steps=100, learning_rate=1e-4).batch_size
    4
    """

    base_model: str = "embedded"          # `embedded` or a local HF folder
    init_adapter: str | None = None       # continue training this adapter (its LoRA shape is kept)
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

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name} {rule}, got {getattr(self, name)!r}")

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


def load_train_config(path: str | Path, *, table: str = "train") -> TrainConfig:
    """Read a TOML file's ``[train]`` table into a TrainConfig (unknown keys and wrong types named)."""
    import tomllib

    from synthloop.generator.config import ConfigError, from_dict

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


def train(cfg: TrainConfig, data, out: str | Path, *, overwrite: bool = False) -> dict:
    """LoRA-train `cfg.base_model` on `data` (see `shard_files`, or a frame); write the adapter to `out`.

    Returns the metrics also written to ``out/train_metrics.json``.

    >>> m = train(TrainConfig(max_steps=50), "runs/quickstart", "runs/quickstart/adapter")  # doctest: +SKIP
    >>> m["steps"][-1]["loss"] < m["steps"][0]["loss"]                                      # doctest: +SKIP
    True
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    t0 = time.time()
    set_seed(cfg.seed)   # LoRA's A matrices are drawn at wrap time, before the trainer seeds anything
    base = resolve_model(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, skipped = build_examples(tokenizer, load_conversations(data), max_length=cfg.max_length)
    if not examples:
        raise ValueError(f"no trainable conversations in {data} (skipped: {skipped})")

    on_cuda = torch.cuda.is_available()
    dtype = _dtype(cfg, on_cuda)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_config = None
    if cfg.init_adapter:
        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")

    out.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed trainings into the same target are garbage by construction.
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        args = SFTConfig(
            output_dir=str(tmp / "trainer"), seed=cfg.seed, data_seed=cfg.seed,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
            warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_scheduler, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, gradient_checkpointing=cfg.gradient_checkpointing,
            # TRL defaults to bf16 autocast everywhere; on a CPU that is slower and less exact.
            bf16=dtype == torch.bfloat16, fp16=False,
            max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True},
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_pin_memory=on_cuda, remove_unused_columns=False,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=tokenizer, peft_config=peft_config)
        # transformers prints every log dict to stdout; commands keep stdout for their JSON result.
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_stderr_progress())
        t_train = time.time()
        result = trainer.train()
        train_seconds = time.time() - t_train
        trainer.model.save_pretrained(tmp)
        # PEFT's generated model card is a template of "[More Information Needed]" lines.
        (tmp / "README.md").unlink(missing_ok=True)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        metrics = _metrics(cfg, trainer, result, examples, skipped, base,
                           seconds=time.time() - t0, train_seconds=train_seconds)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"adapter -> {out} ({metrics['optimizer_steps']} steps, final loss {metrics['final_loss']}, "
          f"{metrics['train_seconds']:.0f}s)", file=sys.stderr)
    return metrics


def _stderr_progress():
    """A callback printing one line per optimizer step to stderr."""
    from transformers import TrainerCallback

    class StderrProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}", file=sys.stderr)

    return StderrProgress()


def _metrics(cfg, trainer, result, examples, skipped, base, *, seconds, train_seconds) -> dict:
    steps = [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate", "num_tokens",
                                "mean_token_accuracy", "epoch") if k in h}
             for h in trainer.state.log_history if "loss" in h]
    n_steps = trainer.state.global_step
    lora = trainer.model.peft_config["default"]
    return {
        "base_model": cfg.base_model, "base_path": str(base), "init_adapter": cfg.init_adapter,
        "config": dataclasses.asdict(cfg),
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                 "target_modules": sorted(lora.target_modules)},
        "examples": len(examples), "skipped": skipped,
        "example_tokens": sum(len(e["input_ids"]) for e in examples),
        "example_assistant_tokens": sum(lab != IGNORE for e in examples for lab in e["labels"]),
        "optimizer_steps": n_steps,
        "tokens": int(steps[-1]["num_tokens"]) if steps and "num_tokens" in steps[-1] else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / n_steps, 3) if n_steps else None,
        "steps": steps,
    }


def summarize(metrics: dict) -> dict:
    """The few train_metrics.json numbers a rounds.json entry keeps.

    >>> summarize({"optimizer_steps": 2, "final_loss": 1.5, "train_seconds": 9.0, "tokens": 900})
    {'steps': 2, 'final_loss': 1.5, 'seconds': 9.0, 'tokens': 900}
    """
    return {"steps": metrics.get("optimizer_steps"), "final_loss": metrics.get("final_loss"),
            "seconds": metrics.get("train_seconds"), "tokens": metrics.get("tokens")}


def train_in_fresh_process(cfg: TrainConfig, data, out: str | Path, *, overwrite: bool = False) -> dict:
    """`train` in a spawned interpreter; returns the metrics it wrote.

    The rounds loop trains right after generating in the same process, and training there ran
    3x slower than in a fresh one (about 22 vs 7 s per step for SmolLM2-135M on 2 cores, after a
    vLLM run and the filters; not the environment, the torch thread settings, numba or the engine
    processes, which we checked one by one). A fresh interpreter also returns the memory. Ctrl-C
    or SIGTERM stop the child too; a failed child raises with its exit code.
    """
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=train, args=(cfg, data if isinstance(data, pl.DataFrame) else str(data), str(out)),
        kwargs={"overwrite": overwrite}, name="synthloop-train")
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
