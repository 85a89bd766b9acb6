"""User errors: reported as one clear message and a non-zero exit, never a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable, List


class ConfigError(Exception):
    """One or more problems with what the user asked for; each names the key or file."""

    def __init__(self, problems: Iterable[str] | str):
        self.problems: List[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def render(self) -> str:
        head = "invalid configuration:"
        return head + "".join(f"\n  - {p}" for p in self.problems)


def suggest(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean X?' for the closest candidates, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
