"""Reward-model scores from any local Hugging Face `AutoModelForSequenceClassification` folder.

The pair is rendered with the tokenizer's chat template when it has one (reward models such as
Skywork/ArmoRM-style LLaMA heads expect the conversation), else encoded as a text pair
(BERT-style cross-encoders). The score is the single logit for a one-label head, else the
probability of `label` (default: the last class, "good"). Written raw to ``scores.reward``; with
``min_reward`` set, lower rows get ``low_reward``.

Stage type ``reward``::

    [[stages]]
    type = "reward"
    model = "/models/my-reward-model"
    min_reward = 0.0
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from synthloop.filters.scoring import set_scores, spread, to_score, user_text
from synthloop.core.models import resolve_model
from synthloop.core.registry import scorer
from synthloop.core.stages import drop_where


@dataclass
class RewardConfig:
    model: str = ""                    # required: a local sequence-classification model folder
    device: str = "auto"
    batch_size: int = 8
    max_length: int = 1024
    label: int = -1                    # class whose probability is the score (multi-class heads)
    min_reward: float = -math.inf


class RewardScorer:
    """Batched reward-model scoring of (instruction, response) pairs.

    >>> RewardScorer(RewardConfig(model="/models/rm")).score(["Hi"], [""], ["Hello!"])  # doctest: +SKIP
    [1.73]
    """

    def __init__(self, cfg: RewardConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not cfg.model:
            raise ValueError("reward: set 'model' to a local sequence-classification model folder")
        self.cfg = cfg
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        path = resolve_model(cfg.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        # Decoder heads read the last non-pad token, so the model must know which id is padding.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self._torch = torch

    def _encode(self, pairs: list[tuple[str, str]]):
        if self.tok.chat_template:
            texts = [self.tok.apply_chat_template(
                [{"role": "user", "content": u}, {"role": "assistant", "content": r}], tokenize=False)
                for u, r in pairs]
            return self.tok(texts, add_special_tokens=False, padding=True, truncation=True,
                            max_length=self.cfg.max_length, return_tensors="pt")
        return self.tok([u for u, _ in pairs], [r for _, r in pairs], padding=True,
                        truncation="longest_first", max_length=self.cfg.max_length, return_tensors="pt")

    def score(self, instructions: list[str], inputs: list[str], responses: list[str]) -> list[float]:
        torch = self._torch
        pairs = [(user_text(i, x), r) for i, x, r in zip(instructions, inputs, responses, strict=True)]
        out: list[float] = []
        for s in range(0, len(pairs), self.cfg.batch_size):
            enc = self._encode(pairs[s:s + self.cfg.batch_size]).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                out += logits[:, 0].tolist()
            else:
                out += logits.softmax(-1)[:, self.cfg.label].tolist()
        return out

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        todo = to_score(batch)
        rows = batch.filter(todo)
        values = self.score(rows["instruction"].to_list(), rows["input"].to_list(),
                            rows["response"].to_list())
        out = set_scores(batch, reward=spread(todo, values))
        if math.isfinite(self.cfg.min_reward):
            out = drop_where(out, pl.col("scores").struct.field("reward") < self.cfg.min_reward,
                             "low_reward")
        return out

    def close(self) -> None:
        self.model = None


@scorer("reward", RewardConfig)
def build(cfg: RewardConfig, llm) -> RewardScorer:
    return RewardScorer(cfg)
