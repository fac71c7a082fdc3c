"""``rock/CodeExec-v0``: answer a programming problem with Python code, scored by hidden tests.

Each episode is one seeded problem (see :mod:`rock_serve.envs.builtin._problems`). The action
is Python source defining ``solve`` (a fenced Markdown block is unwrapped); it runs in the
sandbox against hidden tests, and the reward is 1.0 when all pass (or the fraction passed with
``partial_credit``). One attempt by default; with ``max_attempts > 1`` a failed attempt's
observation tells what went wrong and the episode goes on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Sequence
from typing import Any

from rock_serve.envs._core import EnvCore, EpisodeContext, Exec, Op, output_text
from rock_serve.envs._spaces import UnicodeText, fit
from rock_serve.envs.builtin._problems import FAMILIES, RUNNER, Problem, generate
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import ExecResult

__all__ = ["CodeExec", "extract_code"]

OBSERVATION_CHARS = 8192

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The code of an answer: the last fenced block (a python one if any), else the text."""
    blocks: list[tuple[str, str]] = _FENCE.findall(text)
    if not blocks:
        return text
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    return (python or [body for _, body in blocks])[-1]


def _families(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return tuple(sorted(FAMILIES))
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise InvalidRequest(
            f"unknown problem family {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"families: {', '.join(sorted(FAMILIES))}"
        )
    return names


def _call(args: list[Any]) -> str:
    return f"solve({', '.join(json.dumps(a) for a in args)})"


class CodeExec(EnvCore[str, str]):
    """Write ``solve`` for a seeded problem; hidden tests in the sandbox give the reward.

    Problem families: ``multiples``, ``rotate``, ``caesar``, ``run_length``, ``recurrence``,
    ``digit_sum``. ``reset(options={"family": ...})`` picks the family of one episode.
    """

    def __init__(
        self,
        *,
        family: str | Sequence[str] | None = None,
        max_attempts: int = 1,
        timeout: float = 10.0,
        partial_credit: bool = False,
    ) -> None:
        """Configure the env.

        Args:
            family: Problem families to draw from (None: all).
            max_attempts: Answers allowed per episode; the episode ends at the first that
                passes every test.
            timeout: Seconds the candidate may run, for all tests together.
            partial_credit: Reward the fraction of tests passed instead of all-or-nothing.
        """
        self.families = _families(family)
        if not isinstance(max_attempts, int) or not 1 <= max_attempts <= 100:
            raise InvalidRequest(f"max_attempts must be an int in [1, 100], not {max_attempts!r}")
        if not 0 < timeout <= 600:
            raise InvalidRequest(f"timeout must be in (0, 600], not {timeout!r}")
        self.max_attempts = max_attempts
        self.timeout = float(timeout)
        self.partial_credit = partial_credit
        self.observation_space = UnicodeText(OBSERVATION_CHARS)
        self.action_space = UnicodeText(32_768)
        self.problem: Problem | None = None
        self.attempts = 0

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[str, dict[str, Any]]]:
        """Draw the problem (nothing to set up in the sandbox)."""
        chosen = _families(ctx.options["family"]) if "family" in ctx.options else self.families
        self.problem = problem = generate(int(ctx.np_random.integers(0, 2**62)), chosen)
        self.attempts = 0
        info = {"family": problem.family, "problem_id": problem.id, "tests": len(problem.inputs)}
        yield from ()  # nothing to set up in the sandbox
        return fit(problem.prompt, OBSERVATION_CHARS), info

    def step(
        self, action: str, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[str, float, bool, bool, dict[str, Any]]]:
        """Run the answer against the hidden tests."""
        problem = self.problem
        assert problem is not None
        self.attempts += 1
        job = {
            "code": extract_code(action),
            "entry": "solve",
            "inputs": problem.inputs,
            "expected": problem.expected,
            "timeout": self.timeout,
        }
        result: ExecResult = yield Exec(
            ["python3", "-I", "-c", RUNNER], stdin=json.dumps(job), timeout=self.timeout + 30
        )
        report = _report(result)
        total = len(problem.inputs)
        passed = int(report.get("passed", 0))
        solved = report.get("status") == "ok" and passed == total
        reward = 1.0 if solved else (passed / total if self.partial_credit else 0.0)
        terminated = solved or self.attempts >= self.max_attempts
        obs = fit(_feedback(report, passed, total, self.timeout), OBSERVATION_CHARS)
        info = {"passed": passed, "total": total, "status": report.get("status"), "solved": solved}
        return obs, reward, terminated, False, info


def _report(result: ExecResult) -> dict[str, Any]:
    lines = output_text(result).strip().splitlines()
    if result.exit_code == 0 and lines:
        try:
            report = json.loads(result.stdout.strip().splitlines()[-1])
            if isinstance(report, dict):
                return report
        except (ValueError, IndexError):
            pass
    status = "timeout" if result.timed_out else "runner_error"
    return {"status": status, "passed": 0, "detail": "\n".join(lines[-10:])}


def _feedback(report: dict[str, Any], passed: int, total: int, timeout: float) -> str:
    status = report.get("status")
    if status == "ok" and passed == total:
        return f"All {total} hidden tests passed."
    if status == "timeout":
        return f"Your code did not finish within {timeout:g} seconds (0 of {total} tests passed)."
    if status == "load_error":
        return f"Your code did not load: {report.get('detail', '')}"
    if status in ("crash", "runner_error"):
        return f"Running your code failed:\n{report.get('detail', '')}"
    failure = report.get("failure") or {}
    text = f"{passed} of {total} hidden tests passed."
    if failure:
        got = failure.get("got") or {}
        outcome = (
            f"raised {got['error']}"
            if "error" in got
            else f"returned {json.dumps(got.get('value'))}"
        )
        text += (
            f" First failure: {_call(failure.get('args', []))} {outcome}; expected "
            f"{json.dumps(failure.get('expected'))}."
        )
    return text
