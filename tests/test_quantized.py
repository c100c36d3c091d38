"""Quantized teachers and judges: a GGUF file through the transformers backend (for real, the embedded
model's shipped Q4_1 file), vLLM's quantization options reaching its engine arguments, what the
manifest and the records say about the model that wrote them, and every example config parsing."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from synthloop.core.models import EMBEDDED_GGUF, model_name, prepare_embedded, quantization_of, resolve_model

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_parses(path):
    """Every shipped config goes through the validator that `synthloop run` / `rounds` use."""
    import tomllib

    from synthloop.core.config import load_config
    from synthloop.engine.rounds import load_rounds_config

    if "rounds" in tomllib.loads(path.read_text()):
        load_rounds_config(path)
    else:
        load_config(path)


def test_quantization_is_read_from_options_gguf_files_and_checkpoints(tmp_path):
    gguf = resolve_model(EMBEDDED_GGUF)
    assert gguf.endswith(".gguf") and quantization_of(gguf) == "gguf:Q4_1"
    assert quantization_of(Path(gguf).parent, {"gguf_file": Path(gguf).name}) == "gguf:Q4_1"
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    assert quantization_of(awq) == "awq"
    assert quantization_of(awq, {"quantization": "awq_marlin"}) == "awq_marlin"     # the option wins
    assert quantization_of(prepare_embedded()) is None
    assert model_name("m", quantization="awq") == "m[awq]" and model_name("m") == "m"


def test_transformers_backend_serves_the_gguf_file_as_the_prepared_model():
    """The shipped Q4_1 file, dequantized on load, answers exactly like the folder prepared from it."""
    from synthloop.core.llm.transformers_backend import TransformersLLM

    params = {"max_tokens": 12, "temperature": 0}
    quant = TransformersLLM(EMBEDDED_GGUF, batch_size=1)
    assert quant.name == "embedded-gguf[gguf:Q4_1]" and quant.quantization == "gguf:Q4_1"
    (a,) = quant.generate([CHAT], params)
    quant.close()
    plain = TransformersLLM("embedded", batch_size=1)
    (b,) = plain.generate([CHAT], params)
    assert plain.name == "embedded" and a.ok and a.completion_tokens > 3 and a.text == b.text


def test_vllm_engine_gets_the_quantization_options_and_refuses_gguf(monkeypatch, tmp_path):
    """Options reach AsyncEngineArgs as they are (the engine is a stand-in: starting vLLM costs a
    minute; bench/quantized_teacher.py runs it for real) and the name carries the quantization."""
    pytest.importorskip("vllm")
    from test_backends import _FakeAsyncLLM

    from synthloop.core.llm import vllm_backend

    seen = []

    async def start(args):
        seen.append(args)
        return _FakeAsyncLLM()
    monkeypatch.setattr(vllm_backend, "_start", start)
    tok = str(prepare_embedded())
    llm = vllm_backend.VLLMLLM("embedded", quantization="int8_per_channel_weight_only", dtype="bfloat16",
                               load_format="safetensors", tokenizer=tok)
    try:
        args = seen[-1]
        assert (args.model, args.quantization, args.dtype, args.load_format, args.tokenizer) == \
            (tok, "int8_per_channel_weight_only", "bfloat16", "safetensors", tok)
        assert llm.name == "embedded[int8_per_channel_weight_only]"
    finally:
        llm.close()
    with pytest.raises(ValueError, match="cannot load GGUF files"):
        vllm_backend.VLLMLLM(EMBEDDED_GGUF, tokenizer=tok)
    assert len(seen) == 1                                   # refused before any engine starts


def test_manifest_and_records_name_the_quantized_teacher(tmp_path):
    """A real run: the teacher is the GGUF file through transformers; every answered record's `model`
    is the name `model_details` describes with its path, fingerprint and quantization."""
    from synthloop.core.config import parse_config
    from synthloop.engine.runner import execute
    from synthloop.outputs.run_reader import read_kept

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Name {w} colours.", "output": "Red."}) + "\n"
                             for w in ("two", "three")))
    cfg = parse_config(f"""
[run]
name = "q"
limit = 2
cache = "off"
[llm.generator]
backend = "transformers"
model = "embedded"
[llm.teacher]
backend = "transformers"
model = "{EMBEDDED_GGUF}"
options = {{ batch_size = 2 }}
[seeds]
path = "{seeds}"
[source]
type = "seeds"
[[stages]]
type = "distill"
sampling = {{ temperature = 0.0, max_tokens = 48 }}
""", path="q.toml")
    manifest = execute(cfg, out=tmp_path / "run", show_progress=False)
    teacher = manifest["model_details"]["teacher"]
    assert teacher["name"] == "embedded-gguf[gguf:Q4_1]" and teacher["quantization"] == "gguf:Q4_1"
    assert teacher["path"] == str(Path(resolve_model(EMBEDDED_GGUF)).resolve()) and len(teacher["fingerprint"]) == 16
    assert manifest["model_details"]["generator"]["quantization"] is None
    kept = read_kept(tmp_path / "run")
    rejects = pl.concat([pl.read_parquet(p) for p in (tmp_path / "run" / "rejects").glob("*.parquet")]) \
        if (tmp_path / "run" / "rejects").exists() else pl.DataFrame({"model": []})
    assert kept.height + rejects.height == 2
    assert set(kept["model"]) <= {teacher["name"]} and kept.height >= 1


def test_model_identity_of_each_backend_kind():
    """What `model_details` says per role without starting a backend: a vLLM quantization option, a
    hosted API (its name as the openai backend writes it, and base_url; never a key)."""
    from synthloop.core.llm import BackendSpec
    from synthloop.outputs.manifest import model_identity

    vllm = model_identity(BackendSpec(backend="vllm", model="embedded",
                                      options={"quantization": "int8_per_channel_weight_only"}))
    assert vllm["name"] == "embedded[int8_per_channel_weight_only]" and vllm["path"] == str(prepare_embedded().resolve())
    assert vllm["quantization"] == "int8_per_channel_weight_only" and len(vllm["fingerprint"]) == 16
    hosted = model_identity(BackendSpec(backend="openai", model="gpt-4o-mini",
                                        options={"base_url": "https://api.example.com/v1", "api_key_env": "K"}))
    assert hosted == {"backend": "openai", "model": "gpt-4o-mini", "name": "openai:gpt-4o-mini",
                      "base_url": "https://api.example.com/v1"}
