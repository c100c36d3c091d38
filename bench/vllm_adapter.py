"""Generating with a LoRA student in vLLM: the merged model vs `LoRARequest`, against the base model.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/vllm_adapter.py

Trains a 2-step LoRA adapter (r = 16, all 7 projections) on the embedded model unless --adapter is
given, then times the same batch of chat requests (--n prompts, --max-tokens each, temperature
0.7) through our vllm backend three ways, each with a fresh engine: the base model (baseline),
`adapter_mode = "lora"` (a LoRARequest per call) and `adapter_mode = "merge"` (the adapter merged
into a cached model folder in ~/.cache/synthloop/merged/; the merge is timed separately, near 0 s
when already cached). Prints completion tokens/s and the ratios to the base model. On a CPU
`auto` picks merge, on a GPU lora.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _adapter(tmp: Path) -> str:
    from synthloop.core.schema import make_batch
    from synthloop.tuner.heldout import load_heldout
    from synthloop.tuner.sft import TrainConfig, train

    items = load_heldout()[:8]
    frame = make_batch([{"instruction": it["instruction"], "input": it["input"], "response": it["output"]}
                        for it in items])
    train(TrainConfig(max_steps=2, batch_size=4, max_length=256, lora_r=16), frame, tmp / "adapter")
    return str(tmp / "adapter")


def _throughput(options: dict, n: int, max_tokens: int) -> tuple[float, float]:
    """(seconds to open the engine, completion tokens/s of one batch)."""
    from synthloop.core.llm import BackendSpec, open_llm

    t0 = time.time()
    llm = open_llm(BackendSpec(backend="vllm", model="embedded",
                               options={"enforce_eager": True, "max_model_len": 2048, **options}))
    opened = time.time() - t0
    try:
        reqs = [[{"role": "user", "content": f"Write a short story about a lighthouse keeper, part {i}."}]
                for i in range(n)]
        t0 = time.time()
        out = llm.generate(reqs, {"temperature": 0.7, "max_tokens": max_tokens})
        return opened, sum(c.completion_tokens for c in out) / (time.time() - t0)
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="a PEFT LoRA folder for the embedded model (default: train one)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or _adapter(Path(tmp))
        from synthloop.core.models import merged_model
        t0 = time.time()
        merged_model("embedded", adapter)        # into the cache the backend reads next
        merge_s = time.time() - t0
        base = _throughput({}, args.n, args.max_tokens)
        lora = _throughput({"adapter": adapter, "adapter_mode": "lora"}, args.n, args.max_tokens)
        merged = _throughput({"adapter": adapter, "adapter_mode": "merge"}, args.n, args.max_tokens)
    print(f"batch {args.n} x {args.max_tokens} tokens; merge {merge_s:.1f} s")
    for name, (opened, tps) in (("base model (baseline)", base), ("LoRARequest", lora), ("merged", merged)):
        print(f"{name:22s} engine start {opened:5.1f} s  {tps:7.1f} tok/s  {tps / base[1]:5.2f}x base")
    print(f"merged / LoRARequest: {merged[1] / lora[1]:.1f}x")


if __name__ == "__main__":
    main()
