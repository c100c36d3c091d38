"""A full disk: `synthloop run` writing to a small tmpfs that fills up mid-run stops with one line
and exit code 1; the shards and manifest it committed stay valid; once space is freed the same
command completes with exactly the records an uninterrupted run keeps.

The tmpfs is mounted by the test (needs root, as in CI's container); elsewhere the test is skipped
with that reason. The request cache lives on the small disk too in one case, so SQLite meets the
full disk as well as the Parquet and manifest writers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from kill_commands import RUN_CONFIG, run_outcome
from kill_campaign import SCRIPTED_CLI

SIZE = 4 << 20


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)], capture_output=True)
    if rc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def _run(cfg: Path, out: Path):
    return subprocess.run([sys.executable, str(SCRIPTED_CLI), "run", str(cfg), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)


def _used(path: Path) -> int:
    """Bytes `path` (a file, or a folder's files) takes on disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


@pytest.mark.parametrize("cache_on_small_disk", [False, True])
def test_full_disk_stops_with_one_line_and_the_rerun_loses_nothing(tmp_path, small_disk, cache_on_small_disk):
    clean_cfg = tmp_path / "clean.toml"
    clean_cfg.write_text(RUN_CONFIG.format(limit=60, cache=tmp_path / "clean.sqlite", model_line='model = "embedded"'))
    assert _run(clean_cfg, tmp_path / "clean").returncode == 0
    clean = run_outcome(tmp_path / "clean")
    need = _used(tmp_path / "clean") + (_used(tmp_path / "clean.sqlite") if cache_on_small_disk else 0)

    cache = (small_disk if cache_on_small_disk else tmp_path) / "req.sqlite"
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_CONFIG.format(limit=60, cache=cache, model_line='model = "embedded"'))
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast.write_bytes(b"\0" * (free - need // 2))      # room for about half the run
    out = small_disk / "out"

    failed = _run(cfg, out)
    assert failed.returncode == 1, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], lines
    assert "free space and rerun the same command" in lines[0]

    # what was committed is valid: the manifest reads, adds up, and lists only readable shards
    # The cache's WAL grows fastest, so with the cache on the small disk it may fill before the
    # first commit; with the cache elsewhere, about half the run is committed first.
    assert (out / "manifest.json").exists() or cache_on_small_disk
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        partial = run_outcome(out)
        assert [p for p in partial.problems if "not complete" not in p] == []
        assert not m["complete"] and (m["shards"] or cache_on_small_disk)
        for e in m["shards"] + m["rejects"]:
            assert pl.read_parquet(out / e["path"]).height == e["rows"]
        assert len(partial.kept) < len(clean.kept) and set(partial.kept) <= set(clean.kept)
        print(lines[0], f"({len(partial.kept)} of {len(clean.kept)} records committed)")

    ballast.unlink()
    again = _run(cfg, out)
    assert again.returncode == 0, again.stderr[-3000:]
    done = run_outcome(out)
    assert done.problems == []
    assert done.kept == clean.kept and done.rejected == clean.rejected
    assert not [p.name for p in out.rglob("*.tmp-*")]


def test_request_cache_on_a_full_disk_raises_enospc_and_keeps_what_it_had(small_disk):
    import errno

    from synthloop.core.llm.base import Completion
    from synthloop.core.llm.cache import RequestCache

    cache = RequestCache(small_disk / "req.sqlite")
    cache.put({"kept": Completion("an answer", "stop")})
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "ballast").write_bytes(b"\0" * (free - 4096))
    with pytest.raises(OSError) as err:
        for i in range(200):
            cache.put({f"k{i}-{j}": Completion("x" * 4000, "stop") for j in range(10)})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(small_disk / "req.sqlite")
    assert cache.get(["kept"])["kept"].text == "an answer"
    cache.close()
    (small_disk / "ballast").unlink()
    again = RequestCache(small_disk / "req.sqlite")
    assert again.get(["kept"])["kept"].text == "an answer"
    again.put({"after": Completion("fine", "stop")})
    assert again.get(["after"])["after"].text == "fine"
