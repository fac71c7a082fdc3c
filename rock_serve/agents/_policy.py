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

__all__ = ["SUBMIT", "ScriptedPolicy", "action_message", "solution_replies"]

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
