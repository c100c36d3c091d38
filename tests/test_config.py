"""TOML validation: unknown keys and types are named with file and line; CLI exits 2, writes nothing."""
from __future__ import annotations

import pytest

from synthloop.engine.cli import main
from synthloop.core.config import ConfigError, load_config, parse_config


def test_unknown_key_is_named_with_line():
    with pytest.raises(ConfigError) as e:
        parse_config('[run]\nname = "x"\nlimt = 3\n', path="c.toml")
    assert str(e.value).startswith("c.toml:3: [run] unknown key 'limt'")


def test_unknown_stage_key_and_type():
    with pytest.raises(ConfigError, match=r"c.toml:4: \[stages.0\] unknown key 'answr'"):
        parse_config('[source]\ntype = "self_instruct"\n[[stages]]\nanswr = "chat"\ntype = "instances"\n', path="c.toml")
    with pytest.raises(ConfigError, match="unknown stage type 'nope'"):
        parse_config('[[stages]]\ntype = "nope"\n', path="c.toml")


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"\[run\] 'limit' must be int, got str"):
        parse_config('[run]\nlimit = "ten"\n', path="c.toml")


def test_bad_backend_named():
    with pytest.raises(ConfigError, match="backend must be transformers, vllm or openai"):
        parse_config('[llm.generator]\nbackend = "tgi"\n', path="c.toml")


def test_limit_and_out_do_not_change_the_config_hash():
    a = parse_config('[run]\nlimit = 5\n')
    b = parse_config('[run]\nlimit = 50\nout = "elsewhere"\n')
    c = parse_config('[run]\nseed = 1\n')
    assert a.hash() == b.hash() != c.hash()


def test_cli_bad_config_exits_2_nothing_written(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "x"\nbogus = 1\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "c.toml:3: [run] unknown key 'bogus'" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["quickstart.toml", "rounds-quickstart.toml"])
def test_shipped_configs_are_valid(name):
    from conftest import ROOT

    from synthloop.engine.rounds import load_rounds_config
    path = ROOT / "configs" / name
    cfg = load_rounds_config(path).run if name.startswith("rounds") else load_config(path)
    assert cfg.llm["generator"].model == "embedded"
