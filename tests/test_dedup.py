"""Exact, MinHash-LSH and embedding dedup: drop reasons, keep-first, maths vs datasketch,
verification, preloading, resume, SemDeDup survivors and the `synthloop dedup` CLI."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import polars as pl
import pytest

from scripted_llm import run_batch
from synthloop.filters.dedup_cli import main as dedup_main
from synthloop.filters.exact import ExactConfig, ExactDedup
from synthloop.filters.lsh import lsh_probability, optimal_bands_rows, signature_cut
from synthloop.filters.minhash import MinHashConfig, MinHashDedup, MinHasher, jaccard_estimate
from synthloop.filters.normalize import exact_keys
from synthloop.core.schema import make_batch
from synthloop.core.stages import per_batch

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega red green blue cyan magenta yellow black white one two "
         "three four five six seven eight nine ten river mountain forest desert ocean island").split()


def _text(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def _mutate(text: str, rng: random.Random, edits: int) -> str:
    w = text.split()
    for _ in range(edits):
        w[rng.randrange(len(w))] = "zz" + str(rng.randrange(10**6))
    return " ".join(w)


def _py_shingles(text: str, n: int = 5) -> set[str]:
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _reasons(df: pl.DataFrame) -> list:
    return df["drop_reason"].to_list()


class _Committed:
    def __init__(self, kept: pl.DataFrame):
        self._kept = kept

    def kept(self) -> pl.LazyFrame:
        return self._kept.lazy()

    def rejects(self) -> pl.LazyFrame:
        return pl.LazyFrame()

    passed = kept            # nothing was dropped after the dedup stage in these tests


# ---------------------------------------------------------------- normalisation


def test_exact_keys_normalise_case_whitespace_punctuation_but_not_symbols():
    df = pl.DataFrame({"t": ["Hello,  World!", "hello world", "HELLO\tworld…", "“Hello” — world",
                             "2+2", "2 2", "Ünïcode ÀÉ", "ünïcode àé", "ＡＢＣ", "abc"]})
    k = exact_keys(df, ["t"])
    assert k[0] == k[1] == k[2] == k[3]
    assert k[4] != k[5]                 # symbols are content
    assert k[6] == k[7] and k[8] == k[9]  # Latin-1 case folding, fullwidth forms
    # columns are hashed apart: ("a b", "") is not ("a", "b")
    two = exact_keys(pl.DataFrame({"x": ["a b", "a"], "y": ["", "b"]}), ["x", "y"])
    assert two[0] != two[1]


def test_word_shingles_match_python_regex_tokenisation():
    rng = random.Random(0)
    texts = [_text(rng, rng.randrange(1, 40)) + " Ça, c'est l'été! naïve_café 3.14" for _ in range(50)]
    texts += ["", "   ", "one", "two words"]
    *_, (flat, off) = MinHasher(ngram=5).hash(pl.Series(texts), sets=True)
    for i, t in enumerate(texts):
        assert off[i + 1] - off[i] == (len(_py_shingles(t)) if re.findall(r"\w+", t) else 0), t


# ---------------------------------------------------------------- exact dedup


def test_exact_dedup_keep_first_within_and_across_batches():
    dd = ExactDedup(ExactConfig(text_columns=["instruction", "response"]))
    stage = per_batch("exact", dd.mark, owner=dd)
    b1 = make_batch([{"instruction": "Name a colour.", "response": "Blue"},
                     {"instruction": "name a colour", "response": "blue."},       # dup of row 0
                     {"instruction": "Name a colour.", "response": "Red"}])
    b2 = make_batch([{"instruction": "NAME A COLOUR", "response": "Red!"},          # dup of b1 row 2
                     {"instruction": "Name a shape.", "response": "Square"},
                     {"instruction": "Name a shape", "response": "square", "drop_reason": "too_short"}])
    out1, out2 = run_batch(stage, b1, 0), run_batch(stage, b2, 1)
    assert _reasons(out1) == [None, "exact_duplicate", None]
    assert _reasons(out2) == ["exact_duplicate", None, "too_short"]   # earlier rejects untouched


def test_exact_dedup_preload_and_restore(tmp_path):
    old = make_batch([{"instruction": "Old task", "response": "x"}])
    old.write_parquet(tmp_path / "shard-00000.parquet")
    dd = ExactDedup(ExactConfig(text_columns=["instruction"], preload=[str(tmp_path / "*.parquet")]))
    assert _reasons(dd.mark(make_batch([{"instruction": "old task!"}, {"instruction": "new"}]))) == \
        ["exact_duplicate", None]
    fresh = ExactDedup(ExactConfig(text_columns=["instruction"]))
    fresh.restore({}, _Committed(make_batch([{"instruction": "Kept before"}])))
    assert _reasons(fresh.mark(make_batch([{"instruction": "kept before"}]))) == ["exact_duplicate"]


# ---------------------------------------------------------------- MinHash and LSH maths


@pytest.mark.parametrize("threshold,num_perm,weights", [
    (0.5, 128, (0.5, 0.5)), (0.7, 128, (0.5, 0.5)), (0.8, 256, (0.5, 0.5)), (0.9, 64, (0.5, 0.5)),
    (0.7, 128, (0.2, 0.8)), (0.3, 32, (0.7, 0.3))])
def test_optimal_bands_rows_matches_datasketch(threshold, num_perm, weights):
    from datasketch.lsh import _optimal_param
    assert optimal_bands_rows(threshold, num_perm, fp_weight=weights[0], fn_weight=weights[1]) == \
        _optimal_param(threshold, num_perm, *weights)


def test_band_collision_rate_follows_the_s_curve():
    rng = random.Random(1)
    mh = MinHasher(num_perm=128, ngram=1, bands=16, rows=8)
    pairs = []
    for s_target in (0.45, 0.6, 0.75):
        for _ in range(300):   # two sets of 60 distinct tokens sharing `common`
            common = round(120 * s_target / (1 + s_target))
            toks = [f"t{rng.randrange(10**9)}" for _ in range(120 - common)]
            a, b = toks[:60], toks[:common] + toks[60:120 - common]
            pairs.append((s_target, " ".join(a), " ".join(b)))
    _, keys_a, _ = mh.hash(pl.Series([p[1] for p in pairs]))
    _, keys_b, _ = mh.hash(pl.Series([p[2] for p in pairs]))
    hit = (keys_a == keys_b).any(axis=1)
    for s_target in (0.45, 0.6, 0.75):
        sel = np.array([p[0] == s_target for p in pairs])
        s_true = np.mean([_jaccard(set(p[1].split()), set(p[2].split())) for p in pairs if p[0] == s_target])
        expect = float(lsh_probability(s_true, 16, 8))
        assert abs(hit[sel].mean() - expect) < 4 * np.sqrt(expect * (1 - expect) / sel.sum()) + 0.02


def test_minhash_estimates_agree_with_datasketch():
    from datasketch import MinHash
    rng = random.Random(2)
    mh = MinHasher(num_perm=128, ngram=5)
    base = [_text(rng, 80) for _ in range(120)]
    other = [_mutate(t, rng, rng.randrange(1, 12)) for t in base]
    sig_a, _, _ = mh.hash(pl.Series(base))
    sig_b, _, _ = mh.hash(pl.Series(other))
    err_ours, err_ds = [], []
    for i, (a, b) in enumerate(zip(base, other)):
        sa, sb = _py_shingles(a), _py_shingles(b)
        truth = _jaccard(sa, sb)
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
        ma.update_batch([s.encode() for s in sa])
        mb.update_batch([s.encode() for s in sb])
        err_ours.append(jaccard_estimate(sig_a[i], sig_b[i]) - truth)
        err_ds.append(ma.jaccard(mb) - truth)
    err_ours, err_ds = np.array(err_ours), np.array(err_ds)
    # both unbiased, both with the binomial spread of 128 permutations (sd <= ~0.045)
    assert abs(err_ours.mean()) < 0.015 and abs(err_ds.mean()) < 0.015
    assert np.sqrt((err_ours ** 2).mean()) < 1.3 * np.sqrt((err_ds ** 2).mean()) + 0.01
    assert np.abs(err_ours).max() < 0.2


def test_warm_up_compiles_every_dedup_kernel():
    from synthloop.filters import dedup_ray, jit  # noqa: F401  (every module with kernels)
    jit.warm_up()
    assert len(jit.KERNELS) >= 7
    assert [k.py_func.__name__ for k in jit.KERNELS if not k.signatures] == []


def test_signature_cut():
    assert signature_cut(0.7, 128) == 88                       # estimate >= 0.68 (8-bit values)
    assert signature_cut(0.7, 128, margin=0.0) == 90
    assert signature_cut(0.9, 256) > signature_cut(0.7, 256)


# ---------------------------------------------------------------- MinHash dedup stage


def test_minhash_keep_first_within_and_across_batches():
    rng = random.Random(3)
    a, b, c = _text(rng), _text(rng), _text(rng)
    dd = MinHashDedup(MinHashConfig(text_columns=["instruction", "response"]))
    stage = per_batch("minhash", dd.mark, owner=dd)
    b1 = make_batch([{"instruction": a, "response": "r"}, {"instruction": b, "response": "r"},
                     {"instruction": _mutate(a, rng, 1), "response": "r"}])
    b2 = make_batch([{"instruction": _mutate(b, rng, 1), "response": "R"},
                     {"instruction": c, "response": "r"},
                     {"instruction": c.upper(), "response": "r", "drop_reason": "empty"},
                     {"instruction": "", "response": ""}, {"instruction": "", "response": ""}])
    out1, out2 = run_batch(stage, b1, 0), run_batch(stage, b2, 1)
    assert _reasons(out1) == [None, None, "near_duplicate"]
    assert _reasons(out2) == ["near_duplicate", None, "empty", None, None]  # empty text: exact's job
    assert dd.state() == {"indexed_docs": 3}


def test_minhash_char_shingles():
    dd = MinHashDedup(MinHashConfig(text_columns=["instruction"], shingle="char", ngram=4))
    rows = [{"instruction": "The quick brown fox jumps over the lazy dog near the river bank"},
            {"instruction": "The quick brown fox jumped over the lazy dog near the river bank"},
            {"instruction": "Completely different sentence about databases and indexes"}]
    assert _reasons(dd.mark(make_batch(rows))) == [None, "near_duplicate", None]


def test_verify_removes_false_positives():
    rng = random.Random(4)
    rows, truth = [], []
    for _ in range(150):   # pairs just below the threshold (and a few clearly above)
        a = _text(rng, 100)
        b = _mutate(a, rng, rng.choice([3, 4, 5, 6]) if len(rows) < 240 else 1)
        rows += [{"instruction": a}, {"instruction": b}]
        truth.append(_jaccard(_py_shingles(a), _py_shingles(b)))
    truth = np.array(truth)
    batch = make_batch(rows)
    # a permissive S-curve makes many candidates below the threshold
    loose = dict(text_columns=["instruction"], threshold=0.7, bands=32, rows=2)
    dropped_sig = np.array(_reasons(MinHashDedup(MinHashConfig(**loose, verify=False)).mark(batch))[1::2]) != None  # noqa: E711
    dropped_ver = np.array(_reasons(MinHashDedup(MinHashConfig(**loose)).mark(batch))[1::2]) != None  # noqa: E711
    below = truth < 0.7
    assert below.sum() > 50 and (~below).sum() > 10
    assert dropped_sig[below].sum() > 0                  # the estimate lets some through ...
    assert dropped_ver[below].sum() == 0                 # ... exact verification none
    assert dropped_ver[~below].all()                     # and keeps every true duplicate dropped
    assert _reasons(batch)[0::2] == [None] * 150


def test_minhash_preload_from_shards_and_lazyframe(tmp_path):
    rng = random.Random(5)
    old = [_text(rng) for _ in range(5)]
    make_batch([{"instruction": t} for t in old[:3]]).write_parquet(tmp_path / "r0-00000.parquet")
    make_batch([{"instruction": t} for t in old[3:]]).write_parquet(tmp_path / "r0-00001.parquet")
    cfg = MinHashConfig(text_columns=["instruction"], preload=[str(tmp_path / "r0-*.parquet")])
    dd = MinHashDedup(cfg)
    new = make_batch([{"instruction": _mutate(t, rng, 1)} for t in old] + [{"instruction": _text(rng)}])
    assert _reasons(dd.mark(new)) == ["near_duplicate"] * 5 + [None]
    lazy = MinHashDedup(MinHashConfig(text_columns=["instruction"]))
    assert lazy.preload(pl.scan_parquet(tmp_path / "r0-*.parquet")) == 5
    assert _reasons(lazy.mark(new)) == ["near_duplicate"] * 5 + [None]


@pytest.mark.parametrize("verify", [False, True])
def test_minhash_resume_equals_uninterrupted_run(verify):
    rng = random.Random(6)
    texts = [_text(rng) for _ in range(40)]
    texts += [_mutate(rng.choice(texts), rng, 2) for _ in range(40)]
    rng.shuffle(texts)
    b1, b2 = make_batch([{"instruction": t} for t in texts[:40]]), make_batch([{"instruction": t} for t in texts[40:]])
    cfg = MinHashConfig(text_columns=["instruction"], verify=verify)
    whole = MinHashDedup(cfg)
    expect = _reasons(whole.mark(b1)) + _reasons(whole.mark(b2))
    first = MinHashDedup(cfg)
    out1 = first.mark(b1)
    resumed = MinHashDedup(cfg)   # a new process: only the committed kept rows survive
    resumed.restore(first.state(), _Committed(out1.filter(pl.col("drop_reason").is_null())))
    assert _reasons(out1) + _reasons(resumed.mark(b2)) == expect
    assert "near_duplicate" in expect


def test_minhash_config_errors():
    with pytest.raises(ValueError, match="bands and rows"):
        MinHashDedup(MinHashConfig(bands=4))
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashDedup(MinHashConfig(bands=20, rows=8))
    with pytest.raises(ValueError, match="threshold"):
        MinHashDedup(MinHashConfig(threshold=1.5))


def test_stages_from_toml(tmp_path):
    from synthloop.core.config import ConfigError, parse_config
    from synthloop.core.registry import Context, build
    cfg = parse_config('[[stages]]\ntype = "exact_dedup"\ntext_columns = ["instruction"]\n'
                       '[[stages]]\ntype = "minhash_dedup"\nthreshold = 0.8\nverify = true\n')
    ctx = Context(config=cfg, run_dir=tmp_path, seeds=None, open_llm=None)
    stages = [build("stage", t, ctx, f"stages.{i}") for i, t in enumerate(cfg.stages)]
    assert [s.name for s in stages] == ["exact_dedup", "minhash_dedup"]
    assert stages[1].owner.cfg.threshold == 0.8 and stages[1].owner.index.check == "exact"
    b = make_batch([{"instruction": "Same task", "response": "a"}, {"instruction": "same task", "response": "b"}])
    assert stages[0].ordered and _reasons(run_batch(stages[0], b)) == [None, "exact_duplicate"]
    with pytest.raises(ConfigError, match="unknown key 'treshold'"):
        parse_config('[[stages]]\ntype = "minhash_dedup"\ntreshold = 0.8\n')


# ---------------------------------------------------------------- SemDeDup (no encoder)


def test_semdedup_one_survivor_per_component_chosen_by_quality():
    from synthloop.filters.embed_dedup import semdedup
    e = np.array([[1.0, 0.0, 0.0], [0.96, 0.28, 0.0], [0.85, 0.53, 0.0],   # chain: 0~1, 1~2, 0!~2
                  [0.0, 0.0, 1.0], [0.0, 0.6, 0.8], [0.0, 1.0, 0.0]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    res = semdedup(e, threshold=0.95, quality=np.array([0.2, np.nan, 0.9, 0.5, 0.1, 0.3]))
    assert res.keep.tolist() == [False, False, True, True, True, True]
    assert res.survivor.tolist() == [2, 2, 2, 3, 4, 5]
    first = semdedup(e, threshold=0.95)                       # no scores: first seen survives
    assert first.keep.tolist() == [True, False, False, True, True, True]


def test_semdedup_never_drops_a_whole_group_with_clusters():
    from synthloop.filters.embed_dedup import semdedup
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    e = np.repeat(centres, 6, axis=0) + rng.normal(scale=0.05, size=(240, 32))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    q = rng.random(240)
    res = semdedup(e, threshold=0.95, quality=q, n_clusters=8)
    sim = e @ e.T
    for i in np.flatnonzero(~res.keep):        # every dropped row has a kept row it is linked to
        s = res.survivor[i]
        assert res.keep[s] and q[s] >= q[i]
    for g in np.unique(res.survivor):          # one survivor per group, and it is the best of it
        members = np.flatnonzero(res.survivor == g)
        assert res.keep[members].sum() == 1 and q[g] == q[members].max()
    assert res.keep.sum() >= 40 and (sim[np.ix_(res.keep, res.keep)] >= 0.95).sum() <= res.keep.sum() * 2


# ---------------------------------------------------------------- embedding dedup (encoder)


@pytest.fixture(scope="module")
def enc():
    from synthloop.filters.embed_dedup import encoder
    return encoder()


PARA = [("How do I reverse a list in Python?", "How can I reverse a Python list?"),
        ("What is the capital of France?", "Tell me the capital city of France."),
        ("Write a haiku about autumn leaves.", "Compose a haiku on falling autumn leaves.")]


def test_semantic_stream_keep_first(enc):
    from synthloop.filters.embed_dedup import SemanticConfig, SemanticDedup, encoder
    assert encoder() is enc
    dd = SemanticDedup(SemanticConfig(text_columns=["instruction"], threshold=0.85))
    b1 = make_batch([{"instruction": PARA[0][0]}, {"instruction": PARA[0][1]},
                     {"instruction": PARA[1][0]}, {"instruction": "Explain photosynthesis briefly."}])
    b2 = make_batch([{"instruction": PARA[1][1]}, {"instruction": PARA[2][0]},
                     {"instruction": PARA[2][0], "drop_reason": "too_short"}])
    assert _reasons(dd.mark(b1)) == [None, "semantic_duplicate", None, None]
    assert _reasons(dd.mark(b2)) == ["semantic_duplicate", None, "too_short"]
    assert dd.state() == {"indexed": 4}
    resumed = SemanticDedup(SemanticConfig(text_columns=["instruction"], threshold=0.85))
    resumed.restore({}, _Committed(make_batch([{"instruction": PARA[2][0]}])))
    assert _reasons(resumed.mark(make_batch([{"instruction": PARA[2][1]}]))) == ["semantic_duplicate"]


def test_semantic_semdedup_mode_picks_by_quality(enc):
    from synthloop.filters.embed_dedup import SemanticConfig, SemanticDedup
    dd = SemanticDedup(SemanticConfig(text_columns=["instruction"], threshold=0.85, mode="semdedup"))
    rows = [{"instruction": PARA[0][0], "scores": {"quality": 0.2}},
            {"instruction": PARA[0][1], "scores": {"quality": 0.9}},
            {"instruction": PARA[1][0]}, {"instruction": PARA[1][1]}]
    assert _reasons(dd.mark(make_batch(rows))) == ["semantic_duplicate", None, None, "semantic_duplicate"]


# ---------------------------------------------------------------- CLI


def _corpus(n: int = 60, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i > 5 and i % 5 == 0:
            src = rows[rng.randrange(len(rows))]
            rows.append({"instruction": _mutate(src["instruction"], rng, 1), "response": src["response"]})
        else:
            rows.append({"instruction": _text(rng, 30), "response": _text(rng, 30)})
    return rows


def test_cli_parquet_in_our_schema(tmp_path, capsys):
    make_batch(_corpus()).write_parquet(tmp_path / "in.parquet")
    rc = dedup_main([str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out"), "--quiet",
                     "--batch-size", "16", "--shard-rows", "20"])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    kept = pl.read_parquet(tmp_path / "out" / "kept-*.parquet")
    rej = pl.read_parquet(tmp_path / "out" / "rejects-*.parquet")
    assert summary["records"] == 60 and summary["kept"] == kept.height == 50
    assert summary["dropped"] == {"near_duplicate": 10} and set(_reasons(rej)) == {"near_duplicate"}
    assert kept.schema == make_batch([]).schema and len(summary["kept_files"]) == 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 50
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("method", ["exact", "minhash"])
def test_cli_jsonl_foreign_columns_pass_through(tmp_path, method):
    rows = [{"prompt": r["instruction"], "completion": r["response"], "n": i, "tags": ["a", str(i)]}
            for i, r in enumerate(_corpus())]
    rows.append(dict(rows[3], n=99))   # an exact copy of row 3
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    rc = dedup_main([str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), "--quiet",
                     "--method", method, "--text-columns", "prompt,completion"])
    assert rc == 0
    kept = pl.read_parquet(tmp_path / "o" / "kept-00000.parquet")
    rej = pl.read_parquet(tmp_path / "o" / "rejects-00000.parquet")
    assert kept.columns == ["prompt", "completion", "n", "tags"]
    assert kept.schema["tags"] == pl.List(pl.String) and kept["n"].dtype == pl.Int64
    assert 99 in rej["n"].to_list()
    reason = "exact_duplicate" if method == "exact" else "near_duplicate"
    assert set(_reasons(rej)) == {reason} and rej.height == (1 if method == "exact" else 11)


def test_cli_semantic(tmp_path, enc):
    rows = [{"instruction": a, "response": ""} for a, _ in PARA] + [{"instruction": b, "response": ""} for _, b in PARA]
    pl.DataFrame(rows).write_parquet(tmp_path / "in.parquet")
    rc = dedup_main([str(tmp_path / "in.parquet"), "--out", str(tmp_path / "o"), "--quiet",
                     "--method", "semantic", "--threshold", "0.85"])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dropped"] == {"semantic_duplicate": 3} and summary["kept"] == 3


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n{"instruction": "e",\n',
     "in.jsonl:3: invalid JSON"),
    ('{"instruction": "a", "response": "b"}\n\n{"instruction": "c"}\n', "in.jsonl:3: field 'response': missing"),
    ('{"instruction": "a", "response": 5}\n', "in.jsonl:1: field 'response': must be a string, got int"),
    ('["a", "b"]\n', "in.jsonl:1: expected a JSON object"),
])
def test_cli_bad_jsonl_exits_2_and_writes_nothing(tmp_path, capsys, content, message):
    (tmp_path / "good.parquet").write_bytes(b"")
    pl.DataFrame({"instruction": ["x"], "response": ["y"]}).write_parquet(tmp_path / "good.parquet")
    (tmp_path / "in.jsonl").write_text(content)
    out = tmp_path / "out"
    rc = dedup_main([str(tmp_path / "good.parquet"), str(tmp_path / "in.jsonl"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("error: ")


def test_cli_bad_parquet_and_existing_output(tmp_path, capsys):
    pl.DataFrame({"instruction": ["x"], "answer": ["y"]}).write_parquet(tmp_path / "a.parquet")
    assert dedup_main([str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "a.parquet: field 'response': missing" in capsys.readouterr().err
    pl.DataFrame({"instruction": ["x"], "response": [3]}).write_parquet(tmp_path / "b.parquet")
    assert dedup_main([str(tmp_path / "b.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "b.parquet: field 'response': must be text, got Int64" in capsys.readouterr().err
    (tmp_path / "c.parquet").write_text("not parquet")
    assert dedup_main([str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "c.parquet: cannot read as a table" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    pl.DataFrame({"instruction": ["x"], "response": ["y"]}).write_parquet(tmp_path / "d.parquet")
    assert dedup_main([str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert dedup_main([str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "already holds dedup output" in capsys.readouterr().err


def test_cli_preload_prevents_re_emission(tmp_path):
    rows = _corpus(30)
    pl.DataFrame(rows[:20]).write_parquet(tmp_path / "round0.parquet")
    pl.DataFrame(rows).write_parquet(tmp_path / "round1.parquet")
    rc = dedup_main([str(tmp_path / "round1.parquet"), "--out", str(tmp_path / "o"), "--quiet",
                     "--method", "exact", "--preload", str(tmp_path / "round0.parquet")])
    assert rc == 0
    kept = pl.read_parquet(tmp_path / "o" / "kept-00000.parquet")
    assert kept.height == 10 and kept["instruction"].to_list() == [r["instruction"] for r in rows[20:]]
