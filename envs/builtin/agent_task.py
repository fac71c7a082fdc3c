"""``rock/AgentTask-v0``: a real agent (mini-swe-agent) works on a task in the sandbox, and the
policy being trained answers its LLM calls, one call per step.

The env's sandbox has the platform's model service in relay mode (its ``model_service`` create
field; the agent's ``OPENAI_BASE_URL`` is that endpoint, and every call is recorded as the
sandbox's trajectory). ``reset`` writes the task's repository and starts the agent in the
background; the observation is the agent's first pending chat request. Each ``step(action)``
answers the pending call with the assistant message ``action`` and waits for the agent's next
call (the next observation) or its exit; when the agent exits, the task's verifier runs and its
verdict is the reward (1.0 solved, 0.0 not) and the episode terminates. At the time limit the
episode is truncated and the verifier scores the repository as it is. The agent runs in the
env's session, so the next reset or ``close`` ends it. How long the agent waits for one answer
is the model service's ``timeout`` (``make(..., sandbox={"model_service": {"mode": "relay",
"timeout": S}})``).

Observations are the pending request's ``messages`` as JSON text (``info["request"]`` has the
whole chat.completions body); actions are the assistant message's text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar

from rock_serve.agents import AGENT_IMAGE
from rock_serve.agents._protocol import (
    LLM_DIR,
    REPO_DIR,
    agent_argv,
    agent_command,
    completion,
    repo_files,
)
from rock_serve.agents._tasks import BUILTIN_TASKS, AgentTask, builtin_task
from rock_serve.envs._core import (
    EnvCore,
    EpisodeContext,
    Exec,
    LLMPoll,
    LLMRespond,
    Op,
    ReadFile,
    Run,
    WriteFiles,
    output_text,
)
from rock_serve.envs._spaces import UnicodeText, fit
from rock_serve.errors import AgentFailed, InvalidRequest, Timeout
from rock_serve.protocol import ExecResult
from rock_serve.protocol.llm import LLMCall

__all__ = ["AgentTaskEnv"]

OBSERVATION_CHARS = 262_144
ACTION_CHARS = 32_768
#: How long one poll for the agent's next call waits before the env checks whether it exited.
_POLL_SLICE = 1.0
_EXIT_FILE = f"{LLM_DIR}/exit_code"


@dataclass(frozen=True)
class _Exit:
    exit_code: int


class AgentTaskEnv(EnvCore[str, str]):
    """Answer an agent's LLM calls, one per step, until it exits; the verifier gives the reward.

    ``reset(options={"task": name})`` picks the task of one episode (built-in: ``fix_add``).
    """

    sandbox_defaults: ClassVar[dict[str, Any]] = {
        "image": AGENT_IMAGE,
        "model_service": {"mode": "relay"},
    }

    def __init__(
        self,
        *,
        task: str = "fix_add",
        agent: str = "mini-swe-agent",
        step_limit: int = 30,
        wait_timeout: float = 300.0,
    ) -> None:
        """Configure the env.

        Args:
            task: The built-in task to pose.
            agent: The agent package to run (``mini-swe-agent``).
            step_limit: The most LLM calls the agent itself allows (its own limit).
            wait_timeout: Seconds a step waits for the agent's next call or its exit.
        """
        self.task: AgentTask = builtin_task(task)
        agent_argv(agent, self.task, step_limit=step_limit)  # validates agent and step_limit
        if not 0 < wait_timeout <= 86_400:
            raise InvalidRequest("wait_timeout must be in (0, 86400] seconds")
        self.agent = agent
        self.step_limit = step_limit
        self.wait_timeout = float(wait_timeout)
        self.observation_space = UnicodeText(OBSERVATION_CHARS)
        self.action_space = UnicodeText(ACTION_CHARS)
        self.pending: LLMCall | None = None
        self.calls = 0

    def reset(self, ctx: EpisodeContext) -> Generator[Op, Any, tuple[str, dict[str, Any]]]:
        """Write the task, start the agent, and wait for its first LLM call."""
        name = ctx.options.get("task", self.task.id)
        if name not in BUILTIN_TASKS:
            raise InvalidRequest(f"unknown task {name!r}; tasks: {', '.join(BUILTIN_TASKS)}")
        self.task = builtin_task(name)
        argv = agent_argv(self.agent, self.task, step_limit=self.step_limit)
        self.pending, self.calls = None, 0
        yield WriteFiles({**repo_files(self.task), f"{LLM_DIR}/agent.log": ""})
        # In the env's session (the next reset or close ends it); its exit code in a file.
        command = f"{{ ( {agent_command(argv)} ); echo $? > ../{_EXIT_FILE}; }}"
        yield Run(f"(cd {REPO_DIR} && {command}) > /dev/null 2>&1 < /dev/null &", timeout=30)
        event = yield from self._next()
        if isinstance(event, _Exit):
            log = yield from self._log()
            raise AgentFailed(f"{self.agent} exited with {event.exit_code} at start: {log}")
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
        yield LLMRespond(call.call_id, completion(action, call.request, n=self.calls))
        event = yield from self._next()
        if isinstance(event, LLMCall):
            return self._observe(event), 0.0, False, False, self._info()
        self.pending = None
        reward, details = yield from self._verify()
        obs = f"[the agent exited with code {event.exit_code}]\n{details['output']}"
        info = {"exit_code": event.exit_code, "calls": self.calls, "verifier": details}
        return fit(obs, OBSERVATION_CHARS), reward, True, False, info

    def _observe(self, call: LLMCall) -> str:
        return fit(
            json.dumps(call.request.get("messages", []), ensure_ascii=False), OBSERVATION_CHARS
        )

    def _info(self) -> dict[str, Any]:
        assert self.pending is not None
        return {"call": self.calls, "request": self.pending.request}

    def _next(self) -> Generator[Op, Any, LLMCall | _Exit]:
        """The agent's next call (now pending) or its exit."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            calls: list[LLMCall] = yield LLMPoll(wait=_POLL_SLICE, max_calls=1)
            if calls:
                self.pending = calls[0]
                self.calls += 1
                return calls[0]
            code: bytes | None = yield ReadFile(_EXIT_FILE, missing_ok=True)
            if code is not None and code.strip():
                return _Exit(int(code))
            if time.monotonic() >= deadline:
                raise Timeout(f"the agent made no call and did not exit in {self.wait_timeout:g}s")

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
