"""The text space of sandbox envs: any Unicode string up to a length."""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from gymnasium.spaces import Text

__all__ = ["SAMPLE_CHARSET", "UnicodeText", "fit"]

#: Characters :meth:`UnicodeText.sample` draws from: letters and digits, so that a sampled
#: action is one harmless shell word (``check_env`` steps every env with sampled actions).
SAMPLE_CHARSET = string.ascii_letters + string.digits


class UnicodeText(Text):
    """A :class:`gymnasium.spaces.Text` that contains any string of ``min_length`` to
    ``max_length`` characters.

    Gymnasium's ``Text`` only contains strings over its charset (alphanumerics by default), so
    ``"ls -la"`` or a traceback would be outside it. This space keeps the charset for
    :meth:`sample` only. Observations of sandbox envs are cut to ``max_length`` before they are
    returned, so they always lie in the space.
    """

    def __init__(
        self,
        max_length: int,
        *,
        min_length: int = 0,
        sample_charset: str = SAMPLE_CHARSET,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        """Create the space.

        Args:
            max_length: Longest string in the space.
            min_length: Shortest string in the space.
            sample_charset: Characters that :meth:`sample` draws from.
            seed: Seed of the sampler.
        """
        super().__init__(max_length, min_length=min_length, charset=sample_charset, seed=seed)

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a string of an allowed length (any characters)."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, UnicodeText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )

    def __hash__(self) -> int:
        return hash((UnicodeText, self.min_length, self.max_length))


def fit(text: str, limit: int | Text, note: str = "\n[... cut ...]\n") -> str:
    """``text`` cut in the middle to at most ``limit`` characters (or a text space's
    ``max_length``); head and tail are kept.
    """
    if isinstance(limit, Text):
        limit = limit.max_length
    if len(text) <= limit:
        return text
    if limit <= len(note) + 2:
        return text[:limit]
    keep = limit - len(note)
    head = keep // 2
    return text[:head] + note + text[len(text) - (keep - head) :]
