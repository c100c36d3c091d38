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
