"""DPO of the student (any `TrainConfig.peft`) on preference pairs: TRL's DPOTrainer on conversational pairs.

Pairs are Parquet rows with ``prompt`` (the user turns), ``chosen`` and ``rejected`` (one assistant
turn each), every one a list of ``{role, content}``: the conversational format DPOTrainer reads, so
TRL renders them with the chat template itself. With SmolLM2's template the rendered prompt (plus
generation prompt) is a token prefix of prompt + answer, and an answer's trained tokens are its
content and ``<|im_end|>\\n``, exactly the tokens our SFT labels train (`tuner/masking.py`).

For adapters the reference model is no second copy of the weights (``ref_model=None``): for a new
adapter TRL computes the reference log-probs with the adapter disabled (the base model); when it
continues an adapter (``init_adapter``, or the SFT phase of ``sft+dpo``) TRL 1.16 adds a frozen copy
of that adapter named ``ref`` and uses it, so the reference is the student DPO starts from, as in
the DPO paper. Two cases get a frozen model of their own, loaded next to the policy: a full
fine-tune (``peft = "none"``: no adapter to switch off), and a continued IA3 adapter (TRL copies
parameters named ``.default.`` into ``ref``; IA3's end in ``.default``, so its ``ref`` would be the
base model). A new prefix-tuning adapter's reference is the base without the prefix. Only the trained ``default`` adapter is saved. TRL turns dropout off for DPO (policy and
reference must score a sequence the same way), LoRA's included, whatever ``lora_dropout`` says.

``max_length`` bounds prompt + answer; TRL 1.16 has no separate prompt or completion limits any
more, keeps the start of a long sequence and drops pairs whose prompt alone fills it (counted in
``skipped.prompt_fills_max_length``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import polars as pl

from synthloop.outputs.run_reader import round_dirs
from synthloop.tuner.sft import (METRICS_FILE, SFT_STEP_KEYS, TrainConfig, _dtype, _fit, _load_base, _load_policy, _metrics,
                                 _save_adapter, _start_path, _trainer_args, atomic_dir)

PAIRS_GLOB = "pairs/pairs-*.parquet"     # inside a run directory
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
DPO_STEP_KEYS = SFT_STEP_KEYS + ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                 "logps/chosen", "logps/rejected")


# -- data ---------------------------------------------------------------------------------------
def pair_files(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Preference-pair Parquet files behind `sources`: run directories (their ``pairs/pairs-*.parquet``),
    rounds directories (every round's pairs), folders of Parquet files, or Parquet files.

    Each source must yield at least one file (a rounds directory: some round has pairs).

    >>> pair_files("runs/loop")       # doctest: +SKIP
    [PosixPath('runs/loop/round-00/pairs/pairs-00000.parquet'), PosixPath('runs/loop/round-01/pairs/pairs-00000.parquet')]
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[Path] = []
    for item in map(Path, items):
        if (item / "manifest.json").exists():
            found = sorted(item.glob(PAIRS_GLOB))
        elif item.is_dir() and round_dirs(item):
            found = [f for _, d in round_dirs(item) for f in sorted(d.glob(PAIRS_GLOB))]
        elif item.is_dir():
            found = sorted(item.rglob("*.parquet"))
        elif item.suffix == ".parquet" and item.exists():
            found = [item]
        else:
            raise FileNotFoundError(f"{item}: not a run directory, a folder of Parquet files or a .parquet file")
        if not found:
            raise FileNotFoundError(f"{item}: no preference pairs in it ({PAIRS_GLOB} of a run directory "
                                    f"or of its rounds, or *.parquet in a folder)")
        files += found
    return files


def _messages(value) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value or [] if m and m.get("content")]


def load_pairs(sources: str | Path | Sequence[str | Path] | pl.DataFrame) -> tuple[list[dict], dict]:
    """(pairs as ``{prompt, chosen, rejected}`` lists of ``{role, content}``, counts of the pairs left out).

    Other columns are ignored. Left out: pairs with an empty part (``incomplete``) and pairs whose
    chosen and rejected answers are the same (``identical``: no preference to learn).
    """
    if isinstance(sources, pl.DataFrame):
        frames = [("the frame", sources)]
    else:
        frames = [(str(f), None) for f in pair_files(sources)]
    pairs, skipped = [], {"incomplete": 0, "identical": 0}
    for name, frame in frames:
        columns = frame.columns if frame is not None else pl.read_parquet_schema(name).keys()
        missing = [c for c in PAIR_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{name}: not preference pairs, no column(s) {', '.join(missing)}")
        frame = frame.select(PAIR_COLUMNS) if frame is not None else pl.read_parquet(name, columns=list(PAIR_COLUMNS))
        for row in frame.iter_rows(named=True):
            pair = {k: _messages(row[k]) for k in PAIR_COLUMNS}
            if not all(pair.values()):
                skipped["incomplete"] += 1
            elif pair["chosen"] == pair["rejected"]:
                skipped["identical"] += 1
            else:
                pairs.append(pair)
    return pairs, skipped


# -- training -----------------------------------------------------------------------------------
def train_dpo(cfg: TrainConfig, pairs, out: str | Path, *, overwrite: bool = False) -> dict:
    """LoRA-DPO `cfg.base_model` (or continue `cfg.init_adapter`) on `pairs` (see `pair_files`, or a frame);
    write the adapter to `out` atomically. Whatever `cfg.method` says; `sft.train` dispatches on it.

    Returns the metrics also written to ``out/train_metrics.json``: `sft.train`'s keys where they
    apply, `pairs`, and per step TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (and ``logps/*``).

    >>> m = train_dpo(TrainConfig(max_steps=50, learning_rate=5e-5), "runs/r1", "runs/r1/dpo")  # doctest: +SKIP
    >>> m["steps"][-1]["rewards/margins"] > 0                                                    # doctest: +SKIP
    True
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        metrics = _dpo_into(cfg, pairs, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    print(f"adapter -> {out} ({metrics['optimizer_steps']} DPO steps, final loss {metrics['final_loss']}, "
          f"{metrics['train_seconds']:.0f}s)", file=sys.stderr)
    return metrics


def _dpo_into(cfg: TrainConfig, pairs, folder: Path) -> dict:
    """DPO into the existing, empty `folder` (adapter files); returns its metrics."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    t0 = time.time()
    set_seed(cfg.seed)
    base, tokenizer = _load_base(cfg)
    rows, skipped = load_pairs(pairs)
    if not rows:
        raise ValueError(f"no usable preference pairs in {pairs} (skipped: {skipped})")
    on_cuda = torch.cuda.is_available()
    dtype = _dtype(cfg, on_cuda)
    model, peft_config = _load_policy(cfg, base, dtype)
    ref_model = None
    if cfg.peft == "none" or (cfg.peft == "ia3" and cfg.init_adapter):
        # The reference is a frozen copy of the start. A full fine-tune has no adapter to switch off;
        # for a continued IA3 adapter TRL's "ref" copy would miss its vectors (it copies parameters
        # named ".default.", IA3's end in ".default") and score with the base model instead.
        from transformers import AutoModelForCausalLM
        ref_model = AutoModelForCausalLM.from_pretrained(_start_path(cfg, base), dtype=dtype)
        if cfg.peft == "ia3":
            from peft import PeftModel
            ref_model = PeftModel.from_pretrained(ref_model, cfg.init_adapter).merge_and_unload()
    args = DPOConfig(**_trainer_args(cfg, folder, dtype=dtype, on_cuda=on_cuda,
                                     learning_rate=cfg.dpo_learning_rate or cfg.learning_rate,
                                     max_steps=cfg.dpo_max_steps or cfg.max_steps),
                     beta=cfg.beta, loss_type=[cfg.dpo_loss], max_length=cfg.max_length,
                     truncation_mode="keep_start", precompute_ref_log_probs=False, disable_dropout=True)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)
    kept = trainer.train_dataset
    skipped["prompt_fills_max_length"] = len(rows) - len(kept)
    if not len(kept):
        raise ValueError(f"no preference pair of {pairs} fits max_length={cfg.max_length} (skipped: {skipped})")
    result, train_seconds = _fit(trainer)
    _save_adapter(trainer, folder, cfg, base)
    cap = cfg.max_length    # the collator cuts prompt + answer at max_length
    data_counts = {
        "pairs": len(kept), "skipped": skipped,
        "pair_tokens": sum(min(len(p) + len(c), cap) + min(len(p) + len(r), cap)
                           for p, c, r in zip(kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"])),
    }
    return _metrics(cfg, "dpo", trainer, result, base, data_counts, DPO_STEP_KEYS,
                    seconds=time.time() - t0, train_seconds=train_seconds)
