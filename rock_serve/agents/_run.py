"""Run a real agent package in a sandbox, its LLM calls answered by the trainer.

:func:`start_agent` writes the task and starts the agent in the background; the run's
:meth:`AgentRun.calls` yields each LLM call the agent makes (``call.request`` is the
chat.completions body; ``await call.respond(completion)`` or ``await call.fail(message)``
answers it) until the agent exits; :meth:`AgentRun.verify` runs the task's verifier.
:func:`run_agent` does all of it with a policy function and returns an :class:`AgentOutcome`.

The calls reach the trainer through :func:`llm_calls`, the one seam between an agent run and
the model service: today an in-sandbox relay (``_sandbox_relay.py``, over file and exec
operations, so it works with ``network: none`` on every runtime); the platform's model service
(``sb.llm.calls()``) plugs in there.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

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
from rock_serve.agents._tasks import AgentTask, builtin_task
from rock_serve.errors import AgentFailed, InvalidRequest, Timeout
from rock_serve.sdk import AsyncSandbox

__all__ = [
    "AgentOutcome",
    "AgentRun",
    "LLMCall",
    "Policy",
    "llm_calls",
    "run_agent",
    "start_agent",
]

#: A policy answers one chat.completions request: an assistant message's text or a whole
#: chat.completion object, sync or async.
Policy = Callable[[dict[str, Any]], "str | dict[str, Any] | Awaitable[str | dict[str, Any]]"]

#: How long one wait for the agent's next call may block inside the sandbox.
_WAIT_SLICE = 20.0


@dataclass
class LLMCall:
    """One LLM call of the agent, waiting for the trainer's answer (the model service's shape:
    ``.request``, ``.sandbox_id``, ``respond``, ``fail``).
    """

    request: dict[str, Any]
    """The chat.completions request body the agent sent."""
    sandbox_id: str
    """The sandbox the agent runs in."""
    n: int
    """1 for the agent's first call, then 2, 3..."""
    _run: AgentRun = field(repr=False)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's chat messages."""
        return list(self.request.get("messages", []))

    async def respond(self, answer: dict[str, Any] | str) -> None:
        """Answer with a chat.completion object (or just the assistant message's text)."""
        body = answer if isinstance(answer, dict) else completion(answer, self.request, n=self.n)
        await self._run._answer(self, body, None)

    async def fail(self, message: str) -> None:
        """Answer with an error: the agent's client sees an OpenAI-style HTTP 502."""
        await self._run._answer(self, None, message)


@dataclass
class AgentOutcome:
    """How an agent run ended."""

    reward: float
    """The verifier's verdict: 1.0 solved, 0.0 not."""
    exit_code: int
    """The agent process's exit code."""
    calls: int
    """LLM calls the agent made."""
    trajectory: list[dict[str, Any]]
    """Every call: ``{"request": body, "response": completion}`` (or ``"error"``)."""
    verifier_output: str
    """The tail of the verifier's output."""
    log_tail: str
    """The tail of the agent's own output."""
    seconds: float
    """Wall time from launch to verdict."""


class AgentRun:
    """A started agent in a sandbox (see :func:`start_agent`)."""

    def __init__(self, sandbox: AsyncSandbox, task: AgentTask, base: str, timeout: float) -> None:
        """Track a run whose files live under ``base`` in the sandbox."""
        self.sandbox = sandbox
        self.task = task
        self.base = base
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.exit_code: int | None = None
        self.trajectory: list[dict[str, Any]] = []
        self.started = time.monotonic()

    async def _exec(self, argv: list[str] | str, timeout: float) -> str:
        result = await self.sandbox.exec(argv, cwd=self.base, timeout=timeout)
        if result.exit_code != 0 or result.timed_out:
            raise AgentFailed(
                f"relay command failed (exit {result.exit_code}): "
                f"{(result.stdout_bytes() + result.stderr_bytes()).decode(errors='replace')[-500:]}"
            )
        return result.stdout_bytes().decode("utf-8", "replace")

    async def next_event(self, n: int) -> CallEvent | ExitEvent:
        """Wait for the agent's call ``n`` or its exit.

        Raises:
            Timeout: The run's timeout passed first.
        """
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"the agent made no call and did not exit within {self.timeout:g}s")
            wait = min(_WAIT_SLICE, left)
            event = parse_event(await self._exec(next_argv(n, wait), wait + 30))
            if event is not None:
                return event

    async def calls(self) -> AsyncIterator[LLMCall]:
        """The agent's LLM calls, in order, until it exits (then :attr:`exit_code` is set).

        Answer each call before asking for the next one.
        """
        async for call in llm_calls(self):
            yield call

    async def _answer(
        self, call: LLMCall, answer: dict[str, Any] | None, error: str | None
    ) -> None:
        path, body = response_body(call.n, answer, error)
        await self.sandbox.files.write(f"{self.base}/{path}", body)
        entry: dict[str, Any] = {"request": call.request}
        entry["response" if error is None else "error"] = answer if error is None else error
        self.trajectory.append(entry)

    async def verify(self) -> tuple[float, str]:
        """Run the task's verifier in the repository: ``(reward, output tail)``."""
        result = await self.sandbox.exec(
            ["python3", "-c", self.task.verifier], cwd=f"{self.base}/{REPO_DIR}", timeout=120
        )
        tail = (result.stdout_bytes() + result.stderr_bytes()).decode("utf-8", "replace")[-500:]
        return (1.0 if result.exit_code == 0 and not result.timed_out else 0.0), tail

    async def log_tail(self, chars: int = 2000) -> str:
        """The end of the agent's output."""
        try:
            data = await self.sandbox.files.read(f"{self.base}/{LLM_DIR}/agent.log")
        except Exception:
            return ""
        return data.decode("utf-8", "replace")[-chars:]

    async def kill(self) -> None:
        """End the agent (its whole process group) if it still runs; idempotent."""
        await self.sandbox.exec(
            f"p=$(cat {LLM_DIR}/pid 2>/dev/null) && kill -KILL -- -$p 2>/dev/null; true",
            cwd=self.base,
            timeout=30,
        )


async def llm_calls(run: AgentRun) -> AsyncIterator[LLMCall]:
    """The seam to the model service: the agent's pending LLM calls, until it exits."""
    n = 1
    while True:
        event = await run.next_event(n)
        if isinstance(event, ExitEvent):
            run.exit_code = event.exit_code
            return
        yield LLMCall(event.request, run.sandbox.id, event.n, run)
        n += 1


async def start_agent(
    sandbox: AsyncSandbox,
    task: AgentTask | str = "fix_add",
    *,
    agent: str = "mini-swe-agent",
    step_limit: int = 20,
    timeout: float = 600.0,
    call_timeout: float = 300.0,
) -> AgentRun:
    """Write the task into the sandbox and start the agent on it in the background.

    Args:
        sandbox: A running sandbox whose image has the agent (``agent-mini`` for
            mini-swe-agent) and python3.
        task: An :class:`AgentTask` or the name of a built-in one.
        agent: The agent package to run.
        step_limit: The most LLM calls the agent may make.
        timeout: Seconds the whole run may take.
        call_timeout: Seconds the agent waits for one answer before its call fails.

    Raises:
        InvalidRequest: Unknown agent or task, bad limits.
    """
    task = builtin_task(task) if isinstance(task, str) else task
    argv = agent_argv(agent, task, step_limit=step_limit)
    if not 0 < timeout <= 86_400 or not 0 < call_timeout <= 86_400:
        raise InvalidRequest("timeout and call_timeout must be in (0, 86400] seconds")
    base = f"/tmp/rock-agent-{secrets.token_hex(6)}"
    await sandbox.files.mkdir(f"{base}/{LLM_DIR}")
    await sandbox.files.mkdir(f"{base}/{REPO_DIR}")
    for path, content in launch_files(task).items():
        await sandbox.files.write(f"{base}/{path}", content)
    run = AgentRun(sandbox, task, base, timeout)
    await run._exec(
        ["bash", "-c", launch_command(argv, call_timeout=call_timeout, detach=True)], 30
    )
    return run


async def run_agent(
    sandbox: AsyncSandbox,
    policy: Policy,
    *,
    task: AgentTask | str = "fix_add",
    agent: str = "mini-swe-agent",
    step_limit: int = 20,
    timeout: float = 600.0,
) -> AgentOutcome:
    """Run an agent on a task in a sandbox, answering its LLM calls with ``policy``; verify.

    Args:
        sandbox: A running sandbox whose image has the agent (e.g. ``agent-mini``).
        policy: Answers each chat.completions request (text or a chat.completion object;
            sync or async). An exception in it fails that call (the agent sees an error).
        task: An :class:`AgentTask` or a built-in task's name.
        agent: The agent package to run.
        step_limit: The most LLM calls the agent may make.
        timeout: Seconds the whole run may take.

    Returns:
        The verifier's reward, the agent's exit code, the trajectory and log tails.

    Raises:
        InvalidRequest: Unknown agent or task, bad limits.
        Timeout: The agent did not finish in time (it is killed).
        AgentFailed: The agent exited without making a single call (it could not start).
    """
    run = await start_agent(sandbox, task, agent=agent, step_limit=step_limit, timeout=timeout)
    try:
        async for call in run.calls():
            try:
                answer = policy(call.request)
                if inspect.isawaitable(answer):
                    answer = await answer
            except Exception as exc:
                await call.fail(f"policy error: {type(exc).__name__}: {exc}")
                continue
            await call.respond(answer)
    finally:
        if run.exit_code is None:
            await run.kill()
    log = await run.log_tail()
    assert run.exit_code is not None
    if not run.trajectory and run.exit_code != 0:
        raise AgentFailed(f"{agent} exited with {run.exit_code} before its first LLM call: {log}")
    reward, verdict = await run.verify()
    return AgentOutcome(
        reward=reward,
        exit_code=run.exit_code,
        calls=len(run.trajectory),
        trajectory=run.trajectory,
        verifier_output=verdict,
        log_tail=log,
        seconds=time.monotonic() - run.started,
    )
