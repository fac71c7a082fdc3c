"""``rock/GuessNumber-v0``: guess a secret number; a small fast text game for smoke tests.

The secret is drawn from the env's seeded random generator. With ``state="sandbox"`` (the
default) it lives in a file in the sandbox, and each guess is checked there by bash builtins in
the env's session (one round trip, no process started); with ``state="memory"`` the env never
touches a sandbox, which makes it a pure in-process env.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any, Literal

from rock_serve.envs._core import EnvCore, EpisodeContext, Op, Run, WriteFiles, output_text
from rock_serve.envs._spaces import UnicodeText
from rock_serve.errors import InvalidRequest

__all__ = ["GuessNumber"]

_NUMBER = re.compile(r"-?\d+")
_CHECK = (
    "read -r s < game/secret; read -r n < game/guesses; n=$((n+1)); echo $n > game/guesses; "
    "g={guess}; if (( g < s )); then v=higher; elif (( g > s )); then v=lower; else v=correct; "
    'fi; echo "$n $v"'
)


class GuessNumber(EnvCore[str, str]):
    """Guess the secret number between 1 and ``high``; each answer says higher or lower.

    Observations: the rules, then the verdict of each guess. Actions: text whose first integer
    is the guess (``"50"``, ``"I guess 50"``). Reward 1.0 for the correct guess, which ends the
    episode; a text without a number, or one out of range, costs a step and changes nothing.
    """

    def __init__(self, *, high: int = 100, state: Literal["sandbox", "memory"] = "sandbox") -> None:
        """Configure the game.

        Args:
            high: The secret is between 1 and ``high`` (inclusive).
            state: ``"sandbox"`` keeps the secret and the guess count in the sandbox;
                ``"memory"`` keeps them in the process and uses no sandbox.
        """
        if not isinstance(high, int) or isinstance(high, bool) or not 1 <= high <= 10**9:
            raise InvalidRequest(f"high must be an int between 1 and 10**9, not {high!r}")
        if state not in ("sandbox", "memory"):
            raise InvalidRequest(f"state must be 'sandbox' or 'memory', not {state!r}")
        self.high = high
        self.state = state
        self.uses_sandbox = state == "sandbox"
        self.observation_space = UnicodeText(512)
        self.action_space = UnicodeText(256)
        self.secret = 0
        self.guesses = 0

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[str, dict[str, Any]]]:
        """Draw a secret (and store it in the sandbox)."""
        self.secret = int(ctx.np_random.integers(1, self.high + 1))
        self.guesses = 0
        if self.uses_sandbox:
            yield WriteFiles({"game/secret": f"{self.secret}\n", "game/guesses": "0\n"})
        rules = (
            f"I am thinking of a whole number between 1 and {self.high}. Guess it: answer with "
            "one number per turn, and I will tell you whether mine is higher or lower."
        )
        return rules, {"high": self.high}

    def step(
        self, action: str, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[str, float, bool, bool, dict[str, Any]]]:
        """Check one guess."""
        found = _NUMBER.search(action)
        guess = int(found.group()) if found is not None and len(found.group()) <= 12 else None
        if guess is None or not 1 <= guess <= self.high:
            note = f"Answer with one whole number between 1 and {self.high}."
            return note, 0.0, False, False, {"valid": False}
        if self.uses_sandbox:
            result = yield Run(_CHECK.format(guess=guess), timeout=10)
            count, _, verdict = output_text(result).strip().partition(" ")
            if not count.isdigit():
                raise InvalidRequest(f"unexpected answer from the game's check: {count!r}")
            self.guesses = int(count)
        else:
            self.guesses += 1
            verdict = (
                "higher" if guess < self.secret else "lower" if guess > self.secret else ("correct")
            )
        info: dict[str, Any] = {"valid": True, "guesses": self.guesses}
        if verdict == "correct":
            return f"{guess} is correct!", 1.0, True, False, info
        if verdict in ("higher", "lower"):
            return f"My number is {verdict} than {guess}.", 0.0, False, False, info
        raise InvalidRequest(f"unexpected answer from the game's check: {verdict!r}")
