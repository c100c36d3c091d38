"""Benchmark evaluation in IFEval's input format (tuner/benchmark.py, `synthloop eval --benchmark`).

No model: responses are hand-written, or come from the scripted backends in scripted_llm.py.
"""
from __future__ import annotations

import json

import pytest
from scripted_llm import FnLLM, ScriptedLLM

from synthloop.filters import checks
from synthloop.engine.cli import main
from synthloop.core.llm import BackendSpec, Completion
from synthloop.tuner import benchmark as bm
from synthloop.tuner import cli as tuner_cli

#: Four prompts whose verdicts are known by hand (strict / loose per instruction in the comments).
ITEMS = [
    {"key": 1, "prompt": "Describe a river in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 2, "prompt": "Say where rivers go, in under 10 words and without commas.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     # IFEval's own file pads kwargs with the other instructions' arguments set to null.
     "kwargs": [{"keywords": None}, {"relation": "less than", "num_words": 10, "keywords": None}]},
    {"key": "three", "prompt": "Name a fruit you like; mention bananas; no commas.",
     "instruction_id_list": ["keywords:existence", "punctuation:no_comma"],
     "kwargs": [{"keywords": ["banana"]}, {}]},
    {"key": 4, "prompt": "Write a poem with a title in double angular brackets.",
     "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
]
RESPONSES = [
    "Sure, here you go:\nthe river runs slow and cold past the old mill and the children watch it.",  # F, loose T
    "Rivers run to the sea.",                              # T T / T T
    "I like bananas, pears.",                              # T F / T F
    "",                                                    # empty: F / F
]


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def has_banana(response: str, **kwargs) -> bool:
    """A custom check registered through --check (this module is importable under pytest)."""
    return "banana" in response.lower()


@pytest.fixture(autouse=True)
def clean_custom_checks(monkeypatch):
    """Custom checks are process-wide: keep ours from leaking into other tests."""
    monkeypatch.setattr(checks, "_CUSTOM", dict(checks._CUSTOM))


@pytest.fixture
def bench(tmp_path) -> str:
    return write(tmp_path / "bench.jsonl", ITEMS)


def test_load_drops_nulls_and_keeps_ifeval_fields(bench):
    items = bm.load_benchmark(bench)
    assert [it["key"] for it in items] == [1, 2, "three", 4]
    assert items[1]["kwargs"] == [{}, {"relation": "less than", "num_words": 10}]
    assert sorted(items[0]) == ["instruction_id_list", "key", "kwargs", "prompt"]


def test_score_matches_ifeval_definitions(bench):
    res = bm.score(bm.load_benchmark(bench), RESPONSES)
    assert (res["n_prompts"], res["n_instructions"]) == (4, 6)
    assert res["prompt_strict"] == pytest.approx(1 / 4)         # only prompt 2 passes everything
    assert res["prompt_loose"] == pytest.approx(2 / 4)          # prompt 1 passes without its preamble
    assert res["instruction_strict"] == pytest.approx(3 / 6)
    assert res["instruction_loose"] == pytest.approx(4 / 6)
    assert res["per_constraint"] == {
        "change_case:english_lowercase": {"n": 1, "strict": 0.0, "loose": 1.0},
        "detectable_format:title": {"n": 1, "strict": 0.0, "loose": 0.0},
        "keywords:existence": {"n": 1, "strict": 1.0, "loose": 1.0},
        "length_constraints:number_words": {"n": 1, "strict": 1.0, "loose": 1.0},
        "punctuation:no_comma": {"n": 2, "strict": 0.5, "loose": 0.5},
    }
    assert res["sentence_splitter"] in ("punkt-english", "punkt-untrained")
    assert [(p["key"], p["strict"], p["loose"]) for p in res["per_prompt"]] == [
        (1, [False], [True]), (2, [True, True], [True, True]),
        ("three", [True, False], [True, False]), (4, [False], [False])]


def test_score_rejects_a_response_count_mismatch(bench):
    with pytest.raises(ValueError, match="3 responses for 4"):
        bm.score(bm.load_benchmark(bench), RESPONSES[:3])


def test_format_table(bench):
    table = bm.format_table(bm.score(bm.load_benchmark(bench), RESPONSES))
    lines = table.splitlines()
    assert lines[0] == "| instruction | n | strict % | loose % |"
    assert "| change_case:english_lowercase | 1 | 0.0 | 100.0 |" in lines
    assert "| punctuation:no_comma | 2 | 50.0 | 50.0 |" in lines
    assert lines[-2:] == ["| **prompt-level** | 4 | 25.0 | 50.0 |", "| **instruction-level** | 6 | 50.0 | 66.7 |"]


GOOD = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("rows, message", [
    ([GOOD, '{"key": 2, "prompt": '], "{f}:2: not valid JSON (Expecting value at column 22)"),
    ([{k: v for k, v in GOOD.items() if k != "prompt"}], "{f}:1: field 'prompt': missing"),
    ([{**GOOD, "prompt": "  "}], "{f}:1: field 'prompt': must be a non-empty string"),
    ([{**GOOD, "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"]}],
     "{f}:1: field 'kwargs': 1 entries for 2 instruction ids"),
    ([GOOD, {**GOOD, "key": 2, "instruction_id_list": ["nope:nothing"]}],
     "{f}:2: field 'instruction_id_list[0]': unknown constraint id 'nope:nothing'"),
    ([{**GOOD, "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
       "kwargs": [{}, {"num_words": 5, "relation": None}]}],
     "{f}:1: field 'kwargs[1]': length_constraints:number_words: missing kwargs ['relation']"),
    ([{**GOOD, "kwargs": [{"num_words": 5}]}],
     "{f}:1: field 'kwargs[0]': punctuation:no_comma: unknown kwargs ['num_words'] (takes [])"),
    ([GOOD, {**GOOD, "key": 2}, {**GOOD, "key": "1"}], "{f}:3: field 'key': \"1\" repeats line 1"),
    ([{**GOOD, "key": None}], "{f}:1: field 'key': must be an integer or a non-empty string, got null"),
    ([], "{f}: no benchmark prompts"),
])
def test_malformed_files_give_one_line_naming_file_line_and_field(tmp_path, rows, message):
    path = write(tmp_path / "bench.jsonl", rows)
    with pytest.raises(bm.BenchmarkError) as e:
        bm.load_benchmark(path)
    assert str(e.value) == message.format(f=path)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write(tmp_path / "b.jsonl", [GOOD, "", {**GOOD, "key": 2, "kwargs": [[]]}])
    with pytest.raises(bm.BenchmarkError, match=r"b\.jsonl:3: field 'kwargs\[0\]': must be an object"):
        bm.load_benchmark(path)


def test_bundled_benchmark_loads_if_present():
    if not bm.bundled_benchmark().exists():
        pytest.skip("tuner/data/ifeval_heldout.jsonl not written yet")
    assert bm.load_benchmark()


def test_custom_check_is_honoured_by_load_and_score(tmp_path):
    path = write(tmp_path / "b.jsonl", [{"key": 1, "prompt": "p", "instruction_id_list": ["test:banana"],
                                         "kwargs": [{}]}])
    with pytest.raises(bm.BenchmarkError, match="unknown constraint id 'test:banana'"):
        bm.load_benchmark(path)
    checks.register_check("test:banana", f"{__name__}:has_banana")
    items = bm.load_benchmark(path)
    assert bm.score(items, ["A Banana."])["per_constraint"] == {"test:banana": {"n": 1, "strict": 1.0, "loose": 1.0}}
    assert bm.score(items, ["An apple."])["prompt_loose"] == 0.0


def test_answer_benchmark_through_the_seam(bench):
    """Prompt as the single user turn, greedy settings; a failed request answers ""."""
    items = bm.load_benchmark(bench)

    def fn(request, params):
        prompt = request[0]["content"]
        return Completion("partial", "error", error="boom") if "poem" in prompt else prompt.lower()

    llm = FnLLM(fn)
    answers = bm.answer_benchmark(llm, items)
    assert llm.sent[0] == ([{"role": "user", "content": ITEMS[0]["prompt"]}], bm.BENCHMARK_PARAMS)
    assert answers[0] == ITEMS[0]["prompt"].lower() and answers[3] == ""


def test_scripted_backend_end_to_end(tmp_path):
    """ScriptedLLM answers 12 random words and a full stop (not English to langdetect, so no
    language checks here); every 2nd request fails (-> "")."""
    row = {"prompt": "Write about anything.",
           "kwargs": [{"end_phrase": "."}, {}, {"relation": "at least", "num_words": 12}],
           "instruction_id_list": ["startend:end_checker", "punctuation:no_comma",
                                   "length_constraints:number_words"]}
    items = bm.load_benchmark(write(tmp_path / "b.jsonl", [{**row, "key": k, "prompt": f"Task {k}."}
                                                            for k in range(4)]))
    answers = bm.answer_benchmark(ScriptedLLM(fail_every=2), items)
    assert [bool(a) for a in answers] == [True, False, True, False]
    res = bm.score(items, answers)
    assert (res["prompt_strict"], res["instruction_strict"], res["instruction_loose"]) == (0.5, 0.5, 0.5)


@pytest.fixture
def fake_student(monkeypatch):
    """open_llm in benchmark.py builds a FnLLM that echoes the hand-written responses."""
    opened = []

    def open_fake(spec):
        by_prompt = {it["prompt"]: r for it, r in zip(ITEMS, RESPONSES)}
        llm = FnLLM(lambda req, p: by_prompt[req[0]["content"]])
        llm.spec, llm.closed = spec, False
        llm.close = lambda: setattr(llm, "closed", True)
        opened.append(llm)
        return llm

    monkeypatch.setattr(bm, "open_llm", open_fake)
    return opened


def test_evaluate_benchmark(bench, fake_student):
    res = bm.evaluate_benchmark(path=bench, adapter="runs/a/adapter", limit=3, keep_per_prompt=False)
    (llm,) = fake_student
    assert llm.closed and llm.spec == BackendSpec(backend="transformers", model="embedded",
                                                   options={"adapter": "runs/a/adapter"})
    assert "per_prompt" not in res
    assert (res["n_prompts"], res["benchmark"], res["adapter"]) == (3, bench, "runs/a/adapter")
    assert res["completion_tokens"] == 15 and res["failed_requests"] == 0      # FnLLM: 5 tokens each
    assert res["prompt_strict"] == pytest.approx(1 / 3) and res["instruction_loose"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="limit"):
        bm.evaluate_benchmark(path=bench, limit=0)


def test_cli_benchmark(bench, tmp_path, fake_student, capsys):
    out = tmp_path / "responses.jsonl"
    rc = main(["eval", "--benchmark", "ifeval", bench, "--backend", "transformers", "--adapter", "ad",
               "--check", f"test:banana={__name__}:has_banana", "--responses", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)                          # exactly one JSON object on stdout
    assert summary["prompt_loose"] == 0.5 and summary["n_instructions"] == 6 and summary["backend"] == "transformers"
    assert "per_prompt" not in summary and "punctuation:no_comma" in summary["per_constraint"]
    assert "| **prompt-level** | 4 | 25.0 | 50.0 |" in captured.err
    assert fake_student[0].spec.options == {"adapter": "ad"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == [1, 2, "three", 4]
    assert rows[0] == {"key": 1, "prompt": ITEMS[0]["prompt"], "response": RESPONSES[0],
                       "instruction_id_list": ["change_case:english_lowercase"], "strict": [False], "loose": [True]}
    assert checks.check_one("banana", "test:banana", {}).strict         # --check registered it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.jsonl", "responses.jsonl"]   # no temp file left


@pytest.mark.parametrize("extra, message", [
    (["--check", "nocolon"], "--check 'nocolon' must be ID=module:function"),
    (["--check", "x:y=nosuchmodule_zz:fn"], "check 'nosuchmodule_zz:fn': cannot import"),
    (["--check", "punctuation:no_comma=json:dumps"], "is one of IFEval's"),
])
def test_cli_bad_check_exits_2(bench, tmp_path, fake_student, capsys, extra, message):
    out = tmp_path / "r.jsonl"
    rc = main(["eval", "--benchmark", "ifeval", bench, "--backend", "transformers", "--responses", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and not out.exists() and not fake_student
    assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1


def test_cli_malformed_file_exits_2_and_writes_nothing(tmp_path, fake_student, capsys):
    bad = write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "key": 2, "kwargs": []}])
    out = tmp_path / "r.jsonl"
    rc = main(["eval", "--benchmark", "ifeval", bad, "--backend", "transformers", "--responses", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and not out.exists()
    assert captured.err == f"error: {bad}:2: field 'kwargs': 0 entries for 1 instruction ids\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]      # no temp file left either


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "mmlu"], "--benchmark takes 'ifeval' and an optional file, got mmlu"),
    (["--benchmark", "ifeval", "a.jsonl", "b.jsonl"], "got ifeval a.jsonl b.jsonl"),
    (["--benchmark", "ifeval", "--judge", "openai:j"], "--judge cannot be used with --benchmark"),
    (["--responses", "r.jsonl"], "--responses only with --benchmark"),
    (["--benchmark", "ifeval", "--responses", "no/such/dir/r.jsonl"], "--responses: folder no/such/dir"),
])
def test_cli_argument_errors_exit_2(fake_student, capsys, argv, message):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not fake_student


@pytest.mark.parametrize("installed, expected", [(True, "vllm"), (False, "transformers")])
def test_default_backend_prefers_vllm(monkeypatch, installed, expected):
    real = tuner_cli.importlib.util.find_spec

    def find_spec(name, *args):
        return (object() if installed else None) if name == "vllm" else real(name, *args)

    monkeypatch.setattr(tuner_cli.importlib.util, "find_spec", find_spec)
    assert tuner_cli._default_backend() == expected
