"""Verifiable checks: does a response follow a constraint? One module wraps every checker.

The checkers are IFEval's, as the PyPI package `if-verifiable` implements them (ids such as
``punctuation:no_comma``, ``length_constraints:number_words``), plus checks a user registers:
``register_check("my:code_block", "mypkg.checks:has_code_block")`` makes any function
``fn(response, **kwargs) -> bool`` a check (configs name it in the ``constraints`` stage's
``custom`` list, ``synthloop eval`` takes ``--check ID=module:function``).

Strict and loose follow IFEval's definitions: strict checks the response as it is; loose passes if
any of eight variants passes (the response without its first line, its last line, both, each with
markdown ``*`` removed), which forgives a preamble such as "Sure, here it is:".

Offline sentence counting: IFEval counts sentences with nltk's English punkt model, which is a
download (``punkt_tab``) this project cannot make at run time. When that data is missing we give
the checkers nltk's punkt tokenizer with default (untrained) parameters: the same algorithm
without the learned English abbreviation list, so "Dr. Smith" may count as two sentences. Word
tokenisation for ``change_case:capital_word_frequency`` then skips nltk's sentence split
(``preserve_line=True``). `sentence_splitter()` says which one is in use; evaluation results
record it. Only if-verifiable's own module namespace is patched, never nltk's.
"""
from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

Check = Callable[..., bool]

_CUSTOM: dict[str, Check] = {}


class CheckError(ValueError):
    """A constraint that cannot be checked: unknown id, bad kwargs, an unimportable function."""


@functools.cache
def _ifeval() -> tuple[dict, dict, Callable[[str], list[str]]]:
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval import instructions_util as util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

    try:
        util._get_sentence_tokenizer()
        util.nltk.word_tokenize("Probe.")
    except LookupError:
        _use_offline_tokenizers(util)
    return INSTRUCTION_DICT, INSTRUCTION_CONFLICTS, get_loose_transformations


class _OfflineNltk:
    """nltk as if-verifiable's checkers see it, with a word tokeniser that needs no punkt data."""

    def __init__(self, nltk):
        self._nltk = nltk

    def word_tokenize(self, text: str, language: str = "english") -> list[str]:
        return self._nltk.word_tokenize(text, language, preserve_line=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)


def _use_offline_tokenizers(util) -> None:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    tokenizer = PunktSentenceTokenizer()
    util._get_sentence_tokenizer = lambda: tokenizer
    util.nltk = _OfflineNltk(util.nltk)
    util.OFFLINE = True


def sentence_splitter() -> str:
    """Which sentence splitter the checkers use: ``punkt-english`` or ``punkt-untrained``."""
    _ifeval()
    from if_verifiable.ifeval import instructions_util as util

    return "punkt-untrained" if getattr(util, "OFFLINE", False) else "punkt-english"


def _resolve(target: str | Check) -> Check:
    if callable(target):
        return target
    mod, _, fn = str(target).partition(":")
    if not mod or not fn:
        raise CheckError(f"check '{target}' must be 'module.path:function'")
    try:
        out = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise CheckError(f"check '{target}': cannot import ({e})") from None
    if not callable(out):
        raise CheckError(f"check '{target}' is not callable")
    return out


def register_check(cid: str, target: str | Check) -> None:
    """Make `target` (a function or ``"module:function"``) the check for constraint id `cid`.

    >>> register_check("demo:has_digit", lambda response: any(c.isdigit() for c in response))
    >>> check_one("It costs 5 euros.", "demo:has_digit", {}).loose
    True
    """
    if cid in _ifeval()[0]:
        raise CheckError(f"check id '{cid}' is one of IFEval's; pick another name")
    _CUSTOM[cid] = _resolve(target)


def known_ids() -> list[str]:
    return sorted([*_ifeval()[0], *_CUSTOM])


def conflicts(cid: str) -> set[str]:
    """Ids that must not be combined with `cid` (IFEval's table; a custom check conflicts with itself)."""
    table = _ifeval()[1]
    return set(table.get(cid, set())) | {cid}


@dataclass(frozen=True)
class Result:
    id: str
    strict: bool
    loose: bool


def parse_kwargs(kwargs: str | Mapping | None) -> dict:
    """Constraint kwargs as stored (a JSON object string) or given (a dict), without null values."""
    if kwargs is None or kwargs == "":
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise CheckError(f"kwargs are not valid JSON ({e.msg})") from None
    if not isinstance(kwargs, Mapping):
        raise CheckError(f"kwargs must be an object, got {type(kwargs).__name__}")
    return {k: v for k, v in kwargs.items() if v is not None}


def _builder(cid: str, kwargs: dict, prompt: str) -> Callable[[str], bool]:
    from langdetect import DetectorFactory

    # langdetect samples internally: without a fixed seed the same text can flip between languages,
    # and the case checkers (which require English) would give different verdicts run to run. Set
    # on every check, not once: anything else in the process may reset it.
    DetectorFactory.seed = 0
    if cid in _CUSTOM:
        fn = _CUSTOM[cid]
        return lambda text: bool(fn(text, **kwargs))
    registry = _ifeval()[0]
    if cid not in registry:
        raise CheckError(f"unknown constraint id '{cid}'")
    checker = registry[cid](cid)
    wanted = set(checker.get_instruction_args_keys())
    extra = set(kwargs) - wanted - {"prompt"}
    if extra:
        raise CheckError(f"{cid}: unknown kwargs {sorted(extra)} (takes {sorted(wanted)})")
    # IFEval's checkers draw a random value for any argument left out; we never let them.
    missing = wanted - set(kwargs)
    if missing:
        raise CheckError(f"{cid}: missing kwargs {sorted(missing)}")
    try:
        checker.build_description(**{k: v for k, v in kwargs.items() if k != "prompt"})
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:   # e.g. letter = ["a"]
        raise CheckError(f"{cid}: bad kwargs ({e})") from None
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker.check_following


def validate(cid: str, kwargs: str | Mapping | None) -> None:
    """Raise `CheckError` unless (`cid`, `kwargs`) can be checked."""
    _builder(cid, parse_kwargs(kwargs), "")


def check_one(response: str, cid: str, kwargs: str | Mapping | None, prompt: str = "") -> Result:
    """Strict and loose verdicts of one constraint on one response.

    >>> check_one("no commas here", "punctuation:no_comma", "{}")
    Result(id='punctuation:no_comma', strict=True, loose=True)
    """
    follows = _builder(cid, parse_kwargs(kwargs), prompt)

    def ok(text: str) -> bool:
        try:
            return bool(text.strip()) and bool(follows(text))
        except Exception:       # a checker that breaks on odd text has not seen its constraint met
            return False

    strict = ok(response)
    loose = strict or any(ok(v) for v in _ifeval()[2](response)[1:])
    return Result(cid, strict, loose)


def check(response: str, constraints: Sequence[Mapping], prompt: str = "") -> list[Result]:
    """Verdicts for every ``{id, kwargs}`` constraint of a response, in order."""
    return [check_one(response, c["id"], c.get("kwargs"), prompt) for c in constraints]


def verified(results: Sequence[Result], *, loose: bool = True) -> tuple[float | None, bool | None]:
    """(fraction passed, all passed) of a response's results; (None, None) without constraints."""
    if not results:
        return None, None
    passed = sum(r.loose if loose else r.strict for r in results)
    return passed / len(results), passed == len(results)
