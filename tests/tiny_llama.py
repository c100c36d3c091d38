"""A 2-layer random Llama with SmolLM2's tokenizer, saved as a local HF folder: a real model that
trains and generates in seconds (tests/conftest.py's `tiny_model`, bench/faults.py)."""
from __future__ import annotations

from pathlib import Path


def build_tiny_llama(path: Path, tokenizer=None) -> str:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from synthloop.core.models import prepare_embedded

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(prepare_embedded())
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return str(path)
