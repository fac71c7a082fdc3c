"""``rock/AgentTask-v0``: a real agent (mini-swe-agent) works on a task in the sandbox, and the
policy being trained answers its LLM calls, one call per step.

``reset`` writes the task's repository and starts the agent in the background (its LLM endpoint
is the in-sandbox relay of :mod:`rock_serve.agents`); the observation is the agent's first
pending chat request. Each ``step(action)`` answers the pending call with the assistant message
``action`` and waits for the agent's next call (the next observation) or its exit; when the
agent exits, the task's verifier runs and its verdict is the reward (1.0 solved, 0.0 not) and
the episode terminates. At the time limit the episode is truncated and the verifier scores the
repository as it is. The agent runs in the env's session, so the next reset or ``close`` ends
it.

Observations are the pending request's ``messages`` as JSON text (``info["request"]`` has the
whole chat.completions body); actions are the assistant message's text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from typing import Any, ClassVar

from rock_serve.agents import AGENT_IMAGE
from rock_serve.agents._protocol import (
    LLM_DIR,
    REPO_DIR,
    CallEvent,
    ExitEvent,
    agent_argv,
    completion,
    launch_command,
    launch_files,
    next_argv,
    parse_event,
    response_body,
)
from rock_serve.agents._tasks import BUILTIN_TASKS, AgentTask, builtin_task
from rock_serve.envs._core import (
    EnvCore,
    EpisodeContext,
    Exec,
    Op,
    ReadFile,
    Run,
    WriteFiles,
    output_text,
)
from rock_serve.envs._spaces import UnicodeText, fit
from rock_serve.errors import AgentFailed, InvalidRequest, Timeout
from rock_serve.protocol import ExecResult

__all__ = ["AgentTaskEnv"]

OBSERVATION_CHARS = 262_144
ACTION_CHARS = 32_768
_WAIT_SLICE = 20.0


class AgentTaskEnv(EnvCore[str, str]):
    """Answer an agent's LLM calls, one per step, until it exits; the verifier gives the reward.

    ``reset(options={"task": name})`` picks the task of one episode (built-in: ``fix_add``).
    """

    sandbox_defaults: ClassVar[dict[str, Any]] = {"image": AGENT_IMAGE}

    def __init__(
        self,
        *,
        task: str = "fix_add",
        agent: str = "mini-swe-agent",
        step_limit: int = 30,
        call_timeout: float = 600.0,
        wait_timeout: float = 300.0,
    ) -> None:
        """Configure the env.

        Args:
            task: The built-in task to pose.
            agent: The agent package to run (``mini-swe-agent``).
            step_limit: The most LLM calls the agent itself allows (its own limit).
            call_timeout: Seconds the agent waits for one answer (one step) before giving up.
            wait_timeout: Seconds a step waits for the agent's next call or its exit.
        """
        self.task: AgentTask = builtin_task(task)
        agent_argv(agent, self.task, step_limit=step_limit)  # validates agent and step_limit
        if not 0 < call_timeout <= 86_400 or not 0 < wait_timeout <= 86_400:
            raise InvalidRequest("call_timeout and wait_timeout must be in (0, 86400] seconds")
        self.agent = agent
        self.step_limit = step_limit
        self.call_timeout = float(call_timeout)
        self.wait_timeout = float(wait_timeout)
        self.observation_space = UnicodeText(OBSERVATION_CHARS)
        self.action_space = UnicodeText(ACTION_CHARS)
        self.pending: CallEvent | None = None

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[str, dict[str, Any]]]:
        """Write the task, start the agent, and wait for its first LLM call."""
        name = ctx.options.get("task", self.task.id)
        if name not in BUILTIN_TASKS:
            raise InvalidRequest(f"unknown task {name!r}; tasks: {', '.join(BUILTIN_TASKS)}")
        self.task = builtin_task(name)
        argv = agent_argv(self.agent, self.task, step_limit=self.step_limit)
        self.pending = None
        yield WriteFiles(launch_files(self.task))
        yield Run(launch_command(argv, call_timeout=self.call_timeout, detach=False), timeout=30)
        event = yield from self._next(1)
        if isinstance(event, ExitEvent):
            log = yield from self._log()
            raise AgentFailed(f"{self.agent} exited with {event.exit_code} at start: {log}")
        self.pending = event
        return self._observe(event), {"task": self.task.id, "agent": self.agent, **self._info()}

    def step(
        self, action: str, ctx: EpisodeContext
    ) -> Generator[Op, Any, tuple[str, float, bool, bool, dict[str, Any]]]:
        """Answer the pending call with ``action``; observe the next call or score the exit."""
        call = self.pending
        assert call is not None
        if ctx.last_step:
            reward, details = yield from self._verify()
            obs = f"[time limit: the agent was stopped]\n{details['output']}"
            return fit(obs, OBSERVATION_CHARS), reward, False, True, {"verifier": details}
        path, body = response_body(call.n, completion(action, call.request, n=call.n))
        yield WriteFiles({path: body})
        event = yield from self._next(call.n + 1)
        if isinstance(event, CallEvent):
            self.pending = event
            return self._observe(event), 0.0, False, False, self._info()
        self.pending = None
        reward, details = yield from self._verify()
        obs = f"[the agent exited with code {event.exit_code}]\n{details['output']}"
        info = {"exit_code": event.exit_code, "calls": event.calls, "verifier": details}
        return fit(obs, OBSERVATION_CHARS), reward, True, False, info

    def _observe(self, event: CallEvent) -> str:
        return fit(
            json.dumps(event.request.get("messages", []), ensure_ascii=False), OBSERVATION_CHARS
        )

    def _info(self) -> dict[str, Any]:
        assert self.pending is not None
        return {"call": self.pending.n, "request": self.pending.request}

    def _next(self, n: int) -> Generator[Op, Any, CallEvent | ExitEvent]:
        deadline = time.monotonic() + self.wait_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"the agent made no call and did not exit in {self.wait_timeout:g}s")
            wait = min(_WAIT_SLICE, left)
            result: ExecResult = yield Exec(next_argv(n, wait), timeout=wait + 30)
            if result.exit_code != 0:
                raise AgentFailed(f"the relay failed: {output_text(result)[-500:]}")
            event = parse_event(result.stdout_bytes().decode("utf-8", "replace"))
            if event is not None:
                return event

    def _log(self) -> Generator[Op, Any, str]:
        data: bytes | None = yield ReadFile(f"{LLM_DIR}/agent.log", missing_ok=True)
        return (data or b"").decode("utf-8", "replace")[-2000:]

    def _verify(self) -> Generator[Op, Any, tuple[float, dict[str, Any]]]:
        result: ExecResult = yield Exec(
            ["bash", "-c", f'cd {REPO_DIR} && exec python3 -c "$0"', self.task.verifier],
            timeout=120,
        )
        passed = result.exit_code == 0 and not result.timed_out
        tail = output_text(result).strip()[-500:]
        verdict = "Verifier: solved (reward 1.0)." if passed else f"Verifier: not solved ({tail})."
        return (1.0 if passed else 0.0), {
            "passed": passed,
            "exit_code": result.exit_code,
            "output": verdict,
        }
