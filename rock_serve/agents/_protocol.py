"""The sans-IO part of an agent run: files and commands shared by
:func:`~rock_serve.agents.run_agent` (async SDK) and ``rock/AgentTask-v0`` (env ops).

Layout, relative to a run's base directory: ``repo/`` (the task's files; the agent's working
directory) and ``.llm/`` (``agent.log``, mini-swe-agent's ``trajectory.json``). The agent's LLM
endpoint is the sandbox's model service (``OPENAI_BASE_URL``, set by the platform).
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from rock_serve.agents._tasks import AgentTask
from rock_serve.errors import InvalidRequest

__all__ = [
    "AGENTS",
    "LLM_DIR",
    "REPO_DIR",
    "agent_argv",
    "agent_command",
    "completion",
    "repo_files",
]

REPO_DIR = "repo"
LLM_DIR = ".llm"
#: The model name the agent is configured with (litellm ``openai/<name>`` at OPENAI_BASE_URL).
MODEL_NAME = "rock-policy"
#: Environment that makes mini-swe-agent run unattended and offline (no first-run setup prompt,
#: no download of litellm's cost map, no error for a model without a price).
AGENT_ENV = {
    "MSWEA_CONFIGURED": "true",
    "MSWEA_SILENT_STARTUP": "1",
    "MSWEA_COST_TRACKING": "ignore_errors",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "MSWEA_GLOBAL_CONFIG_DIR": "/tmp/mini-swe-agent",
    "PAGER": "cat",
}


def _mini_swe_agent(task: AgentTask, *, step_limit: int, model: str) -> list[str]:
    """mini-swe-agent's non-interactive CLI (``mini -y --exit-immediately``), text-based actions,
    its model an OpenAI-compatible one at ``OPENAI_BASE_URL`` through litellm.
    """
    return [
        "mini",
        "-y",
        "--exit-immediately",
        "-t",
        task.instruction,
        "--model-class",
        "litellm_textbased",
        "-m",
        f"openai/{model}",
        "-c",
        "mini_textbased.yaml",
        "-c",
        f"agent.step_limit={step_limit}",
        "-c",
        "agent.cost_limit=0",
        "-o",
        f"../{LLM_DIR}/trajectory.json",
    ]


#: Agents by name: each builds the argv that runs it in ``repo/``.
AGENTS = {"mini-swe-agent": _mini_swe_agent}


def agent_argv(
    agent: str, task: AgentTask, *, step_limit: int, model: str = MODEL_NAME
) -> list[str]:
    """The command line of a named agent on a task.

    Raises:
        InvalidRequest: Unknown agent or a bad step limit.
    """
    if agent not in AGENTS:
        raise InvalidRequest(f"unknown agent {agent!r}; agents: {', '.join(sorted(AGENTS))}")
    if not 1 <= step_limit <= 1000:
        raise InvalidRequest(f"step_limit must be in [1, 1000], not {step_limit!r}")
    return AGENTS[agent](task, step_limit=step_limit, model=model)


def repo_files(task: AgentTask) -> dict[str, str]:
    """The task's repository, as paths relative to a run's base directory."""
    return {f"{REPO_DIR}/{path}": content for path, content in task.files.items()}


def agent_command(argv: list[str]) -> str:
    """Bash (run in ``repo/``) that runs the agent unattended, its output in ``.llm/agent.log``;
    its LLM endpoint is the sandbox's model service (``OPENAI_BASE_URL`` from the platform).
    """
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in AGENT_ENV.items())
    return f"exec env {env} {shlex.join(argv)} > ../{LLM_DIR}/agent.log 2>&1 < /dev/null"


def completion(
    content: str, request: dict[str, Any] | None = None, *, n: int = 0
) -> dict[str, Any]:
    """A ``chat.completion`` object whose one choice is an assistant message with ``content``."""
    return {
        "id": f"chatcmpl-rock-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str((request or {}).get("model", MODEL_NAME)),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
