"""Hostile input files never give a traceback: seed files, TOML configs (run and rounds, with
the constraints stage's custom checks), benchmark files in IFEval's format and held-out files.

Each file goes through the `synthloop` entry point in-process; a file it refuses must give exit 2
and exactly one stderr line, ``error: FILE[:LINE]: ...``, naming the line where the problem is on
one. Property-based (hypothesis) cases add random bytes, random text and random JSON/TOML values
in every field to hand-written malformed shapes.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import string
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthloop.core.config import ConfigError, load_config
from synthloop.engine.cli import main
from synthloop.engine.rounds import load_rounds_config
from synthloop.tuner.benchmark import BenchmarkError, load_benchmark
from synthloop.tuner.heldout import load_heldout

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def assert_refused(rc: int, err: str, path: Path, *, line: int | None = None) -> None:
    """Exit 2, one stderr line naming the file (and `line` when given)."""
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    loc = re.escape(str(path)) + (f":{line}" if line else r"(:\d+)?")
    assert re.match(rf"error: {loc}: \S", lines[0]), lines[0]


# ------------------------------------------------------------------------------------ seed files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12)
SEED_KEYS = ["instruction", "input", "output", "instances", "is_classification", "conversations",
             "messages", "from", "value", "role", "content"]
seed_records = st.dictionaries(st.sampled_from(SEED_KEYS) | st.text(max_size=8), json_values, max_size=5)

SEED_CASES = [  # (file name, bytes, line the error must name or None)
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n', 2),
    ("bin.jsonl", b'{"instruction": "a", "output": "b"}\n\xff\xfe\x00\n', 2),
    ("bin.txt", b"first task\nsecond \xc3(\n", 2),
    ("bin.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff"}]', 3),
    ("deep.jsonl", b"[" * 100_000 + b"\n", 1),
    ("digits.jsonl", b'{"instruction": "a", "output": ' + b"1" * 5000 + b"}\n", 1),
    ("surrogate.jsonl", b'{"instruction": "\\ud800 x", "output": "b"}\n', 1),
    ("sharegpt.jsonl", b'{"conversations": [{"from": "human", "value": "\\udfff"}]}\n', 1),
    ("nan.json", b'[{"instruction": NaN, "output": "b"}]', 1),
    ("array.jsonl", b"[1, 2, 3]\n", 1),
    ("instances.jsonl", b'{"instruction": "a", "instances": [{"input": "", "output": 5}]}\n', 1),
    ("clf.jsonl", b'{"instruction": "a", "instances": [{"input": "", "output": "b"}], "is_classification": "yes"}\n', 1),
    ("turns.jsonl", b'{"messages": [{"role": "user"}]}\n', 1),
    ("empty.txt", b"\n  \n", None),
    ("notjson.json", b"{}", 1),
    ("open.json", b'[{"instruction": "a", "output": "b"}', 1),
    ("garbage.parquet", b"PAR1 but not really", None),
]


@pytest.mark.parametrize("name,data,line", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_malformed_seed_file_is_one_line_exit_2(tmp_path, name, data, line):
    path = tmp_path / name
    path.write_bytes(data)
    rc, _, err = cli("seeds", "check", str(path))
    assert_refused(rc, err, path, line=line)


def test_seed_path_that_is_a_directory_or_missing(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    for path in (tmp_path / "dir.jsonl", tmp_path / "missing.jsonl"):
        rc, _, err = cli("seeds", "check", str(path))
        assert_refused(rc, err, path)


def test_seed_parquet_with_wrong_column_types(tmp_path):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"instruction": [1, 2], "output": ["a", "b"]}).write_parquet(path)
    rc, _, err = cli("seeds", "check", str(path))
    assert_refused(rc, err, path, line=1)


def _check_seed_file(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"seeds{suffix}"
        path.write_bytes(data)
        rc, out, err = cli("seeds", "check", str(path))
        if rc == 0:
            assert "seed records" in out and not err
        else:
            assert_refused(rc, err, path)


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".txt", ".parquet"]), data=st.binary(max_size=300))
def test_seed_files_of_random_bytes(suffix, data):
    _check_seed_file(suffix, data)


@FUZZ
@given(records=st.lists(seed_records | json_values, min_size=1, max_size=4),
       as_array=st.booleans(), junk=st.sampled_from(["", "\n}", "\n\ufeff", "\r\n", "\n\x00"]))
def test_seed_files_of_random_records(records, as_array, junk):
    if as_array:
        data = json.dumps(records, ensure_ascii=False, allow_nan=True) + junk
        _check_seed_file(".json", data.encode("utf-8", "surrogatepass"))
    else:
        data = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + junk
        _check_seed_file(".jsonl", data.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------------- TOML configs

VALID = """\
[run]
name = "fuzz"
limit = 5
shard_rows = 10

[llm.generator]
backend = "transformers"
model = "embedded"

[seeds]
path = "bundled"

[source]
type = "self_instruct"
prompts_per_step = 4

[[stages]]
type = "constraints"
k_max = 2
custom = [{ id = "mine:short", check = "custom_checks:has_exclamation", kwargs = { at_least = 2 }, phrasings = ["Use {at_least} exclamation marks."] }]

[[stages]]
type = "heuristics"
"""

CONFIG_CASES = [  # (text, line the error must name or None)
    ("[run\nname = 1", 1),
    ("[run]\nname = 'x'\nlimit = 'ten'\n", 3),
    ("[run]\nbogus = 1\n", 2),
    ("[llm]\ngenerator = 5\n", 2),
    ("llm = 'vllm'\n", 1),
    ("[llm.generator]\nbackend = 'vllm'\noptions = 3\n", 3),
    ("source = 5\n", 1),
    ("stages = [1, 2]\n", 1),
    ("[[stages]]\nname = 'x'\n", None),
    ("[[stages]]\ntype = 7\n", 2),
    ("[[stages]]\ntype = 'no_such_stage'\n", 2),
    ("[source]\ntype = 'mix'\nsources = [1]\n", None),
    ("[source]\ntype = 'mix'\nsources = 'self_instruct'\n", None),
    ("[seeds]\nfields = [1]\n", 2),
    ("[[stages]]\ntype = 'constraints'\ncustom = [{ id = ['a'], check = 'm:f', phrasings = ['x'] }]\n", None),
    ("[[stages]]\ntype = 'constraints'\ncustom = [{ id = 'a', check = 'm:f', phrasings = ['{x.y}'], kwargs = { x = 1 } }]\n", None),
    ("[[stages]]\ntype = 'constraints'\ncustom = [{ id = 'a', check = 'm:f', phrasings = ['{0:{1}}'] }]\n", None),
    ("[[stages]]\ntype = 'constraints'\nweights = { 'punctuation:no_comma' = 'high' }\n", None),
    ("[[stages]]\ntype = 'constraints'\ninclude = [1, 2]\n", None),
    ("[run]\nexecutor = 'warp'\n", 2),
]


@pytest.mark.parametrize("text,line", CONFIG_CASES)
def test_malformed_config_is_one_line_exit_2(tmp_path, text, line):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    rc, _, err = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert_refused(rc, err, path, line=line)
    assert not (tmp_path / "run").exists()      # nothing half-written


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[run]\nname = '\xff'\n")
    rc, _, err = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert_refused(rc, err, path)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v).replace("inf", "inf").replace("nan", "nan")
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


toml_values = st.recursive(
    st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(string.ascii_letters + "_", max_size=8), kids, max_size=3),
    max_leaves=8)
CONFIG_LINES = [i for i, l in enumerate(VALID.splitlines()) if "=" in l]


def _check_config(text: bytes, loader, error_type) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.toml"
        path.write_bytes(text)
        try:
            loader(path)
        except error_type as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        else:
            return                                  # valid: `synthloop run` would start generating
        # The CLI refuses the same file the same way, writing nothing.
        rc, _, err = cli("rounds" if loader is load_rounds_config else "run", str(path), "--out", f"{d}/run")
        assert_refused(rc, err, path)
        assert not Path(d, "run").exists()


@FUZZ
@given(line=st.sampled_from(CONFIG_LINES), value=toml_values)
def test_config_with_a_random_value_in_any_key(line, value):
    lines = VALID.splitlines()
    key = lines[line].split("=", 1)[0]
    lines[line] = f"{key}= {toml_value(value)}"
    _check_config("\n".join(lines).encode("utf-8", "surrogatepass"), load_config, ConfigError)


@FUZZ
@given(table=st.sampled_from(["run", "llm.generator", "seeds", "source", "rounds", "train"]),
       key=st.text(string.ascii_letters + "_", min_size=1, max_size=10), value=toml_values)
def test_config_with_a_random_key(table, key, value):
    text = VALID + f"\n[{table}]\n{key} = {toml_value(value)}\n"
    loader = load_rounds_config if table in ("rounds", "train") else load_config
    _check_config(text.encode("utf-8", "surrogatepass"), loader, ConfigError)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_config_of_random_bytes(data):
    _check_config(b"[run]\nname = 'x'\nnope = 1\n" + data, load_config, ConfigError)
    _check_config(b"[rounds]\nbogus = 1\n" + data, load_rounds_config, ConfigError)


# ------------------------------------------------------------------------- IFEval-format files

GOOD_ITEM = {"key": 1, "prompt": "Name a colour.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}

BENCHMARK_CASES = [  # (lines, line the error must name)
    ([json.dumps(GOOD_ITEM), "{"], 2),
    ([json.dumps({**GOOD_ITEM, "key": True})], 1),
    ([json.dumps({**GOOD_ITEM, "kwargs": [{"x": 1}]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": ["nope:nope"]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": ["length_constraints:number_words"],
                  "kwargs": [{"relation": "about", "num_words": 5}]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": ["length_constraints:number_words"],
                  "kwargs": [{"relation": "at least", "num_words": "many"}]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": 5}]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": ["keywords:letter_frequency"],
                  "kwargs": [{"letter": ["a"], "let_frequency": 2, "let_relation": "at least"}]})], 1),
    ([json.dumps({**GOOD_ITEM, "instruction_id_list": [], "kwargs": []})], 1),
    ([json.dumps(GOOD_ITEM), json.dumps(GOOD_ITEM)], 2),
    (["[" * 50_000], 1),
    (['{"key": ' + "9" * 5000 + "}"], 1),
    ([json.dumps({**GOOD_ITEM, "prompt": "\ud800"})], 1),
]


@pytest.mark.parametrize("lines,line", BENCHMARK_CASES)
def test_malformed_benchmark_file_is_one_line_exit_2(tmp_path, lines, line):
    path = tmp_path / "bench.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    rc, _, err = cli("eval", "--benchmark", "ifeval", str(path), "--backend", "transformers")
    assert_refused(rc, err, path, line=line)


def test_benchmark_file_not_utf8(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_bytes(json.dumps(GOOD_ITEM).encode() + b"\n\xff\n")
    rc, _, err = cli("eval", "--benchmark", "ifeval", str(path), "--backend", "transformers")
    assert_refused(rc, err, path, line=2)


CONSTRAINT_IDS = ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence",
                  "keywords:letter_frequency", "detectable_format:number_bullet_lists", "startend:end_checker",
                  "change_case:capital_word_frequency", "language:response_language", "combination:repeat_prompt"]
KWARG_NAMES = ["relation", "num_words", "keywords", "letter", "let_frequency", "let_relation", "num_bullets",
               "end_phrase", "capital_frequency", "capital_relation", "language", "prompt_to_repeat"]


@FUZZ
@given(key=json_values, prompt=json_values,
       ids=st.lists(st.sampled_from(CONSTRAINT_IDS) | st.text(max_size=10), max_size=3) | json_values,
       kwargs=st.lists(st.dictionaries(st.sampled_from(KWARG_NAMES) | st.text(max_size=5), json_values, max_size=3)
                       | json_values, max_size=3) | json_values)
def test_benchmark_items_with_random_fields(key, prompt, ids, kwargs):
    item = {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.jsonl"
        path.write_bytes((json.dumps(GOOD_ITEM) + "\n" + json.dumps(item, ensure_ascii=False))
                         .encode("utf-8", "surrogatepass"))
        try:
            load_benchmark(path)
        except BenchmarkError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{path}:2: "), str(e)
        else:
            return                                  # valid: the CLI would load a model to answer it
        rc, _, err = cli("eval", "--benchmark", "ifeval", str(path), "--backend", "transformers")
        assert_refused(rc, err, path, line=2)


# ---------------------------------------------------------------------------------- held-out files

@FUZZ
@given(data=st.binary(max_size=200) | st.lists(seed_records | json_values, min_size=1, max_size=3).map(
    lambda rs: "\n".join(json.dumps(r, ensure_ascii=False) for r in rs).encode("utf-8", "surrogatepass")))
def test_heldout_files_fail_with_their_line(data):
    """`eval --heldout` and `[rounds] heldout` read this before any model loads."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "heldout.jsonl"
        path.write_bytes(b'{"instruction": "Add 2 and 3.", "output": "5"}\n' + data)
        try:
            load_heldout(path)
        except ValueError as e:
            assert "\n" not in str(e) and re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(e)), str(e)
