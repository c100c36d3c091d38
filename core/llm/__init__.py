"""LLM backends behind one seam (see base.py). `open_llm` builds one from a `BackendSpec`."""
from __future__ import annotations


from synthloop.core.llm.base import LLM, BackendSpec, Completion, Stats
from synthloop.core.llm.cache import CachedLLM, RequestCache


def open_llm(spec: BackendSpec, *, cache: RequestCache | None = None) -> LLM:
    """Build the backend a spec names (heavy imports happen here), optionally behind a cache.

    >>> llm = open_llm(BackendSpec(backend="transformers", model="embedded"))   # doctest: +SKIP
    """
    opts = dict(spec.options)
    if spec.backend == "transformers":
        from synthloop.core.llm.transformers_backend import TransformersLLM
        llm = TransformersLLM(spec.model, **opts)
    elif spec.backend == "vllm":
        from synthloop.core.llm.vllm_backend import VLLMLLM
        llm = VLLMLLM(spec.model, **opts)
    elif spec.backend == "openai":
        from synthloop.core.llm.openai_backend import OpenAILLM
        llm = OpenAILLM(spec.model, **opts)
    else:
        raise ValueError(f"unknown backend '{spec.backend}' (transformers, vllm, openai)")
    return CachedLLM(llm, cache, spec.backend) if cache is not None else llm


__all__ = ["LLM", "BackendSpec", "Completion", "Stats", "CachedLLM", "RequestCache", "open_llm"]
