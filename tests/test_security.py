"""Security: output paths stay inside the run directory, API keys never reach a file or a log,
model output is never evaluated or used as a format string, and the report escapes record text.

Runs go through the `synthloop` entry point in-process. The OpenAI-compatible backend talks to a
local HTTP server that answers like one (as in test_backends.py), so the real client sends the
real Authorization header.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from synthloop.engine.cli import main
from synthloop.filters.deita import COMPLEXITY, QUALITY
from synthloop.filters.judge import judge_chat
from synthloop.generator.distill import grade_request
from synthloop.generator.evol_prompts import evolve_request, same_request
from synthloop.outputs.paths import UnsafePath, inside
from synthloop.tuner.judge import JUDGE_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def refused(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


SEEDS = "Write a haiku about rain.\nName three rivers in Europe.\nExplain what a budget is.\n"


DEAD_SERVER = 'backend = "openai"\nmodel = "m"\noptions = { base_url = "http://127.0.0.1:9/v1", max_retries = 0 }'


def _config(tmp_path: Path, *, name: str = "sec", stages: str = "", llm: str = DEAD_SERVER, cache: str = "off") -> Path:
    """A run of the seed file's three tasks through `stages` (none: the seeds are the dataset)."""
    seeds = tmp_path / "seeds.txt"
    if not seeds.exists():
        seeds.write_text(SEEDS)
    cfg = tmp_path / "sec.toml"
    cfg.write_text(f"""
[run]
name = {json.dumps(name)}
shard_rows = 2
cache = "{cache}"

[llm.generator]
{llm}

[seeds]
path = "{seeds}"

[source]
type = "seeds"
{stages}
""")
    return cfg


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------- path confinement

@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "bad\\name", "line\nbreak"])
def test_run_name_that_would_leave_runs_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, name=name)
    before = _tree(tmp_path)
    rc, _, err = cli("run", cfg)
    refused(rc, err, f"{cfg}:3:", "'name' must be a plain name")
    assert _tree(tmp_path) == before            # nothing written anywhere


def test_stage_names_are_not_paths(tmp_path):
    """A stage called '../../evil' only names a stage: everything the run writes is in its directory."""
    cfg = _config(tmp_path, stages='[[stages]]\ntype = "exact_dedup"\nname = "../../evil"\n')
    run = tmp_path / "sub" / "run"
    before = _tree(tmp_path)
    rc, out, err = cli("run", cfg, "--out", run, "--quiet")
    assert rc == 0, err
    assert json.loads(out)["records"] == 3
    created = _tree(tmp_path) - before
    assert created and all(p == "sub" or p.startswith("sub/run") for p in created), created


@pytest.mark.parametrize("sub", ["data", "rejects", "pending", "manifest.json"])
def test_symlink_out_of_the_run_directory_is_refused(tmp_path, sub):
    """Resume removes uncommitted files in data/, rejects/ and pending/: through a symlink that
    would empty a folder elsewhere."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.parquet").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / sub).symlink_to(outside if sub != "manifest.json" else outside / "keep.parquet")
    rc, _, err = cli("run", _config(tmp_path), "--out", run, "--quiet")
    refused(rc, err, str(run), repr(sub), "leads outside the run directory")
    assert (outside / "keep.parquet").read_text() == "mine" and len(list(outside.iterdir())) == 1


def _finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    rc, _, err = cli("run", _config(tmp_path), "--out", run, "--quiet", "--limit", "3")
    assert rc == 0, err
    return run


@pytest.mark.parametrize("bad", ["../victim.parquet", "/tmp/victim.parquet", "data/../../victim.parquet"])
def test_manifest_paths_that_leave_the_run_are_refused(tmp_path, bad):
    run = _finished_run(tmp_path)
    victim = tmp_path / "victim.parquet"
    victim.write_text("not yours")
    m = json.loads((run / "manifest.json").read_text())
    m["shards"][0]["path"] = bad
    m["complete"] = False
    (run / "manifest.json").write_text(json.dumps(m))
    for argv in (("run", _config(tmp_path), "--out", run, "--quiet", "--limit", "3"),
                 ("report", run), ("export", "--format", "sft", run, "--out", tmp_path / "exp")):
        rc, _, err = cli(*argv)
        refused(rc, err, "is outside the run directory")
    assert victim.read_text() == "not yours"
    assert not (tmp_path / "exp").exists()


def test_report_folder_symlinked_out_is_refused(tmp_path):
    run = _finished_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere)
    rc, _, err = cli("report", run)
    refused(rc, err, "'report' leads outside the run directory")
    assert list(elsewhere.iterdir()) == []


def test_inside_accepts_plain_paths_and_symlinks_within():
    root = Path("/tmp") / "synthloop-inside-test"
    root.mkdir(exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    link = root / "alias"
    if not link.is_symlink():
        link.symlink_to(root / "data")
    assert inside(root, "alias/x.parquet") == root / "alias/x.parquet"
    for bad in ("", "..", "a/../../b", "/etc/passwd", 5):
        with pytest.raises(UnsafePath):
            inside(root, bad)


# ------------------------------------------------------------------------------------ API keys

KEY = "sk-synthloop-test-7f3a9c2e51b84d06"
HOSTILE = "{0} %s %(x)s {response} {task.__class__.__mro__} {{}} ${HOME} `id`"


class OpenAIish(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions like an OpenAI server; remembers the headers and bodies it saw.
    With `reject`, answers 401 and echoes the key back, as some hosted APIs do."""

    seen: list = []
    reject = False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.headers.get("Authorization"), body))
        if type(self).reject:
            msg = json.dumps({"error": f"Incorrect API key provided: {self.headers.get('Authorization')}"}).encode()
            self.send_response(401)
        else:
            user = body["messages"][-1]["content"]
            text = "Score: 7" if "Grade the response" in user else HOSTILE
            msg = json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 5}}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        self.wfile.write(msg)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def openai_server(reject: bool = False):
    handler = type("Handler", (OpenAIish,), {"seen": [], "reject": reject})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/v1", handler
    finally:
        srv.shutdown()
        srv.server_close()


def _grep_key(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


@pytest.mark.parametrize("source,reject", [("env", False), ("env", True), ("file", False)],
                         ids=["env", "env-rejected-with-key-echoed", "file"])
def test_api_key_reaches_the_server_and_nothing_else(tmp_path, tmp_path_factory, monkeypatch, source, reject):
    if source == "env":
        monkeypatch.setenv("SYNTHLOOP_TEST_API_KEY", KEY)
        where = 'api_key_env = "SYNTHLOOP_TEST_API_KEY"'
    else:
        key_file = tmp_path_factory.mktemp("secrets") / "key.txt"     # outside the tree searched below
        key_file.write_text(KEY + "\n")
        where = f'api_key_file = "{key_file}"'
    with openai_server(reject) as (url, handler):
        llm = f'backend = "openai"\nmodel = "m"\noptions = {{ base_url = "{url}", {where}, max_retries = 0 }}'
        cfg = _config(tmp_path, llm=llm, cache=str(tmp_path / "req.sqlite"),
                      stages='[[stages]]\ntype = "distill"\nrole = "generator"\n[[stages]]\ntype = "judge"\n')
        run = tmp_path / "run"
        rc, out, err = cli("run", cfg, "--out", run)
        rc2, out2, err2 = cli("report", run)
    assert rc == 0 and rc2 == 0, err + err2
    assert handler.seen and all(auth == f"Bearer {KEY}" for auth, _ in handler.seen)
    for text in (out, err, out2, err2):
        assert KEY not in text
    assert _grep_key(tmp_path) == []            # run dir, manifest, shards, rejects, report, request cache
    manifest = json.loads((run / "manifest.json").read_text())
    if reject:
        assert manifest["llm"]["total"]["errors"] > 0


@pytest.mark.parametrize("verbose", [False, True])
def test_engine_logs_go_to_the_run_directory(tmp_path, verbose):
    """Library logs (here httpx's request lines) land in RUN_DIR/engine.log; --verbose also shows them."""
    with openai_server() as (url, handler):
        llm = f'backend = "openai"\nmodel = "m"\noptions = {{ base_url = "{url}" }}'
        cfg = _config(tmp_path, llm=llm, stages='[[stages]]\ntype = "distill"\nrole = "generator"\n')
        rc, _, err = cli("run", cfg, "--out", tmp_path / "run", "--quiet", *(["--verbose"] if verbose else []))
    assert rc == 0, err
    log = (tmp_path / "run" / "engine.log").read_text()
    assert log.count("HTTP Request: POST") == len(handler.seen) == 3
    assert ("HTTP Request: POST" in err) == verbose


def test_api_key_written_into_a_config_is_refused(tmp_path):
    cfg = _config(tmp_path, llm=f'backend = "openai"\nmodel = "m"\noptions = {{ api_key = "{KEY}" }}')
    rc, _, err = cli("run", cfg, "--out", tmp_path / "run")
    refused(rc, err, f"{cfg}:", "api_key")
    assert KEY not in err and not (tmp_path / "run").exists()


# -------------------------------------------------------------- model output is data, not code

def test_model_output_is_never_a_format_string():
    """Model text goes into the next prompt as it is: '{0}', '%s' and '{task.__class__}' stay literal."""
    prompts = [judge_chat(HOSTILE, HOSTILE, HOSTILE)[1]["content"],
               COMPLEXITY.format(task=HOSTILE), QUALITY.format(task=HOSTILE, response=HOSTILE),
               JUDGE_PROMPT.format(instruction=HOSTILE, a=HOSTILE, b=HOSTILE),
               grade_request(HOSTILE, HOSTILE)[-1]["content"], same_request(HOSTILE, HOSTILE)[-1]["content"],
               evolve_request("deepen", HOSTILE)[-1]["content"], evolve_request("breadth", HOSTILE)[-1]["content"]]
    for p in prompts:
        assert HOSTILE in p


def test_hostile_response_travels_through_a_run_unchanged(tmp_path, monkeypatch):
    """A teacher answer full of format directives is stored verbatim and shown verbatim to the judge."""
    monkeypatch.setenv("SYNTHLOOP_TEST_API_KEY", KEY)
    with openai_server() as (url, handler):
        llm = f'backend = "openai"\nmodel = "m"\noptions = {{ base_url = "{url}", api_key_env = "SYNTHLOOP_TEST_API_KEY" }}'
        cfg = _config(tmp_path, llm=llm,
                      stages='[[stages]]\ntype = "distill"\nrole = "generator"\n[[stages]]\ntype = "judge"\n')
        rc, _, err = cli("run", cfg, "--out", tmp_path / "run", "--quiet")
    assert rc == 0, err
    import polars as pl
    kept = pl.read_parquet(tmp_path / "run" / "data" / "*.parquet")
    assert kept["response"].to_list() == [HOSTILE] * 3
    assert kept["scores"].struct.field("judge").to_list() == [0.7] * 3
    judged = [b["messages"][-1]["content"] for _, b in handler.seen if "Grade the response" in b["messages"][-1]["content"]]
    assert len(judged) == 3 and all(HOSTILE in j for j in judged)


def test_no_eval_or_exec_in_the_product():
    calls = re.compile(r"(?<![\w.])(eval|exec)\s*\(|pickle\.loads?\(|yaml\.load\(")
    hits = [f"{p}:{n}" for d in ("core", "engine", "generator", "filters", "seeds", "outputs", "tuner")
            for p in (ROOT / d).rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
            if calls.search(line)]
    assert hits == []


# ---------------------------------------------------------------------------------- HTML report

def test_report_and_card_escape_record_text(tmp_path):
    (tmp_path / "seeds.txt").write_text("<script>alert('x')</script> Write a poem.\n<img src=x onerror=alert(1)> Name a river.\n")
    cfg = _config(tmp_path, stages='[[stages]]\ntype = "exact_dedup"\nname = "<b>stage</b>"\n')
    run = tmp_path / "run"
    rc, _, err = cli("run", cfg, "--out", run, "--quiet")
    assert rc == 0, err
    rc, _, err = cli("report", run)
    assert rc == 0, err
    page = (run / "report" / "index.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Write a poem." in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;stage&lt;/b&gt;" in page
    assert "<script" not in page and "<img src=x" not in page and "<b>" not in page
    card = (run / "README.md").read_text()
    prose = re.sub(r"(?s)\n(`{3,})toml\n.*?\n\1\n", "\n", card)   # the config, verbatim inside a code fence
    assert "<b>stage</b>" not in prose and "| &lt;b&gt;stage&lt;/b&gt; |" in prose
