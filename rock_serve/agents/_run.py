"""Run a real agent package in a sandbox, its LLM calls answered by the trainer.

The sandbox must have the platform's model service (created with
``model_service={"mode": "relay"}``): the agent's ``OPENAI_BASE_URL`` is the sandbox's own
endpoint, whose calls the trainer answers through ``sb.llm``, over HTTP or Ray, and every call
is recorded as the sandbox's trajectory. :func:`start_agent` writes the task and starts the
agent as a background process; the run's :meth:`AgentRun.calls` yields each LLM call the agent
makes (``call.request`` is the chat.completions body; ``await call.respond(completion)`` or
``await call.fail(message)`` answers it) until the agent exits; :meth:`AgentRun.verify` runs
the task's verifier. :func:`run_agent` does all of it with a policy function (or, with
``policy=None``, leaves the answers to the model service itself: ``proxy`` or ``replay`` mode)
and returns an :class:`AgentOutcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rock_serve.agents._protocol import (
    LLM_DIR,
    REPO_DIR,
    agent_argv,
    agent_command,
    completion,
    repo_files,
)
from rock_serve.agents._tasks import AgentTask, builtin_task
from rock_serve.errors import AgentFailed, InvalidRequest, Timeout
from rock_serve.sdk import AsyncLLMCallHandle, AsyncProcess, AsyncSandbox

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

#: How long one long poll for the agent's next call may wait.
_WAIT_SLICE = 20.0


@dataclass
class LLMCall:
    """One LLM call of the agent, waiting for the trainer's answer (wraps the model service's
    call handle: ``.request``, ``.sandbox_id``, ``respond``, ``fail``).
    """

    request: dict[str, Any]
    """The chat.completions request body the agent sent."""
    sandbox_id: str
    """The sandbox the agent runs in."""
    n: int
    """1 for the agent's first call, then 2, 3..."""
    _run: AgentRun = field(repr=False)
    _handle: AsyncLLMCallHandle = field(repr=False)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's chat messages."""
        return list(self.request.get("messages", []))

    async def respond(self, answer: dict[str, Any] | str) -> None:
        """Answer with a chat.completion object (or just the assistant message's text).

        Raises:
            NotFound: The call no longer waits (it timed out, the agent left).
        """
        body = answer if isinstance(answer, dict) else completion(answer, self.request, n=self.n)
        await self._handle.respond(body)
        self._run.trajectory.append({"request": self.request, "response": body})

    async def fail(self, message: str) -> None:
        """Answer with an error: the agent's client sees an OpenAI-style HTTP 500."""
        await self._handle.fail(message)
        self._run.trajectory.append({"request": self.request, "error": message})


@dataclass
class AgentOutcome:
    """How an agent run ended."""

    reward: float
    """The verifier's verdict: 1.0 solved, 0.0 not."""
    exit_code: int
    """The agent process's exit code."""
    calls: int
    """LLM calls the agent made (answered by the trainer, or by the model service itself)."""
    trajectory: list[dict[str, Any]]
    """Every call as the model service recorded it: ``{"request", "response"}`` (or
    ``"error"``); replayable with ``model_service={"mode": "replay", "replay": ...}``."""
    trajectory_id: str
    """The sandbox's trajectory id (the recorded JSONL's name in the trajectory store)."""
    verifier_output: str
    """The tail of the verifier's output."""
    log_tail: str
    """The tail of the agent's own output."""
    seconds: float
    """Wall time from launch to verdict."""


class AgentRun:
    """A started agent in a sandbox (see :func:`start_agent`)."""

    def __init__(
        self, sandbox: AsyncSandbox, task: AgentTask, base: str, timeout: float, proc: AsyncProcess
    ) -> None:
        """Track a run whose files live under ``base`` in the sandbox, its agent ``proc``."""
        self.sandbox = sandbox
        self.task = task
        self.base = base
        self.process = proc
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.exit_code: int | None = None
        self.trajectory: list[dict[str, Any]] = []
        """The calls this run's trainer answered (see :meth:`LLMCall.respond`)."""
        self.started = time.monotonic()

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"the agent did not finish within {self.timeout:g}s")
        return left

    async def calls(self) -> AsyncIterator[LLMCall]:
        """The agent's LLM calls, in order, until it exits (then :attr:`exit_code` is set).

        Answer each call before asking for the next one (the agent waits for it).

        Raises:
            Timeout: The run's timeout passed first.
        """
        async for call in llm_calls(self):
            yield call

    async def wait(self) -> int:
        """Wait for the agent's exit without answering calls (the model service answers them:
        proxy or replay mode); its exit code.

        Raises:
            Timeout: The run's timeout passed first.
        """
        try:
            info = await self.process.wait(timeout=self._left())
        except Timeout:
            raise Timeout(f"the agent did not finish within {self.timeout:g}s") from None
        self.exit_code = info.exit_code if info.exit_code is not None else -1
        return self.exit_code

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
        with contextlib.suppress(Exception):
            info = await self.process.kill()
            if self.exit_code is None and info.exit_code is not None:
                self.exit_code = info.exit_code


async def llm_calls(run: AgentRun) -> AsyncIterator[LLMCall]:
    """The agent's pending LLM calls from the sandbox's model service (``sb.llm``), until the
    agent process exits: a long poll for calls raced against the process's wait.
    """
    n = 1
    waiter = asyncio.ensure_future(run.process.wait())
    poll: asyncio.Future[list[AsyncLLMCallHandle]] | None = None
    try:
        while True:
            left = run._left()
            poll = asyncio.ensure_future(run.sandbox.llm.poll(wait=min(_WAIT_SLICE, left)))
            done, _ = await asyncio.wait(
                {poll, waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if poll in done:
                handles, poll = poll.result(), None
                for handle in handles:
                    yield LLMCall(handle.request, run.sandbox.id, n, run, handle)
                    n += 1
                continue
            if waiter in done:
                info = waiter.result()
                run.exit_code = info.exit_code if info.exit_code is not None else -1
                return
    finally:
        for task in (poll, waiter):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


async def start_agent(
    sandbox: AsyncSandbox,
    task: AgentTask | str = "fix_add",
    *,
    agent: str = "mini-swe-agent",
    step_limit: int = 20,
    timeout: float = 600.0,
) -> AgentRun:
    """Write the task into the sandbox and start the agent on it in the background.

    Args:
        sandbox: A running sandbox created with ``model_service`` (the agent's LLM endpoint;
            its ``timeout`` is how long the agent waits for one answer) whose image has the
            agent (``agent-mini`` for mini-swe-agent) and python3.
        task: An :class:`AgentTask` or the name of a built-in one.
        agent: The agent package to run.
        step_limit: The most LLM calls the agent may make.
        timeout: Seconds the whole run may take.

    Raises:
        InvalidRequest: Unknown agent or task, bad limits.
    """
    task = builtin_task(task) if isinstance(task, str) else task
    argv = agent_argv(agent, task, step_limit=step_limit)
    if not 0 < timeout <= 86_400:
        raise InvalidRequest("timeout must be in (0, 86400] seconds")
    base = f"/tmp/rock-agent-{secrets.token_hex(6)}"
    await sandbox.files.mkdir(f"{base}/{LLM_DIR}")
    await sandbox.files.mkdir(f"{base}/{REPO_DIR}")
    for path, content in repo_files(task).items():
        await sandbox.files.write(f"{base}/{path}", content)
    proc = await sandbox.process.start(
        ["bash", "-c", agent_command(argv)], cwd=f"{base}/{REPO_DIR}"
    )
    return AgentRun(sandbox, task, base, timeout, proc)


async def run_agent(
    sandbox: AsyncSandbox,
    policy: Policy | None,
    *,
    task: AgentTask | str = "fix_add",
    agent: str = "mini-swe-agent",
    step_limit: int = 20,
    timeout: float = 600.0,
) -> AgentOutcome:
    """Run an agent on a task in a sandbox, answering its LLM calls with ``policy``; verify.

    Args:
        sandbox: A running sandbox with ``model_service`` whose image has the agent (e.g.
            ``agent-mini``).
        policy: Answers each chat.completions request (text or a chat.completion object;
            sync or async). An exception in it fails that call (the agent sees an error).
            None: the model service answers by itself (``proxy`` or ``replay`` mode).
        task: An :class:`AgentTask` or a built-in task's name.
        agent: The agent package to run.
        step_limit: The most LLM calls the agent may make.
        timeout: Seconds the whole run may take.

    Returns:
        The verifier's reward, the agent's exit code, the recorded trajectory and log tails.

    Raises:
        InvalidRequest: Unknown agent or task, bad limits.
        Timeout: The agent did not finish in time (it is killed).
        AgentFailed: The agent exited without making a single call (it could not start).
    """
    run = await start_agent(sandbox, task, agent=agent, step_limit=step_limit, timeout=timeout)
    try:
        if policy is None:
            await run.wait()
        else:
            await _answer_all(run, policy)
    finally:
        if run.exit_code is None:
            await run.kill()
    log = await run.log_tail()
    assert run.exit_code is not None
    record = await sandbox.llm.trajectory_record()
    steps = [s.model_dump(mode="json", exclude_none=True) for s in record.steps]
    if not steps and run.exit_code != 0:
        raise AgentFailed(f"{agent} exited with {run.exit_code} before its first LLM call: {log}")
    reward, verdict = await run.verify()
    return AgentOutcome(
        reward=reward,
        exit_code=run.exit_code,
        calls=len(steps),
        trajectory=steps,
        trajectory_id=record.trajectory_id,
        verifier_output=verdict,
        log_tail=log,
        seconds=time.monotonic() - run.started,
    )


async def _answer_all(run: AgentRun, policy: Policy) -> None:
    async for call in run.calls():
        try:
            answer = policy(call.request)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as exc:
            await call.fail(f"policy error: {type(exc).__name__}: {exc}")
            continue
        await call.respond(answer)
