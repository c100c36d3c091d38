"""transformers backend: batched `generate` on CPU or GPU, chat or raw prompts, optional LoRA adapter.

Requests with identical settings (seeds aside) are generated together in left-padded sub-batches
of `batch_size`; settings go to `model.generate(**params)` as they are, except the portable names
`max_tokens` (-> `max_new_tokens`), `seed` (the sub-batch's seeds together seed torch, so a
sub-batch is reproducible; per-row seeds as in vLLM would force batch size 1), `stop` and
`temperature` 0 (greedy).

`adapter` is what training wrote (LoRA and IA3 adapters are merged in, a prefix-tuning adapter is
applied by PEFT, a full fine-tune's folder is loaded instead of `model`). A GGUF checkpoint loads
with ``gguf_file`` (or `model` naming the ``.gguf`` file): transformers dequantizes it as it loads,
so it computes at `dtype`, and the name carries the file's quantization (``[gguf:Q4_1]``).

`agenerate` runs `generate` in a worker thread, one call at a time (torch releases the GIL while
it computes, so the event loop keeps preparing the next requests meanwhile).
"""
from __future__ import annotations

import asyncio
import json
import threading
import zlib
from pathlib import Path
from typing import Sequence

from synthloop.core.llm.base import Completion, Params, Request, Stats, cut_at_stop, per_request
from synthloop.core.models import model_name, quantization_of, student_kind, student_weights


class TransformersLLM:
    """A causal LM loaded from a local folder (or `embedded`).

    >>> llm = TransformersLLM("embedded")                            # doctest: +SKIP
    >>> llm.generate([[{"role": "user", "content": "Hi"}]], {"max_tokens": 8})[0].finish_reason  # doctest: +SKIP
    'stop'
    """

    def __init__(self, model: str = "embedded", *, adapter: str | None = None, device: str | None = None,
                 dtype: str = "auto", batch_size: int = 16, name: str | None = None, gguf_file: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A full fine-tune's folder replaces the base; a PEFT adapter goes on it.
        path, peft_adapter = student_weights(model, adapter)
        if gguf_file is None and path.endswith(".gguf") and Path(path).is_file():
            path, gguf_file = str(Path(path).parent), Path(path).name
        # transformers dequantizes a GGUF file's weights to `dtype` as it loads them.
        gguf = {"gguf_file": gguf_file} if gguf_file else {}
        self.quantization = quantization_of(path, gguf)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **gguf)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **gguf).to(self.device).eval()
        if peft_adapter:
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, peft_adapter)
            if student_kind(peft_adapter) != "prefix":
                # Merged weights: generation runs at base-model speed and nothing else changes. A
                # prefix cannot be merged (it lives in the attention cache): PEFT's generate applies it.
                self.model = self.model.merge_and_unload()
            self.model.eval()
        self.batch_size = batch_size
        self.name = name or model_name(model, adapter, self.quantization)
        self.stats = Stats()
        self.in_flight = 0
        self.default_in_flight = 2 * batch_size    # one sub-batch computing, the next one waiting
        self._torch = torch
        self._lock = threading.Lock()              # one generate at a time: the model is not reentrant

    def render(self, request: Request) -> str:
        if isinstance(request, str):
            return request
        return self.tokenizer.apply_chat_template(list(request), add_generation_prompt=True, tokenize=False)

    async def agenerate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        self.in_flight += len(requests)
        try:
            return await asyncio.to_thread(self.generate, requests, params)
        finally:
            self.in_flight -= len(requests)

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        with self._lock:
            return self._generate(requests, params)

    def _generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        plist = per_request(params, len(requests))
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(plist):
            groups.setdefault(json.dumps({k: v for k, v in p.items() if k != "seed"}, sort_keys=True), []).append(i)
        for key, idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                p = json.loads(key)
                seeds = [plist[i]["seed"] for i in chunk if plist[i].get("seed") is not None]
                if seeds:
                    p["seed"] = zlib.crc32(json.dumps(seeds).encode())
                for i, c in zip(chunk, self._generate_chunk([self.render(requests[i]) for i in chunk], p)):
                    out[i] = c
        self.stats.calls += 1
        self.stats.add(out)
        return out  # type: ignore[return-value]

    def _generate_chunk(self, prompts: list[str], params: dict) -> list[Completion]:
        torch = self._torch
        params = dict(params)
        stop = params.pop("stop", None)
        seed = params.pop("seed", None)
        if "n" in params and params.pop("n") != 1:
            raise ValueError("transformers backend: send one request per sample instead of n > 1")
        if "max_tokens" in params:
            params["max_new_tokens"] = params.pop("max_tokens")
        temperature = params.get("temperature", 1.0)
        params["do_sample"] = temperature > 0
        if temperature <= 0:
            params.pop("temperature", None)
            params.pop("top_p", None)
        params.setdefault("max_new_tokens", 256)
        if stop:
            params["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            params["tokenizer"] = self.tokenizer
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.inference_mode():
            gen = self.model.generate(**enc, pad_token_id=self.tokenizer.pad_token_id, **params)
        new = gen[:, enc["input_ids"].shape[1]:]
        eos = {self.tokenizer.eos_token_id, *(self.model.generation_config.eos_token_id or [])} \
            if isinstance(self.model.generation_config.eos_token_id, list) else {
                self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id}
        res = []
        for row, mask in zip(new.tolist(), enc["attention_mask"].sum(dim=1).tolist()):
            n = len(row)
            while n and row[n - 1] == self.tokenizer.pad_token_id and self.tokenizer.pad_token_id not in eos:
                n -= 1
            toks = row[:n]
            ended = any(t in eos for t in toks)
            if ended:
                toks = toks[:next(k for k, t in enumerate(toks) if t in eos)]
            text, stopped = cut_at_stop(self.tokenizer.decode(toks, skip_special_tokens=True), stop)
            hit_len = not ended and not stopped and len(toks) >= params["max_new_tokens"]
            res.append(Completion(text=text, finish_reason="length" if hit_len else "stop",
                                  prompt_tokens=int(mask), completion_tokens=len(toks)))
        return res

    def close(self) -> None:
        self.model = None
