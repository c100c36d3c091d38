"""A quantized teacher against the same teacher unquantized, on the same engine and prompts.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/quantized_teacher.py \
        [--model embedded] [--quantization int8_per_channel_weight_only] [--n 32] [--max-tokens 128]

Starts the vllm backend twice, without and with ``quantization`` (vLLM's option, passed through as
it is), sends the same `n` chat requests with every answer forced to `max_tokens` tokens (so both
runs do the same work), and prints completion tokens/s of each, the ratio quantized / plain, and how
many greedy answers (first 32 tokens) agree. Engine start-up is timed separately.
"""
from __future__ import annotations

import argparse
import time

TASKS = ["Name {k} colours and say where each one is found in nature.",
         "Explain in {k} sentences why the sky looks blue.",
         "Give {k} tips for writing a clear email.",
         "Write {k} short questions a student could ask about volcanoes."]


def _run(model: str, options: dict, requests, max_tokens: int) -> dict:
    from synthloop.core.llm.vllm_backend import VLLMLLM

    t = time.time()
    llm = VLLMLLM(model, enforce_eager=True, max_model_len=1024, **options)
    start = time.time() - t
    try:
        llm.generate(requests[:2], {"max_tokens": 8, "temperature": 0})          # warm-up
        t = time.time()
        out = llm.generate(requests, {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        seconds = time.time() - t
        greedy = [c.text for c in llm.generate(requests, {"max_tokens": 32, "temperature": 0})]
    finally:
        llm.close()
    tokens = sum(c.completion_tokens for c in out)
    return {"name": llm.name, "start": start, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "greedy": greedy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--quantization", default="int8_per_channel_weight_only")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    requests = [[{"role": "user", "content": TASKS[i % len(TASKS)].format(k=2 + i // len(TASKS))}] for i in range(args.n)]
    plain = _run(args.model, {}, requests, args.max_tokens)
    quant = _run(args.model, {"quantization": args.quantization}, requests, args.max_tokens)
    print(f"{'backend name':48} {'start s':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for r in (plain, quant):
        print(f"{r['name']:48} {r['start']:8.1f} {r['tokens']:7d} {r['seconds']:8.2f} {r['tok_s']:7.1f}")
    same = sum(a == b for a, b in zip(plain["greedy"], quant["greedy"]))
    print(f"ratio quantized/plain: {quant['tok_s'] / plain['tok_s']:.2f}x completion tokens/s")
    print(f"greedy answers (first 32 tokens) identical: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
