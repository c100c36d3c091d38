"""Benchmark: self-instruct's ROUGE-L novelty filter at 50k+ kept instructions.

Feeds a seeded stream of instruction-like strings (templates x vocabulary, with
planted near-duplicates) through ``NoveltyIndex.add_if_novel`` exactly as the
self-instruct loop would, then times the naive full scan on a prefix of the
same stream, checks that both make identical decisions there, and extrapolates
the naive cost to the full run.

Run:  PYTHONPATH=. python bench/rouge_novelty.py [--n 70000] [--prefix 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

try:
    from synthloop.generator.rouge import NoveltyIndex, rouge_l, tokenize
except ImportError:  # running from a source checkout: PYTHONPATH=<repo root>
    from generator.rouge import NoveltyIndex, rouge_l, tokenize

VERBS = """write compose draft create generate describe explain summarize list
name identify classify translate rewrite paraphrase compare suggest design
outline plan evaluate analyze predict recommend convert correct edit find
calculate estimate sort rank extract detect tell give propose argue""".split()
FORMS = """poem story essay email letter tweet haiku limerick speech report
review headline slogan joke riddle dialogue recipe plan checklist summary
outline proposal question quiz song ad description bio""".split()
ADJS = """short long funny sad formal casual persuasive detailed brief creative
simple technical polite angry friendly professional humorous serious vivid
concise catchy dramatic gentle practical""".split()
AUDIENCE = """children students teachers parents engineers doctors tourists
beginners experts managers customers investors voters nurses farmers artists
programmers retirees athletes scientists""".split()
FUNCTION = """the a an of to in for on with about from by into that this these
and or as at your my their its""".split()
REAL_NOUNS = """sea moon city river forest computer robot dog cat garden winter
summer friendship music history economy climate vaccine bicycle coffee
library airport mountain ocean volcano language memory dream election market
software database network algorithm kitchen hospital school museum
restaurant bridge planet galaxy island desert recycling budget holiday
wedding interview startup smartphone password museum painting novel
battery engine harvest""".split()

_SYL = "ka lo mi ra tu ve sen dor pli an qu ix bre sta mon gal fer tis nor hup zel vin cor dax ul pe".split()


def _pseudo_vocab(rng: random.Random, size: int) -> list[str]:
    # Content words beyond a hand-written list: pronounceable pseudo-words, so
    # the vocabulary has a long tail like real generated instructions do.
    out = set(REAL_NOUNS)
    while len(out) < size:
        out.add("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4))))
    return sorted(out)


TEMPLATES = [
    "{Verb} a {adj} {form} about {np}.",
    "{Verb} a {form} for {aud} about {np} and {np}.",
    "Given a {form} about {np}, {verb} the main points in {k} sentences.",
    "How does {np} affect {np}? {Verb} your answer for {aud}.",
    "Can you {verb} the difference between {np} and {np}?",
    "{Verb} {k} ways to improve {np} in {np}.",
    "You are a {adj} {noun} expert. {Verb} a {form} explaining {np} to {aud}.",
    "Classify the following {noun}s into {noun}s and {noun}s: {list}.",
    "Translate the sentence about {np} into {lang}: \"{clause}\"",
    "Given the list {list}, {verb} the items by {noun}.",
    "What is the best way to {verb} {np} when {clause}?",
    "{Verb} a {adj} {form} that {verb2}s {np} without mentioning {np}.",
    "Pretend you are {np}. {Verb} a {form} to {aud} about {np}.",
    "Find the {noun} in this text and {verb} it: {clause}, {clause}.",
    "{Verb} the pros and cons of {np} for {aud}, then {verb2} a {form}.",
    "Explain to {aud} why {np} matters for {np}, using {k} examples.",
    "{Verb} a step-by-step {form} for {np}; include {k} tips about {np} and {np}.",
    "Write a {lang} function that {verb2}s a list of {noun}s by {noun} and returns {np}.",
    "Is it true that {clause}? {Verb} your reasoning in a {adj} way.",
    "Read the following paragraph and {verb} its tone: {clause}. {clause}. {clause}.",
]
SUFFIXES = [
    " Keep it under {k}0 words.",
    " Use {np} as an example.",
    " Make sure to mention {np} and {np}.",
    " Answer as if you were talking to {aud} who love {np}.",
    " Avoid jargon about {np}.",
    " Start with a question about {np}.",
]
LANGS = "French Spanish German Python Rust Japanese Italian JavaScript Hindi SQL".split()


class Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = _pseudo_vocab(self.rng, 20000)
        # Zipf-like weights: a few content words are common, most are rare.
        acc = 0.0
        self.cum_w = []
        for r in range(len(self.vocab)):
            acc += 1.0 / (r + 1) ** 0.9
            self.cum_w.append(acc)
        self.rng.shuffle(self.vocab)

    def noun(self) -> str:
        return self.rng.choices(self.vocab, cum_weights=self.cum_w)[0]

    def np(self) -> str:
        r = self.rng
        parts = []
        if r.random() < 0.5:
            parts.append(r.choice(["the", "a", "your", "their", "modern", "local"]))
        if r.random() < 0.5:
            parts.append(r.choice(ADJS))
        parts.append(self.noun())
        if r.random() < 0.3:
            parts += [r.choice(["of", "in", "for", "near"]), self.noun()]
        return " ".join(parts)

    def clause(self) -> str:
        r = self.rng
        words = [r.choice(FUNCTION) if r.random() < 0.35 else self.noun() for _ in range(r.randint(3, 12))]
        return " ".join(words)

    def instruction(self) -> str:
        r = self.rng
        tpl = r.choice(TEMPLATES)
        if r.random() < 0.4:  # optional constraint, as LLM outputs often add
            tpl += r.choice(SUFFIXES)
        out = []
        # Fill slots left to right so repeated slots get independent values.
        i = 0
        while i < len(tpl):
            j = tpl.find("{", i)
            if j < 0:
                out.append(tpl[i:])
                break
            out.append(tpl[i:j])
            k = tpl.index("}", j)
            out.append(self._slot(tpl[j + 1 : k]))
            i = k + 1
        s = "".join(out)
        if r.random() < 0.08:  # occasional long instruction with an inline input
            s += " Input: " + ". ".join(self.clause() for _ in range(r.randint(3, 10))) + "."
        return s

    def _slot(self, name: str) -> str:
        r = self.rng
        if name in ("verb", "Verb", "verb2"):
            v = r.choice(VERBS)
            return v.capitalize() if name == "Verb" else v
        if name == "form":
            return r.choice(FORMS)
        if name == "adj":
            return r.choice(ADJS)
        if name == "aud":
            return r.choice(AUDIENCE)
        if name == "np":
            return self.np()
        if name == "noun":
            return self.noun()
        if name == "k":
            return str(r.randint(2, 10))
        if name == "lang":
            return r.choice(LANGS)
        if name == "clause":
            return self.clause()
        if name == "list":
            return ", ".join(self.noun() for _ in range(r.randint(3, 8)))
        raise KeyError(name)

    def mutate(self, s: str) -> str:
        """A near-duplicate: a few word edits / punctuation / case changes."""
        r = self.rng
        words = s.split()
        for _ in range(r.choice([1, 1, 1, 2, 2, 3, 4])):
            op = r.random()
            pos = r.randrange(len(words))
            if op < 0.35:
                words[pos] = self.noun()
            elif op < 0.55 and len(words) > 3:
                del words[pos]
            elif op < 0.75:
                words.insert(pos, r.choice(FUNCTION + ADJS))
            elif op < 0.9 and pos + 1 < len(words):
                words[pos], words[pos + 1] = words[pos + 1], words[pos]
            else:
                words[pos] = words[pos].upper() + r.choice([",", "!", "?", ""])
        return " ".join(words)

    def stream(self, n: int, dup_rate: float = 0.15) -> list[str]:
        out: list[str] = []
        for _ in range(n):
            if out and self.rng.random() < dup_rate:
                # Mostly recent items: LLMs repeat what is in their prompt window.
                j = max(0, len(out) - 1 - int(self.rng.expovariate(1 / 2000)))
                out.append(self.mutate(out[j]))
            else:
                out.append(self.instruction())
        return out


def naive_filter(seed_toks: list[list[str]], tok_stream: list[list[str]], threshold: float):
    """The reference algorithm: score each new text against every kept text."""
    kept = list(seed_toks)  # seeds are kept unconditionally
    decisions: list[bool] = []
    scores: list[float] = []
    comparisons = 0
    for toks in tok_stream:
        best = 0.0
        for old in kept:
            f = rouge_l(toks, old)
            if f > best:
                best = f
        comparisons += len(kept)
        ok = not best > threshold
        decisions.append(ok)
        scores.append(best)
        if ok:
            kept.append(toks)
    return decisions, scores, comparisons


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=70000, help="instructions in the stream")
    ap.add_argument("--seeds", type=int, default=175, help="seed tasks added unconditionally")
    ap.add_argument("--prefix", type=int, default=3000, help="stream prefix timed with the naive scan")
    ap.add_argument("--ref-prefix", type=int, default=150,
                    help="stream prefix timed with rouge_score's own scorer, if installed (0: skip)")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    gen = Gen(args.seed)
    seeds = [gen.instruction() for _ in range(args.seeds)]
    stream = gen.stream(args.n)
    t_gen = time.perf_counter() - t0
    lens = [len(tokenize(s)) for s in stream]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f} at start")
    print(f"stream: {len(stream)} instructions + {len(seeds)} seeds, generated in {t_gen:.1f}s; "
          f"tokens/instruction mean {statistics.mean(lens):.1f}, max {max(lens)}")

    # ---- indexed filter over the whole stream
    rss0 = _rss_mb()
    idx = NoveltyIndex(threshold=args.threshold)
    for s in seeds:
        idx.add(s)
    times = []
    decisions = []
    scores = []
    kept_before = []  # kept-set size each check ran against
    pc = time.perf_counter
    t_start = pc()
    cpu_start = time.process_time()
    cpu_times = []  # per-check CPU time: the machine may be shared, wall time jitters
    pt = time.process_time
    for s in stream:
        kept_before.append(len(idx))
        a, c = pc(), pt()
        ok, sc = idx.add_if_novel(s)
        times.append(pc() - a)
        cpu_times.append(pt() - c)
        decisions.append(ok)
        scores.append(sc)
    t_idx = pc() - t_start
    cpu_idx = time.process_time() - cpu_start
    n_kept = len(idx)
    print(f"\nNoveltyIndex.add_if_novel over {len(stream)} checks: total {t_idx:.2f}s wall "
          f"({cpu_idx:.2f}s CPU), mean {1e3 * t_idx / len(stream):.3f} ms/check")
    print(f"  kept {n_kept} (incl. {len(seeds)} seeds), rejected {decisions.count(False)}; "
          f"process RSS grew {_rss_mb() - rss0:.0f} MB while the index filled")
    print("  per check, by kept-set size:      wall: mean / p50 / p99 / max    | CPU: mean / p99  (ms)")
    for lo in (0, 10000, 25000, 40000, 50000):
        sel = sorted(t for t, k in zip(times, kept_before) if lo <= k < lo + 5000)
        cpu = sorted(t for t, k in zip(cpu_times, kept_before) if lo <= k < lo + 5000)
        if sel:
            print(f"  {lo:>5}-{lo + 4999} kept (n={len(sel):>4}):  "
                  f"{1e3 * statistics.mean(sel):.3f} / {1e3 * sel[len(sel) // 2]:.3f} / "
                  f"{1e3 * sel[int(len(sel) * 0.99)]:.3f} / {1e3 * sel[-1]:.2f}  | "
                  f"{1e3 * statistics.mean(cpu):.3f} / {1e3 * cpu[int(len(cpu) * 0.99)]:.3f}")

    # Other entry points at full size, on fresh instructions (nothing added).
    probe = Gen(args.seed + 1).stream(1000)
    a = pc()
    for s in probe:
        idx.is_novel(s)
    t_nov = (pc() - a) / len(probe)
    a = pc()
    for s in probe:
        idx.max_similarity(s)
    t_max = (pc() - a) / len(probe)
    print(f"  at {len(idx)} kept: is_novel {1e3 * t_nov:.3f} ms/call, exact max_similarity "
          f"{1e3 * t_max:.3f} ms/call (1000 fresh instructions)")

    # ---- naive full scan on a prefix, same stream, same seeds
    p = min(args.prefix, len(stream))
    seed_toks = [tokenize(s) for s in seeds]
    prefix_toks = [tokenize(s) for s in stream[:p]]
    t0 = pc()
    n_dec, n_sc, comps = naive_filter(seed_toks, prefix_toks, args.threshold)
    t_naive = pc() - t0
    per_cmp = t_naive / comps
    t_idx_prefix = sum(times[:p])
    agree = sum(a == b for a, b in zip(n_dec, decisions[:p]))
    # Rejections report the exact max in both, so the scores must match too.
    sc_agree = sum(1 for a, b, d in zip(n_sc, scores[:p], n_dec) if not d and a == b)
    print(f"\nnaive full scan (rouge_l vs every kept text) on the first {p} checks:")
    print(f"  {comps} comparisons in {t_naive:.2f}s = {1e6 * per_cmp:.2f} us/comparison; "
          f"index on the same checks: {t_idx_prefix:.3f}s "
          f"(speedup vs naive scan on prefix: {t_naive / t_idx_prefix:.1f}x)")
    print(f"  decision agreement with index: {agree}/{p}"
          f"{'  (EXACT)' if agree == p else '  MISMATCH!'}; "
          f"rejection scores identical: {sc_agree}/{n_dec.count(False)}")

    # ---- rouge_score's own scorer, as self-instruct calls it (tokenizes both
    # texts and fills a DP table for every pair): slower still per comparison.
    per_ref = None
    if args.ref_prefix > 0:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            print("\n(rouge_score not installed: reference-scorer timing skipped)")
        else:
            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
            kept_txt = list(seeds)
            r_comps = 0
            t0 = pc()
            for s, ok in zip(stream[: args.ref_prefix], decisions):
                scorer_best = max((scorer.score(s, old)["rougeL"].fmeasure for old in kept_txt), default=0.0)
                r_comps += len(kept_txt)
                assert (scorer_best <= args.threshold) == ok
                if ok:
                    kept_txt.append(s)
            per_ref = (pc() - t0) / r_comps
            print(f"\nrouge_score RougeScorer.score on the first {args.ref_prefix} checks: "
                  f"{1e6 * per_ref:.1f} us/comparison ({r_comps} comparisons, same decisions)")

    # ---- extrapolate: a naive scan costs per_cmp per kept text per check, so
    # its total is per_cmp * sum(kept size at each check): quadratic in the run.
    full_cmps = sum(kept_before)
    naive_full = full_cmps * per_cmp
    print(f"\nextrapolated naive scan over the full run: {full_cmps} comparisons "
          f"~ {naive_full:.0f}s ({naive_full / 3600:.2f} h) vs index {t_idx:.2f}s "
          f"-> speedup vs naive scan: {naive_full / t_idx:.0f}x")
    if per_ref is not None:
        print(f"  with rouge_score's scorer: ~{full_cmps * per_ref / 3600:.1f} h "
              f"-> speedup vs rouge_score scan: {full_cmps * per_ref / t_idx:.0f}x")
    last = min(5000, len(times))
    k_late = statistics.mean(kept_before[-last:])
    idx_late = statistics.mean(times[-last:])
    print(f"last {last} checks (~{k_late:.0f} kept): naive ~{1e3 * per_cmp * k_late:.1f} ms/check "
          f"vs index {1e3 * idx_late:.3f} ms/check "
          f"-> speedup vs naive scan: {per_cmp * k_late / idx_late:.0f}x")
    if agree != p:
        raise SystemExit("decision mismatch between index and naive scan")


if __name__ == "__main__":
    main()
