"""``rock/Terminal-v0``: shell tasks scored by a verifier run in the sandbox.

Each episode is one seeded task (see :mod:`rock_serve.envs.builtin._terminal_tasks`): the
first observation is its instruction, every action is a bash command run in the env's
persistent session, and every observation is the command's output and exit code. The action
``submit`` (or the last step the time limit allows) runs the verifier, whose verdict is the
reward: 1.0 solved, 0.0 not.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from typing import Any

from rock_serve.envs._core import EnvCore, EpisodeContext, Exec, Op, Run, WriteFiles, output_text
from rock_serve.envs._spaces import UnicodeText, fit
from rock_serve.envs.builtin._terminal_tasks import FAMILIES, VERIFIER, TerminalTask, generate
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import ExecResult, SessionRunResult

__all__ = ["Terminal", "families"]

OBSERVATION_CHARS = 16_384
ACTION_CHARS = 8_192


def families(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validated family names (None: all of them)."""
    if value is None:
        return tuple(sorted(FAMILIES))
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise InvalidRequest(
            f"unknown task family {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"families: {', '.join(sorted(FAMILIES))}"
        )
    return names


def describe(result: SessionRunResult, timeout: float | None) -> str:
    """A command's result as the agent sees it: output, then notes and the exit code."""
    text = output_text(result)
    if text and not text.endswith("\n"):
        text += "\n"
    notes = []
    if result.truncated:
        notes.append("[output truncated]")
    if result.timed_out:
        notes.append(f"[command timed out after {timeout:g}s and was interrupted]")
    if result.session_restarted:
        notes.append("[the shell did not stop and was restarted: its state is lost]")
    if result.session_ended:
        notes.append("[the shell exited; the next command starts a new one]")
    notes.append(f"[exit code {result.exit_code}]")
    return text + "\n".join(notes)


class Terminal(EnvCore[str, str]):
    """Solve a shell task, then send ``submit``; the verifier's verdict is the reward.

    Task families: ``fix_test`` (make a failing unit test pass), ``fix_config`` (find and fix a
    wrong setting among config files), ``count_lines`` (count log lines, write the number to a
    file), ``find_token`` (find a token in a directory tree). ``reset(options={"family": ...})``
    picks the family of one episode.
    """

    def __init__(
        self,
        *,
        family: str | Sequence[str] | None = None,
        step_timeout: float = 30.0,
        submit_action: str = "submit",
        verify_on_truncation: bool = True,
        max_output_chars: int = 8192,
    ) -> None:
        """Configure the env.

        Args:
            family: Task families to draw from (None: all).
            step_timeout: Seconds a command may run before it is interrupted.
            submit_action: The action that ends the episode and runs the verifier.
            verify_on_truncation: Run the verifier on the last step the time limit allows too.
            max_output_chars: Output beyond this many characters is cut.
        """
        self.families = families(family)
        if not 0 < step_timeout <= 3600:
            raise InvalidRequest(f"step_timeout must be in (0, 3600], not {step_timeout!r}")
        if not submit_action.strip():
            raise InvalidRequest("submit_action must not be blank")
        if not 64 <= max_output_chars <= OBSERVATION_CHARS // 2:
            raise InvalidRequest(f"max_output_chars must be in [64, {OBSERVATION_CHARS // 2}]")
        self.step_timeout = float(step_timeout)
        self.submit_action = submit_action.strip()
        self.verify_on_truncation = verify_on_truncation
        self.max_output_chars = max_output_chars
        self.observation_space = UnicodeText(OBSERVATION_CHARS)
        self.action_space = UnicodeText(ACTION_CHARS)
        self.task: TerminalTask | None = None

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[str, dict[str, Any]]]:
        """Draw the task and write its files."""
        chosen = families(ctx.options["family"]) if "family" in ctx.options else self.families
        self.task = task = generate(int(ctx.np_random.integers(0, 2**62)), chosen)
        yield WriteFiles(task.files)
        obs = (
            f"{task.instruction}\n\nYou are in a bash shell in the task's directory. Send one "
            f"command per turn; send `{self.submit_action}` when you are done."
        )
        return fit(obs, OBSERVATION_CHARS), {"family": task.family, "task_id": task.id}

    def step(
        self, action: str, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[str, float, bool, bool, dict[str, Any]]]:
        """Run one command, or verify on ``submit``."""
        if action.strip() == self.submit_action:
            reward, verdict, details = yield from self._verify()
            return verdict, reward, True, False, {"verifier": details}
        result: SessionRunResult = yield Run(
            action, timeout=self.step_timeout, max_output_bytes=self.max_output_chars * 4
        )
        obs = fit(describe(result, self.step_timeout), self.max_output_chars)
        info: dict[str, Any] = {
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "session_restarted": result.session_restarted,
        }
        if ctx.last_step and self.verify_on_truncation:
            reward, verdict, details = yield from self._verify()
            info["verifier"] = details
            return fit(f"{obs}\n{verdict}", OBSERVATION_CHARS), reward, False, True, info
        return obs, 0.0, False, False, info

    def _verify(self) -> Generator[Op, Any, tuple[float, str, dict[str, Any]]]:
        assert self.task is not None
        result: ExecResult = yield Exec(
            ["python3", "-c", VERIFIER], stdin=json.dumps(self.task.check), timeout=60
        )
        passed = result.exit_code == 0 and not result.timed_out
        tail = output_text(result).strip()[-500:]
        verdict = "Verifier: solved (reward 1.0)." if passed else f"Verifier: not solved ({tail})."
        details = {"passed": passed, "exit_code": result.exit_code, "output": tail}
        return (1.0 if passed else 0.0), verdict, details
