"""User-style checks for tests of `custom = [...]` in the constraints stage (importable as
``custom_checks:has_exclamation`` because pytest puts tests/ on sys.path)."""
from __future__ import annotations


def has_exclamation(response: str, at_least: int = 1) -> bool:
    """True when the response has at least `at_least` exclamation marks."""
    return response.count("!") >= at_least
