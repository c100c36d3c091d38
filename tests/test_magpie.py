"""Magpie: the pre-query prefix from chat templates, junk filtering, resumable state, the clear
error when a server cannot take raw prompts, a scripted end-to-end run, and one real run on the
embedded model (transformers backend)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import polars as pl
import pytest

from scripted_llm import PRE_QUERY, Batches, FnLLM, context, first, scripted_factory
from synthloop.core.config import parse_config
from synthloop.core.llm.base import Completion
from synthloop.core.llm.cache import CachedLLM, RequestCache
from synthloop.generator.magpie import Magpie, MagpieConfig, MagpieError, backend_tokenizer, pre_query
from synthloop.engine.runner import execute
from synthloop.outputs.manifest import count_problems

SMOL_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from synthloop.core.models import prepare_embedded
    return AutoTokenizer.from_pretrained(prepare_embedded())


@pytest.fixture(scope="session")
def embedded_llm():
    """One transformers backend on the embedded model for the whole session (loading dominates)."""
    from synthloop.core.llm.transformers_backend import TransformersLLM
    llm = TransformersLLM("embedded")
    yield llm
    llm.close()


# ---------------------------------------------------------------- the pre-query prefix


def test_pre_query_of_smollm2_keeps_its_default_system_prompt(smol_tokenizer):
    prefix, end = pre_query(smol_tokenizer)
    assert prefix == SMOL_DEFAULT + "<|im_start|>user\n" and end == "<|im_end|>"
    prefix, end = pre_query(smol_tokenizer, "Answer in French.")
    assert prefix == "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n"
    assert "SmolLM" not in prefix and end == "<|im_end|>"


class _Llama3Like:
    """A template with a BOS, header tokens and no default system prompt."""

    eos_token = "<|eot_id|>"

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        out = "<|begin_of_text|>"
        for m in msgs:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


class _Hidden:
    eos_token = "</s>"

    def apply_chat_template(self, msgs, **kw):
        return "[INST] " + msgs[-1]["content"].lower() + " [/INST]"


def test_pre_query_of_other_templates():
    assert pre_query(_Llama3Like()) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    with pytest.raises(MagpieError, match="set pre_query"):
        pre_query(_Hidden())


def test_backend_tokenizer_is_found_through_the_cache(tmp_path):
    class Local(FnLLM):
        tokenizer = _Llama3Like()
    inner = Local(lambda r, p: "x")
    assert backend_tokenizer(inner) is inner.tokenizer
    assert backend_tokenizer(CachedLLM(inner, RequestCache(tmp_path / "c.sqlite"), "transformers")) is inner.tokenizer
    assert backend_tokenizer(FnLLM(lambda r, p: "x")) is None
    with pytest.raises(MagpieError, match="exposes no chat template"):
        Magpie(MagpieConfig(), context({"generator": FnLLM(lambda r, p: "x")}))
    m = Magpie(MagpieConfig(system="Be brief."), context({"generator": inner}))
    assert m.prefix.startswith("<|begin_of_text|><|start_header_id|>system") and m.end_of_turn == "<|eot_id|>"


def test_tokenizer_option_loads_a_local_template():
    m = Magpie(MagpieConfig(tokenizer="embedded"), context({"generator": FnLLM(lambda r, p: "x")}))
    assert m.prefix.endswith("<|im_start|>user\n") and m.end_of_turn == "<|im_end|>"


# ---------------------------------------------------------------- the source


def _instructions(req, p):
    if isinstance(req, str):
        return {0: "How do rainbows form after a storm?<|im_end|>\n<|im_start|>assistant", 1: "",
                2: "Hi!", 3: "¿Qué hora es en Tokio ahora mismo?", 4: Completion("How do I", "length", 5, 128),
                5: "How do rainbows form after a storm?", 6: Completion("", "error", error="boom"),
                7: "Draw a map of Europe for me please."}[p["seed"] % 8]
    return f"Answer to: {req[-1]['content']}"


class _SeqLLM(FnLLM):
    """Gives request i of each call the seed residue i, so each test row has a known fate."""

    def generate(self, requests, params):
        if requests and isinstance(requests[0], str):
            params = [dict(p, seed=i) for i, p in enumerate(params)]
        return super().generate(requests, params)


def test_step_filters_junk_answers_survivors_and_counts_steps():
    llm = _SeqLLM(_instructions, "gen")
    m = Magpie(MagpieConfig(pre_query=PRE_QUERY, end_of_turn="<|im_end|>", requests_per_step=8, system="Be kind."),
               context({"generator": llm}))
    batches = Batches(m)
    batch = next(batches)
    assert batch["drop_reason"].to_list() == [None, "empty_instruction", "too_short", "non_ascii_start", "truncated",
                                              "duplicate_instruction", "generation_error", "unsupported_modality"]
    kept = batch.row(0, named=True)
    assert kept["instruction"] == "How do rainbows form after a storm?"
    assert kept["response"] == "Answer to: How do rainbows form after a storm?"
    assert kept["method"] == "magpie" and kept["model"] == "gen" and kept["parent_id"] is None
    # Step 0's raw prompts, and those of the steps_in_flight steps after it: out while step 0's
    # batch is handed over. Then step 0's one answer.
    raw = [(r, p) for r, p in llm.sent if isinstance(r, str)]
    assert len(raw) == 8 * (1 + m.cfg.steps_in_flight)
    assert all(r == PRE_QUERY and p["stop"] == ["<|im_end|>"] for r, p in raw)
    chats = [r for r, _ in llm.sent if not isinstance(r, str)]
    assert chats == [[{"role": "system", "content": "Be kind."},
                      {"role": "user", "content": "How do rainbows form after a storm?"}]]
    assert m.state() == {"step": 1}
    # The same instruction in a later step is a duplicate too.
    assert next(batches)["drop_reason"][0] == "duplicate_instruction"
    batches.close()


def test_answer_failures_are_dropped():
    answers = iter([Completion("", "error", error="x"), Completion("half", "length", 3, 320), Completion(" ", "stop")])

    def fn(req, p):
        return f"Question number {p['seed']} about tides?" if isinstance(req, str) else next(answers)
    m = Magpie(MagpieConfig(pre_query=PRE_QUERY, requests_per_step=3), context({"generator": FnLLM(fn)}))
    assert first(m)["drop_reason"].to_list() == ["generation_error", "truncated", "empty_response"]


def test_answer_role_is_configurable():
    ans = FnLLM(lambda r, p: "From the answerer.", "ans")
    gen = FnLLM(lambda r, p: f"Tell me about river number {p['seed']} please.", "gen")
    m = Magpie(MagpieConfig(pre_query=PRE_QUERY, requests_per_step=2, answer_role="answerer"),
               context({"generator": gen, "answerer": ans}))
    b = first(m)
    assert b["model"].to_list() == ["ans", "ans"] and len(ans.sent) == 2
    assert all(isinstance(r, str) for r, _ in gen.sent)          # the generator only wrote instructions


def test_every_request_failing_raises_one_clear_line():
    err = ("server has no /completions endpoint for raw prompts (HTTP 404: not found)")
    m = Magpie(MagpieConfig(pre_query=PRE_QUERY, requests_per_step=3),
               context({"generator": FnLLM(lambda r, p: Completion("", "error", error=err))}))
    with pytest.raises(MagpieError) as e:
        first(m)
    msg = str(e.value)
    assert "\n" not in msg and "all 3 instruction requests failed" in msg and "/v1/completions" in msg


class _NoCompletions(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": "Not Found"}}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_server_without_completions_endpoint():
    """A real OpenAILLM against a local server that only 404s: the source stops with a clear error."""
    from synthloop.core.llm.openai_backend import OpenAILLM
    server = HTTPServer(("127.0.0.1", 0), _NoCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = OpenAILLM("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", max_retries=0)
        m = Magpie(MagpieConfig(pre_query=PRE_QUERY, requests_per_step=2), context({"generator": llm}))
        with pytest.raises(MagpieError, match=r"lacks /v1/completions.*transformers/vllm backend"):
            first(m)
    finally:
        server.shutdown()


# ---------------------------------------------------------------- end to end (scripted backend)

RUN = """
[run]
name = "magpie"
limit = {limit}
shard_rows = 8
cache = "{cache}"

[llm.generator]
backend = "transformers"

[source]
type = "magpie"
pre_query = "<|im_start|>user\\n"
end_of_turn = "<|im_end|>"
requests_per_step = 10

[[stages]]
type = "evol"
fraction = 0.3

[[stages]]
type = "distill"
"""


def _cfg(tmp_path, limit=30):
    return parse_config(RUN.format(limit=limit, cache=tmp_path / "req.sqlite"), path="magpie.toml")


def _kept(run):
    m = json.loads((run / "manifest.json").read_text())
    return pl.concat([pl.read_parquet(run / e["path"]) for e in m["shards"]])


def test_end_to_end_magpie_source_run(tmp_path):
    run = tmp_path / "run"
    m = execute(_cfg(tmp_path), out=run, show_progress=False, backend_factory=scripted_factory())
    assert m["complete"] and count_problems(m) == []
    kept = _kept(run)
    assert kept.height >= 30 and kept["id"].is_unique().all() and (kept["response"] != "").all()
    assert {"magpie"} < set(kept["method"]) and all(x == "magpie" or x.startswith("evol:") for x in kept["method"])
    src = m["stages"][0]
    assert src["name"] == "magpie" and {"empty_instruction", "too_short"} <= set(src["dropped"])
    assert m["state"]["magpie"]["step"] >= 3


def test_magpie_run_resumes_exactly(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    execute(_cfg(tmp_path), out=clean, show_progress=False, backend_factory=scripted_factory())
    from synthloop.outputs import run_store
    real = run_store.RunStore._commit
    calls = {"n": 0}

    def crashing(self, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("crash")
        return real(self, **kw)
    monkeypatch.setattr(run_store.RunStore, "_commit", crashing)
    with pytest.raises(RuntimeError):
        execute(_cfg(tmp_path), out=tmp_path / "b", show_progress=False, backend_factory=scripted_factory())
    monkeypatch.setattr(run_store.RunStore, "_commit", real)
    m = execute(_cfg(tmp_path), out=tmp_path / "b", show_progress=False, backend_factory=scripted_factory())
    assert count_problems(m) == [] and _kept(tmp_path / "b").equals(_kept(clean))
    assert m["stages"] == json.loads((clean / "manifest.json").read_text())["stages"]


# ---------------------------------------------------------------- the embedded model, for real


@pytest.mark.model
def test_magpie_on_the_embedded_model(embedded_llm):
    """Two raw pre-query prompts and their answers on SmolLM2-135M (tiny budgets: CPU time is scarce)."""
    cfg = MagpieConfig(requests_per_step=2, max_steps=1,
                       instruction_sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 40},
                       answer_sampling={"temperature": 0.7, "max_tokens": 12})
    m = Magpie(cfg, context({"generator": embedded_llm}))
    assert m.prefix == SMOL_DEFAULT + "<|im_start|>user\n" and m.end_of_turn == "<|im_end|>"
    before = embedded_llm.stats.requests
    batch = first(m)
    assert batch.height == 2 and (batch["method"] == "magpie").all()
    # The model, shown only the start of a user turn, wrote user text: no template tokens leak.
    assert any(len(t.split()) >= 2 for t in batch["instruction"])
    assert not any("<|im_" in t for t in batch["instruction"])
    for r in batch.iter_rows(named=True):
        assert r["drop_reason"] is not None or (r["instruction"] and r["response"])
    # Two raw requests, then one chat request per instruction that passed the filters.
    assert 2 <= embedded_llm.stats.requests - before <= 4
