# Generated from _async_llm.py by scripts/unasync.py: edit the async file, then regenerate.
"""The model service of one sandbox, synchronous (``sb.llm``; the sync module is generated).

In relay mode the agent's chat.completions requests wait for the trainer::

    with client.sandbox(model_service={"mode": "relay"}) as sb:
        for call in sb.llm.calls():       # ends when the sandbox is gone
            call.respond(completion)      # a chat.completion object (dict)

or ``sb.llm.serve(handler)`` with ``handler(request) -> completion`` (the callback form).
``sb.llm.trajectory()`` lists the recorded ``{"request", "response"}`` pairs. Over the Ray
transport (``Client.from_ray``) the same calls go straight to the sandbox's Worker.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rock_serve.errors import NotFound, SandboxNotFound
from rock_serve.protocol.llm import LLMAnswer, LLMCall, LLMCallList, Trajectory
from rock_serve.sdk import _base, _llm_base

if TYPE_CHECKING:
    from rock_serve.sdk._sync import Client
    from rock_serve.sdk._sync_sandbox import Sandbox

__all__ = ["LLMCallHandle", "SandboxLLM", "answer_call", "poll_calls", "release_calls"]


def poll_calls(client: Client, sandbox_id: str, wait: float, max_calls: int) -> list[LLMCall]:
    """One long poll for a sandbox's relayed calls."""
    response = client._send(_llm_base.poll(sandbox_id, wait, max_calls))
    return _base.parse(response, LLMCallList).calls


def answer_call(client: Client, sandbox_id: str, call_id: str, body: LLMAnswer) -> None:
    """Answer one relayed call."""
    client._send(_llm_base.answer(sandbox_id, call_id, body))


def release_calls(client: Client, sandbox_id: str, call_ids: list[str]) -> None:
    """Hand polled calls back to the queue; a gone sandbox is fine."""
    if not call_ids:
        return
    try:
        client._send(_llm_base.release(sandbox_id, call_ids))
    except NotFound:
        pass


class LLMCallHandle:
    """One relayed model call: ``.request`` (the chat.completions body), ``.sandbox_id``,
    ``.call_id``, ``.step``; answer it once with :meth:`respond` or :meth:`fail`.
    """

    def __init__(self, client: Client, call: LLMCall) -> None:
        """Bind a call to the client that answers it."""
        self._client = client
        self.call = call
        self.request: dict[str, Any] = call.request
        self.sandbox_id = call.sandbox_id
        self.call_id = call.call_id
        self.step = call.step

    def respond(self, completion: dict[str, Any]) -> None:
        """Send the agent this chat.completion object (as SSE chunks if it asked to stream).

        Raises:
            NotFound: the call no longer waits (timed out, the agent left, answered already).
        """
        answer_call(self._client, self.sandbox_id, self.call_id, LLMAnswer(response=completion))

    def fail(self, message: str) -> None:
        """Fail the call: the agent gets an OpenAI-style 500 error with ``message``."""
        answer_call(self._client, self.sandbox_id, self.call_id, LLMAnswer(error=message))


class SandboxLLM:
    """The model service of one sandbox (``sandbox.llm``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        """Bind to a sandbox."""
        self._sandbox = sandbox

    def poll(self, *, wait: float = 20.0, max_calls: int = 256) -> list[LLMCallHandle]:
        """The calls waiting for an answer now (waits up to ``wait`` s for one).

        Raises:
            SandboxNotFound: the sandbox is gone.
            NotFound: it has no model service.
        """
        client = self._sandbox.client
        calls = poll_calls(client, self._sandbox.id, wait, max_calls)
        return [LLMCallHandle(client, c) for c in calls]

    def calls(self, *, wait: float = 20.0) -> Iterator[LLMCallHandle]:
        """Every relayed call, as it comes; ends when the sandbox is gone. Calls polled but
        not yet handed out when the loop is left go back to the queue.
        """
        batch: list[LLMCallHandle] = []
        try:
            while True:
                try:
                    batch = self.poll(wait=wait)
                except SandboxNotFound:
                    return
                while batch:
                    yield batch.pop(0)
        finally:
            if batch:
                ids = [c.call_id for c in batch]
                release_calls(self._sandbox.client, self._sandbox.id, ids)

    def serve(self, handler: Callable[[dict[str, Any]], Any], *, wait: float = 20.0) -> int:
        """Answer every call with ``handler(request) -> completion`` (may be a coroutine
        function) until the sandbox is gone; a handler that raises fails that call. Returns
        how many calls were answered.
        """
        answered = 0
        for call in self.calls(wait=wait):
            try:
                completion = handler(call.request)
                if inspect.isawaitable(completion):
                    completion = completion
            except Exception as exc:
                call.fail(f"{type(exc).__name__}: {exc}")
                continue
            try:
                call.respond(completion)
            except NotFound:
                continue  # the agent gave up on it meanwhile
            answered += 1
        return answered

    def trajectory_record(self) -> Trajectory:
        """The recorded calls with the trajectory id."""
        client = self._sandbox.client
        response = client._send(_llm_base.trajectory(self._sandbox.id))
        return _base.parse(response, Trajectory)

    def trajectory(self) -> list[dict[str, Any]]:
        """The recorded ``{"request", "response"}`` pairs so far (``"error"`` too if it failed)."""
        record = self.trajectory_record()
        return [step.model_dump(mode="json", exclude_none=True) for step in record.steps]
