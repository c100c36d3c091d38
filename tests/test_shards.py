"""Shard writing: explicit schema, atomic files, fixed row counts, and readers other than ours."""
from __future__ import annotations

import polars as pl
import pytest

from synthloop.core.schema import SCHEMA, make_batch
from synthloop.outputs.shards import ShardSeries, scan_shards, write_parquet_atomic


def rows(n, start=0):
    return make_batch([{"instruction": f"Task {i} about things.", "response": f"Answer {i}.",
                        "method": "self_instruct", "scores": {"quality": i / 10}} for i in range(start, start + n)])


def test_round_trip_keeps_schema_and_values(tmp_path):
    b = rows(5)
    write_parquet_atomic(b, tmp_path / "s.parquet")
    back = pl.read_parquet(tmp_path / "s.parquet")
    assert back.schema == SCHEMA and back.equals(b)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]   # no temp file left behind


def test_series_rolls_at_row_count_and_carries_pending(tmp_path):
    s = ShardSeries(tmp_path, "shard", schema=SCHEMA, rows_per_shard=4)
    s.add(rows(3))
    s.add(rows(3, 3))
    entries, rest = s.commit()
    assert [e["rows"] for e in entries] == [4] and rest.height == 2
    s2 = ShardSeries(tmp_path, "shard", schema=SCHEMA, rows_per_shard=4, next_index=1, pending=rest)
    s2.add(rows(1, 6))
    entries, rest = s2.commit(final=True)
    assert [e["rows"] for e in entries] == [3] and rest.height == 0
    df = scan_shards(sorted(tmp_path.glob("shard-*.parquet"))).collect()
    assert df["instruction"].to_list() == [f"Task {i} about things." for i in range(7)]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        write_parquet_atomic(rows(2), tmp_path / "s.parquet")
    assert list(tmp_path.iterdir()) == []


def test_shards_load_in_duckdb_and_datasets(tmp_path):
    b = rows(6)
    write_parquet_atomic(b, tmp_path / "shard-00000.parquet")
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select count(*), min(instruction) from '{tmp_path}/shard-*.parquet'").fetchall()[0]
    assert got == (6, "Task 0 about things.")
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "shard-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6 and ds[0]["messages"][1] == {"role": "assistant", "content": "Answer 0."}


def test_atomic_writes_clear_what_killed_writers_left(tmp_path):
    """Every atomic file write (shards, JSON exports, reports, cards, rounds.json) goes through
    write_bytes_atomic: a killed writer's temp file (a dead pid) goes; a live writer's stays."""
    import os

    from synthloop.outputs.shards import write_bytes_atomic

    dead = tmp_path / f".alpaca.json.tmp-{2**22 + 7}"          # above Linux's pid_max: no such process
    live = tmp_path / f".alpaca.json.tmp-{os.getpid()}x"      # not a pid: left alone
    mine = tmp_path / f".alpaca.json.tmp-{os.getppid()}"      # a running process's
    for p in (dead, live, mine):
        p.write_text("partial")
    write_bytes_atomic(b"[]", tmp_path / "alpaca.json")
    assert (tmp_path / "alpaca.json").read_text() == "[]"
    assert not dead.exists() and live.exists() and mine.exists()


def _as_before_language(df: pl.DataFrame) -> pl.DataFrame:
    """A frame as synthloop wrote it before `language` and `scores.safety` existed."""
    fields = [f.name for f in SCHEMA["scores"].fields if f.name != "safety"]
    return df.drop("language").with_columns(
        pl.struct([pl.col("scores").struct.field(f) for f in fields]).alias("scores"))


def test_old_shards_read_with_what_the_schema_gained_as_null(tmp_path):
    new = make_batch([{"instruction": "Name a bird.", "response": "Owl.", "scores": {"quality": 0.9, "safety": 1.0},
                       "language": {"code": "en", "confidence": 0.99}}])
    old = _as_before_language(make_batch([{"instruction": "Name a fish.", "response": "Cod.",
                                           "scores": {"quality": 0.4}}]))
    write_parquet_atomic(old, tmp_path / "shard-00000.parquet")
    write_parquet_atomic(new, tmp_path / "shard-00001.parquet")
    got = scan_shards([tmp_path / "shard-00000.parquet", tmp_path / "shard-00001.parquet"]).collect()
    assert got.schema == SCHEMA
    assert got["language"].to_list() == [None, {"code": "en", "confidence": 0.99}]
    assert got["scores"].struct.field("safety").to_list() == [None, 1.0]
    assert got["scores"].struct.field("quality").to_list() == [0.4, 0.9]


def test_a_run_written_before_language_resumes(tmp_path):
    """A run an older version wrote and was interrupted in (a shard-less commit: its rows are
    pending): the same command continues it to the ids a clean run has; the old rows read back
    with `language` and `scores.safety` null."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from scripted_llm import scripted_factory
    from test_executors import SEEDS_ONLY

    from synthloop.core.config import parse_config
    from synthloop.engine.runner import execute
    from synthloop.outputs.run_reader import read_kept

    calls = []

    def interrupted(spec, cache=None):         # Ctrl-C during the 12th model call
        llm = scripted_factory()(spec, cache)
        inner = llm.agenerate

        async def agenerate(requests, params):
            calls.append(1)
            if len(calls) == 12:
                raise KeyboardInterrupt
            return await inner(requests, params)
        llm.agenerate = agenerate
        return llm

    def cfg(name):
        return parse_config(SEEDS_ONLY.format(cache=tmp_path / f"{name}.sqlite", repeat=1), path="old.toml")
    with pytest.raises(KeyboardInterrupt):
        execute(cfg("old"), out=tmp_path / "old", show_progress=False, backend_factory=interrupted)
    files = [*(tmp_path / "old").glob("data/*.parquet"), *(tmp_path / "old").glob("pending/*.parquet")]
    assert any(f.parent.name == "pending" for f in files)
    for f in files:
        _as_before_language(pl.read_parquet(f)).write_parquet(f)
    m = execute(cfg("old"), out=tmp_path / "old", show_progress=False, backend_factory=scripted_factory())
    clean = execute(cfg("clean"), out=tmp_path / "clean", show_progress=False, backend_factory=scripted_factory())
    assert m["complete"] and m["stages"][-1]["kept"] == clean["stages"][-1]["kept"]
    kept = read_kept(tmp_path / "old")
    assert kept.schema == SCHEMA and sorted(kept["id"]) == sorted(read_kept(tmp_path / "clean")["id"])
    assert 0 < kept["language"].null_count() < kept.height      # old rows unlabelled, new ones labelled
