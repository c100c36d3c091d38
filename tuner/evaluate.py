"""Held-out evaluation of a student: reference loss, and judged win-rate against the previous student.

(a) `reference_loss`: mean per-token negative log-likelihood of the held-out reference answers
    under the student (base model + optional adapter), counted on assistant tokens only, exactly
    the tokens training puts its loss on (tuner/masking.py). Lower is better; it needs no judge.
(b) `win_rate`: both students answer the held-out instructions through our LLM seam (greedy), and
    an LLM judge compares the answers pairwise (tuner/judge.py).

`evaluate` runs both and returns the dict a rounds.json entry keeps under ``eval``.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from synthloop.core.llm import BackendSpec, open_llm
from synthloop.core.models import student_kind, student_weights
from synthloop.tuner.heldout import load_heldout, prompt_messages, reference_messages
from synthloop.tuner.judge import judge_pairs
from synthloop.tuner.masking import IGNORE, tokenize_chat

ANSWER_PARAMS = {"temperature": 0, "max_tokens": 256}


def load_student(base_model: str = "embedded", adapter: str | None = None, *, dtype: str = "float32",
                 device: str | None = None):
    """(model, tokenizer) in eval mode. `adapter` is what training wrote: a LoRA or IA3 adapter (merged
    in, so scoring runs at base speed), a prefix-tuning adapter (applied: it cannot be merged), or a
    full fine-tune's model folder (loaded instead of the base).

    >>> model, tok = load_student("embedded", "runs/loop/round-00/adapter")   # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, peft_adapter = student_weights(base_model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    if peft_adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, peft_adapter)
        if student_kind(peft_adapter) != "prefix":
            model = model.merge_and_unload()
    return model.eval(), tok


def reference_loss(model, tokenizer, items: Sequence[dict], *, batch_size: int = 8, max_length: int = 1024) -> dict:
    """Token-weighted mean loss of the references in `items` (held-out pairs) under `model`.

    >>> reference_loss(*load_student(), load_heldout())["loss"]     # doctest: +SKIP
    1.83
    """
    import torch

    examples = [tokenize_chat(tokenizer, reference_messages(it), max_length=max_length) for it in items]
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count, t0 = 0.0, 0, time.time()
    with torch.inference_mode():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            hidden = _last_hidden(model, ids, mask)
            # Position t predicts token t+1; only scored positions go through the LM head, so the
            # (batch x length x vocab) logits tensor is never built.
            target = labels[:, 1:]
            keep = target != IGNORE
            logits = head(hidden[:, :-1][keep]).float()
            nll = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
            total += nll.item()
            count += int(keep.sum())
    seconds = time.time() - t0
    return {"loss": total / count if count else float("nan"), "tokens": count, "examples": len(examples),
            "seconds": round(seconds, 3), "tokens_per_second": round(count / seconds, 1) if seconds else None}


def _last_hidden(model, ids, mask):
    """The final hidden states of `ids`; the LM head is applied by the caller, only where scored."""
    if getattr(model, "peft_config", None):
        # A prefix-tuned student (the only kind kept unmerged): PEFT puts the prefix in the attention
        # cache. The last hidden layer is the normed output the LM head reads (as last_hidden_state).
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def student_spec(base_model: str, adapter: str | None, template: BackendSpec | None = None) -> BackendSpec:
    """The backend a student answers through: `template` (default: transformers) plus its adapter."""
    template = template or BackendSpec(backend="transformers", model=base_model)
    options = dict(template.options)
    if adapter:
        options["adapter"] = str(adapter)
    return BackendSpec(backend=template.backend, model=template.model or base_model, options=options)


def answer(llm, items: Sequence[dict], params: dict | None = None) -> list[str]:
    """The student's answers to the held-out instructions (failed requests give "")."""
    done = llm.generate([prompt_messages(it) for it in items], params or ANSWER_PARAMS)
    return [c.text.strip() if c.ok else "" for c in done]


def evaluate(*, base_model: str = "embedded", adapter: str | None = None, previous_adapter: str | None = None,
             heldout: str | os.PathLike | Sequence[dict] | None = None, judge: BackendSpec | None = None,
             student: BackendSpec | None = None, answer_params: dict | None = None,
             judge_params: dict | None = None, seed: int = 0, limit: int | None = None,
             previous_loss: bool = True, batch_size: int = 8) -> dict:
    """Evaluate the student `base_model` + `adapter` against `base_model` + `previous_adapter`.

    The loss is always computed; the win-rate only when a `judge` backend is given. Students answer
    through `student` (default: the transformers backend) with ``options["adapter"]`` set.

    >>> evaluate(adapter="runs/loop/round-01/adapter", previous_adapter="runs/loop/round-00/adapter",
    ...          judge=BackendSpec(backend="openai", model="judge-model"))            # doctest: +SKIP
    {'loss': 1.61, 'previous_loss': 1.70, 'win_rate': 0.56, 'wins': 21, ...}
    """
    is_path = heldout is None or isinstance(heldout, (str, os.PathLike))
    items = load_heldout(heldout) if is_path else list(heldout)
    items = items[:limit] if limit else items
    out: dict = {"heldout": "bundled" if heldout is None else (str(heldout) if is_path else "given"),
                 "n_heldout": len(items), "adapter": adapter, "previous_adapter": previous_adapter}
    model, tok = load_student(base_model, adapter)
    res = reference_loss(model, tok, items, batch_size=batch_size)
    out.update(loss=res["loss"], loss_tokens=res["tokens"], loss_tokens_per_second=res["tokens_per_second"])
    del model
    if previous_loss:
        model, tok = load_student(base_model, previous_adapter)
        out["previous_loss"] = reference_loss(model, tok, items, batch_size=batch_size)["loss"]
        del model
    out["win_rate"] = None
    if judge is not None:
        answers, t0 = {}, time.time()
        for key, path in (("new", adapter), ("old", previous_adapter)):
            llm = open_llm(student_spec(base_model, path, student))
            try:
                answers[key] = answer(llm, items, answer_params)
            finally:
                llm.close()
        out["answer_seconds"] = round(time.time() - t0, 3)
        jllm = open_llm(judge)
        try:
            t0 = time.time()
            out.update(judge_pairs(jllm, [prompt_messages(it)[0]["content"] for it in items],
                                   answers["new"], answers["old"], seed=seed, params=judge_params))
            out["judge_seconds"] = round(time.time() - t0, 3)
        finally:
            jllm.close()
    return out
