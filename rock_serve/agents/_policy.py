"""Scripted policies: canned assistant messages, chosen by the conversation so far.

No real model is reachable in tests; a scripted policy stands in for the one being trained.
It is a function of the request alone (the k-th reply answers a conversation with k earlier
assistant messages), so the same policy drives :func:`~rock_serve.agents.run_agent` and the
``rock/AgentTask-v0`` env turn by turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rock_serve.agents._tasks import AgentTask

__all__ = ["SUBMIT", "HTTPPolicy", "ScriptedPolicy", "action_message", "solution_replies"]

#: The command with which mini-swe-agent's agent submits (its first output line ends the run).
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


def action_message(command: str, thought: str = "Next step.") -> str:
    """An assistant message in mini-swe-agent's text format: a thought, one bash block."""
    return f"THOUGHT: {thought}\n\n```mswea_bash_command\n{command}\n```"


def solution_replies(task: AgentTask) -> list[str]:
    """The replies that solve ``task``: its solution commands, then the submit command."""
    return [action_message(c, "Work on the task.") for c in task.solution] + [
        action_message(SUBMIT, "The task is done; submit.")
    ]


class ScriptedPolicy:
    """Answers a conversation with ``replies[k]``, k = its number of assistant messages; after
    the script, the last reply again.
    """

    def __init__(self, replies: Sequence[str]) -> None:
        """Keep the script (at least one reply)."""
        if not replies:
            raise ValueError("a scripted policy needs at least one reply")
        self.replies = list(replies)

    def reply(self, messages: Sequence[dict[str, Any]]) -> str:
        """The reply to a conversation."""
        k = sum(1 for m in messages if m.get("role") == "assistant")
        return self.replies[min(k, len(self.replies) - 1)]

    def __call__(self, request: dict[str, Any]) -> str:
        """The reply to a chat.completions request body."""
        return self.reply(request.get("messages", []))


class HTTPPolicy:
    """Answers each call by forwarding it to an OpenAI-compatible server (the trainer's vLLM or
    SGLang endpoint, say): the trainer-side proxy, whose API key never enters the sandbox.

    An async policy for :func:`~rock_serve.agents.run_agent`; ``aclose()`` (or ``async with``)
    closes its HTTP client.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        """Point the policy at a server.

        Args:
            base_url: The server's OpenAI base URL (``http://host:port/v1``).
            api_key: Sent as a bearer token.
            model: Replaces the request's model name (the agent's is ``rock-policy``).
            timeout: Seconds one completion may take.
        """
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout
        )

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        """The server's chat.completion for the request (non-streaming).

        Raises:
            RuntimeError: The server answered with an error (the agent's call fails with it).
        """
        body = {**request, "stream": False}
        if self.model is not None:
            body["model"] = self.model
        resp = await self._http.post("/chat/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"the model server answered {resp.status_code}: {resp.text[:300]}")
        answer: dict[str, Any] = resp.json()
        return answer

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()

    async def __aenter__(self) -> HTTPPolicy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
