"""The kill campaign, fast variant: every command SIGKILLed at a few seeded points (inside a shard
write, a manifest write or rename, a cache write, adapter saving, a random instant), rerun, and
compared with an uninterrupted run: the same record ids, none lost, none twice, counts that add
up, no temporary files left, no process of the killed command still running.

The scripted backend answers (tests/scripted_cli.py runs the real CLI); training and the rounds
loop train and evaluate a tiny random Llama. bench/faults.py runs the full 20 kills per command.
"""
from __future__ import annotations

import pytest

from kill_campaign import campaign, table
from kill_commands import build_inputs, commands

#: Kill points per command here: the kinds named, one kill each (bench/faults.py: 20 of all kinds).
FAST = {
    "run": ["shard write", "manifest write", "manifest rename", "cache write", "time"],
    "dedup": ["output rename"],
    "score": ["file write"],
    "select": ["output rename"],
    "export": ["file write"],
    "train": ["adapter save"],
    "rounds": ["adapter save"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model):
    return build_inputs(tmp_path_factory.mktemp("campaign") / "inputs", tiny_model)


@pytest.mark.parametrize("name", list(FAST))
def test_sigkill_then_rerun_loses_and_duplicates_nothing(name, inputs, tmp_path):
    [cmd] = [c for c in commands(inputs) if c.name == name]
    row = campaign(cmd, tmp_path, len(FAST[name]), kinds=FAST[name])
    print("\n" + table([row]))
    assert row.kills == len(FAST[name]) and row.landed >= 1
    assert row.ok, row.failures
