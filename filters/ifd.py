"""IFD (instruction-following difficulty, Li et al. 2024 "Cherry LLM") with the student model.

    IFD = loss(response | instruction) / loss(response alone)

Both are the mean token cross-entropy over the *same* response tokens: conditioned, the response
follows the instruction rendered with the model's chat template; alone, it follows only the BOS
token. IFD near or above 1 means the instruction does not help the model produce the response
(often a mismatched pair); low IFD means the pair is easy for the student. Written to
``scores.ifd``; with bounds set, rows outside [min_ifd, max_ifd] get ``ifd_out_of_range``.

Stage type ``ifd``::

    [[stages]]
    type = "ifd"
    model = "embedded"       # the student: a local HF causal-LM folder or "embedded"
    max_ifd = 1.0
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import polars as pl

from synthloop.filters.scoring import set_scores, spread, to_score, user_text
from synthloop.core.models import resolve_model
from synthloop.core.registry import scorer
from synthloop.core.stages import drop_where


@dataclass
class IFDConfig:
    model: str = "embedded"
    device: str = "auto"               # auto | cpu | cuda[:N]
    batch_size: int = 16               # sequences per forward pass (two per row)
    max_batch_tokens: int = 2048       # padded tokens per forward pass; bounds logits memory
    max_length: int = 1024             # longer pairs lose the end of the response, both ways
    min_ifd: float = 0.0
    max_ifd: float = math.inf          # TOML: inf; 1.0 drops pairs the instruction does not help


class IFDScorer:
    """Loads the student once; scores batches of rows.

    >>> s = IFDScorer(IFDConfig())                                       # doctest: +SKIP
    >>> s.ifd(["Name a colour."], [""], ["Blue."])                         # doctest: +SKIP
    [0.41]
    """

    def __init__(self, cfg: IFDConfig | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg or IFDConfig()
        dev = self.cfg.device
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        path = resolve_model(self.cfg.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        start = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if start is None:
            raise ValueError(f"ifd: tokenizer of {path} has neither a BOS nor an EOS token")
        self.start = int(start)
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else start)
        self.stats = {"rows": 0, "seconds": 0.0, "skipped": 0}
        self._torch = torch

    def _prompt_ids(self, user: str) -> list[int]:
        if self.tok.chat_template:
            text = self.tok.apply_chat_template([{"role": "user", "content": user}],
                                                add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(user + "\n\n")["input_ids"]

    def _mean_losses(self, seqs: list[tuple[list[int], int]]) -> list[float]:
        """Mean cross-entropy of the last n tokens of each (ids, n), batched by padded size."""
        torch = self._torch
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out = [math.nan] * len(seqs)
        i = 0
        while i < len(order):
            width = len(seqs[order[i]][0])   # longest first: the first row sets the padded width
            take = max(1, min(self.cfg.batch_size, self.cfg.max_batch_tokens // max(width, 1)))
            chunk = order[i:i + take]
            i += take
            # Left padding puts every row's targets at the end, so the model's own head runs only
            # over the last K positions (logits_to_keep) instead of the whole padded batch.
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            n_max = max(seqs[j][1] for j in chunk)
            labels = torch.full((len(chunk), n_max), -100, dtype=torch.long)
            for r, j in enumerate(chunk):
                s, n = seqs[j]
                ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
                labels[r, n_max - n:] = torch.tensor(s[-n:])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), logits_to_keep=n_max + 1).logits
                logits = logits[:, :-1].float()
                tok_loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.to(self.device).reshape(-1),
                    ignore_index=-100, reduction="none").view(len(chunk), n_max)
                counts = (labels != -100).sum(-1).to(self.device)
                means = (tok_loss.sum(-1) / counts).tolist()
            for r, j in enumerate(chunk):
                out[j] = means[r]
        return out

    def losses(self, instructions: list[str], inputs: list[str], responses: list[str]
               ) -> tuple[list[float], list[float]]:
        """(loss of response given instruction, loss of response alone) per row; NaN if unscorable."""
        seqs, keep = [], []
        for k, (ins, inp, resp) in enumerate(zip(instructions, inputs, responses, strict=True)):
            prompt = self._prompt_ids(user_text(ins, inp))
            r = self.tok(resp, add_special_tokens=False)["input_ids"][:max(0, self.cfg.max_length - len(prompt))]
            if not r:
                continue
            seqs += [(prompt + r, len(r)), ([self.start] + r, len(r))]
            keep.append(k)
        flat = self._mean_losses(seqs) if seqs else []
        cond, alone = [math.nan] * len(responses), [math.nan] * len(responses)
        for n, k in enumerate(keep):
            cond[k], alone[k] = flat[2 * n], flat[2 * n + 1]
        return cond, alone

    def ifd(self, instructions: list[str], inputs: list[str], responses: list[str]) -> list[float | None]:
        cond, alone = self.losses(instructions, inputs, responses)
        return [c / a if a > 0 and math.isfinite(c / a) else None for c, a in zip(cond, alone)]

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        t0 = time.perf_counter()
        todo = to_score(batch)
        rows = batch.filter(todo)
        values = self.ifd(rows["instruction"].to_list(), rows["input"].to_list(),
                          rows["response"].to_list())
        self.stats["rows"] += rows.height
        self.stats["skipped"] += sum(v is None for v in values)
        self.stats["seconds"] += time.perf_counter() - t0
        out = set_scores(batch, ifd=spread(todo, values))
        if self.cfg.min_ifd > 0 or math.isfinite(self.cfg.max_ifd):
            ifd = pl.col("scores").struct.field("ifd")
            out = drop_where(out, (ifd < self.cfg.min_ifd) | (ifd > self.cfg.max_ifd), "ifd_out_of_range")
        return out

    def close(self) -> None:
        self.model = None


@scorer("ifd", IFDConfig)
def build(cfg: IFDConfig, llm) -> IFDScorer:
    return IFDScorer(cfg)
