"""Exactness tests for synthloop.generator.rouge.

* tokenize / rouge_l must agree with rouge_score (the self-instruct reference)
  bit for bit; those comparisons are skipped if rouge_score is not installed.
* NoveltyIndex must make exactly the brute-force scan's decisions.  The data
  are near-duplicates over a small vocabulary, so many pairs sit right at the
  bounds the index prunes with: an off-by-one in any bound makes them fail.
"""

from __future__ import annotations

import random

import pytest

from synthloop.generator.rouge import NoveltyIndex, rouge_l, tokenize

EDGE_TEXTS = [
    "",
    " ",
    "\t\n ",
    "!!!",
    "...,;:-- ?",
    "a",
    "A a A a",
    "the the the cat the",
    "Hello, World!",
    "3-line poem; 10x faster (2024)",
    "naïve café — résumé",
    "ÉTÉ",
    "İstanbul",  # lowercases to 'i' + combining dot
    "\u212a is the Kelvin sign",  # lowercases to ASCII 'k'
    "straße STRASSE",
    "日本語のテキスト and text",
    "tab\tseparated\nnew line\r\nwindows",
    "snake_case and kebab-case and CamelCase",
    "émoji 😀 in the middle 😀",
    "ﬁne ligature",
    "x1 2y 3 4 five6",
    "ǅungla ǈ",
    "\u00a0non\u00a0breaking\u2003space",
]

_CHARS = "abcdeABCDE0129 ,.;!?-_'\"\t\nàéÉİıßø😀日\u212a\u00a0"


_ASCII = "abcdeABCDE0129 ,.;!?-_'\"\t\n\u212a"


def _random_text(rng: random.Random, chars: str = _CHARS) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))


def _dp_lcs(a, b) -> int:
    """Textbook O(len(a) * len(b)) LCS, independent of the bit-parallel one."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _dp_rouge_l(a, b) -> float:
    # rouge_score's _score_lcs(target=a, prediction=b), transcribed.
    if not a or not b:
        return 0.0
    lcs = _dp_lcs(a, b)
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def test_tokenize_basics():
    assert tokenize("Write a 3-line poem, ÉTÉ!") == ["write", "a", "3", "line", "poem", "été"]
    assert tokenize("") == []
    assert tokenize("?!") == []
    assert tokenize("\u212aelvin") == ["kelvin"]


def test_rouge_l_matches_dp_on_random_token_lists():
    rng = random.Random(1)
    for _ in range(2000):
        vocab = [str(i) for i in range(rng.randint(1, 12))]
        # Lengths past 64 exercise multi-word big-int masks.
        sizes = [(0, 8), (1, 15), (3, 40), (60, 150)]
        la, lb = rng.choice(sizes), rng.choice(sizes)
        a = [rng.choice(vocab) for _ in range(rng.randint(*la))]
        b = [rng.choice(vocab) for _ in range(rng.randint(*lb))]
        assert rouge_l(a, b) == _dp_rouge_l(a, b), (a, b)
        assert rouge_l(a, b) == rouge_l(b, a)


def test_tokenize_matches_rouge_score():
    """Identical wherever rouge_score sees every letter: text that is ASCII once lower-cased."""
    rs_tokenize = pytest.importorskip("rouge_score.tokenize")
    rng = random.Random(2)
    texts = EDGE_TEXTS + [_random_text(rng) for _ in range(2000)] + [_random_text(rng, _ASCII) for _ in range(2000)]
    compared = 0
    for text in texts:
        if text.lower().isascii():
            assert tokenize(text) == rs_tokenize.tokenize(text, None), repr(text)
            compared += 1
    assert compared > 2000


def test_tokenize_keeps_letters_of_every_script():
    assert tokenize("naïve café — résumé") == ["naïve", "café", "résumé"]
    assert tokenize("Übersetze den Satz, bitte!") == ["übersetze", "den", "satz", "bitte"]
    assert tokenize("Привет, мир") == ["привет", "мир"]
    assert tokenize("日本語のテキスト and text") == ["日", "本", "語", "の", "テ", "キ", "ス", "ト", "and", "text"]
    assert tokenize("snake_case STRASSE straße") == ["snake", "case", "strasse", "straße"]
    # Two German instructions that differ in one word are as similar as their English twins.
    de = rouge_l(tokenize("Übersetze den Satz ins Französische."), tokenize("Übersetze den Satz ins Spanische."))
    en = rouge_l(tokenize("Translate the sentence into French."), tokenize("Translate the sentence into Spanish."))
    assert de == en and abs(de - 0.8) < 1e-12


class _OurTokens:
    """rouge_score with our tokenizer: the F-measure must then agree on every text."""

    tokenize = staticmethod(tokenize)


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_OurTokens())
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(3)
    words = ["the", "a", "cat", "Cat!", "dog", "sat", "on", "mat", "écrit", "3", "x-y"]
    pairs = [(a, b) for a in EDGE_TEXTS for b in EDGE_TEXTS[::3]]
    for _ in range(1000):
        mk = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))  # noqa: E731
        pairs.append((mk(), mk()))
        pairs.append((_random_text(rng), _random_text(rng)))
    # Exact ratios on the 0.7 boundary (2L/(m+n) == 0.7), where float rounding decides.
    pairs.append(("a b c d e f g h i j", "a b c d e f g x y z"))
    pairs.append(("a b c d e f g", "a b c d e f g x y z a b c"))
    for new, old in pairs:
        ref = scorer.score(new, old)["rougeL"].fmeasure  # self-instruct's call order
        assert rouge_l(tokenize(new), tokenize(old)) == ref, (new, old)
        if (new + old).lower().isascii():
            assert plain.score(new, old)["rougeL"].fmeasure == ref, (new, old)


# ---------------------------------------------------------------------------
# NoveltyIndex vs brute force


def _instruction_stream(rng: random.Random, n: int) -> list[str]:
    """Near-duplicate-heavy texts: mutations of earlier texts over a small vocab."""
    common = ["write", "a", "the", "of", "list", "poem", "about", "and", "to", "explain"]
    rare = [f"w{i}" for i in range(300)]

    def word() -> str:
        return rng.choice(common) if rng.random() < 0.6 else rng.choice(rare)

    def render(ws: list[str]) -> str:
        # Case and punctuation noise that tokenize() must see through.
        out = [w.upper() if rng.random() < 0.05 else w for w in ws]
        sep = rng.choice([" ", " ", ", ", " - ", "; "])
        return sep.join(out) + rng.choice(["", ".", "?", "!!"])

    pool: list[list[str]] = []
    texts = []
    for _ in range(n):
        if pool and rng.random() < 0.75:
            ws = list(rng.choice(pool[-200:]))
            for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 5])):
                op = rng.random()
                pos = rng.randrange(len(ws) + 1)
                if op < 0.3 and pos < len(ws):
                    ws[pos] = word()
                elif op < 0.5 and pos < len(ws):
                    del ws[pos]
                elif op < 0.7:
                    ws.insert(pos, word())
                elif op < 0.85 and pos + 1 < len(ws):
                    ws[pos], ws[pos + 1] = ws[pos + 1], ws[pos]
                elif ws:  # repeated tokens stress the multiset overlap
                    ws.insert(pos, rng.choice(ws))
        else:
            ws = [word() for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 10, 10, 12, 15, 20, 30]))]
        pool.append(ws)
        texts.append(render(ws))
    return texts


def _brute_best(query: list[str], kept: list[list[str]]) -> tuple[float, int | None]:
    best, arg = 0.0, None
    for i, old in enumerate(kept):
        f = rouge_l(query, old)
        if f > best:  # strict: ties keep the lowest id
            best, arg = f, i
    return best, arg


@pytest.mark.parametrize(
    "threshold,n,seed",
    [
        (0.7, 2000, 10), (0.7, 800, 11), (0.5, 600, 12), (0.9, 500, 13),
        (0.3, 300, 14), (0.0, 200, 15), (1.0, 200, 16),
    ],
)
def test_index_decisions_equal_brute_force(threshold, n, seed):
    rng = random.Random(seed)
    texts = _instruction_stream(rng, n)
    idx = NoveltyIndex(threshold=threshold)
    kept: list[list[str]] = []
    n_seeds = 30
    for text in texts[:n_seeds]:  # seeds: kept unconditionally, as in self-instruct
        idx.add(text)
        kept.append(tokenize(text))
    rejected = near = 0
    for i, text in enumerate(texts[n_seeds:]):
        toks = tokenize(text)
        best, arg = _brute_best(toks, kept)
        novel = best <= threshold
        assert idx.is_novel(text) == novel, (text, best)
        assert idx.max_similarity(text) == (best, arg), (text, best, arg)
        ok, score = idx.add_if_novel(text)
        assert ok == novel, (text, best)
        if not ok:
            assert score == best  # a rejection reports the exact maximum
            rejected += 1
        else:
            assert score <= best  # a kept text reports a lower bound
            kept.append(toks)
        near += abs(best - threshold) < 0.08
        assert len(idx) == len(kept)
    # The data must actually exercise both outcomes and the boundary region.
    if 0.0 < threshold < 1.0:
        assert rejected > n // 20 and len(kept) > n // 5 and near > n // 20, (rejected, len(kept), near)


def test_exact_score_for_kept_texts():
    rng = random.Random(20)
    texts = _instruction_stream(rng, 400)
    idx = NoveltyIndex()
    kept: list[list[str]] = []
    for text in texts:
        best, _ = _brute_best(tokenize(text), kept)
        ok, score = idx.add_if_novel(text, exact_score=True)
        assert (ok, score) == (best <= 0.7, best)
        if ok:
            kept.append(tokenize(text))


def test_small_api_cases():
    idx = NoveltyIndex(threshold=0.7)
    assert len(idx) == 0
    assert idx.max_similarity("anything") == (0.0, None)
    assert idx.is_novel("anything")
    idx.add("")  # empty texts are kept but never similar to anything
    idx.add("Write a poem about the sea.")
    idx.add("Write a poem about the sea.")
    assert len(idx) == 3
    assert idx.max_similarity("write a poem about the sea") == (1.0, 1)  # tie -> lowest id
    assert idx.max_similarity("") == (0.0, None)
    assert idx.max_similarity("unknown words only") == (0.0, None)
    assert idx.is_novel("")
    assert not idx.is_novel("WRITE a poem, about the sea!!")
    # Exact ratio 2L/(m+n) == 0.7: rouge_score's float F lands on either side,
    # and the decision must follow the float, as the brute-force scan does.
    idx2 = NoveltyIndex(threshold=0.7)
    idx2.add("a b c d e f g h i j")  # m=n=10, L=7 -> F == 0.7 -> novel
    assert rouge_l(tokenize("a b c d e f g x y z"), tokenize("a b c d e f g h i j")) == 0.7
    assert idx2.is_novel("a b c d e f g x y z")
    idx3 = NoveltyIndex(threshold=0.7)
    idx3.add("a b c d e f g h")  # m=8, n=12, L=7 -> F == 0.7000000000000001 -> rejected
    assert rouge_l(tokenize("a b c d e f g x y z u v"), tokenize("a b c d e f g h")) > 0.7
    assert not idx3.is_novel("a b c d e f g x y z u v")
    assert idx3.add_if_novel("a b c d e f g x y z u v") == (False, 0.7000000000000001)
    with pytest.raises(ValueError):
        NoveltyIndex(threshold=1.5)


def test_index_past_initial_capacity():
    # > 1024 kept texts: exercises the growth of the length table and postings.
    rng = random.Random(30)
    vocab = [f"v{i}" for i in range(60)]
    kept = [[rng.choice(vocab) for _ in range(rng.randint(4, 12))] for _ in range(2100)]
    idx = NoveltyIndex()
    for ws in kept:
        idx.add(" ".join(ws))
    assert len(idx) == 2100
    for _ in range(40):
        base = list(rng.choice(kept))
        base[rng.randrange(len(base))] = rng.choice(vocab)
        best, arg = _brute_best(base, kept)
        text = " ".join(base)
        assert idx.is_novel(text) == (best <= 0.7)
        assert idx.max_similarity(text) == (best, arg)
