"""The sans-IO part of an agent run: files, commands and parsing shared by
:func:`~rock_serve.agents.run_agent` (async SDK) and ``rock/AgentTask-v0`` (env ops).

Layout, relative to a run's base directory: ``repo/`` (the task's files; the agent's working
directory) and ``.llm/`` (the in-sandbox relay: ``relay.py``, requests, answers, ``agent.log``,
``exit.json``). Every command here runs with the base directory as its working directory.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rock_serve.agents._tasks import AgentTask
from rock_serve.errors import InvalidRequest

__all__ = [
    "AGENTS",
    "LLM_DIR",
    "REPO_DIR",
    "CallEvent",
    "ExitEvent",
    "agent_argv",
    "agent_command",
    "completion",
    "launch_command",
    "launch_files",
    "next_argv",
    "parse_event",
    "repo_files",
    "response_body",
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


def launch_files(task: AgentTask) -> dict[str, str]:
    """The files to write before the launch: the task's repository and the relay."""
    relay = resources.files("rock_serve.agents").joinpath("_sandbox_relay.py").read_text()
    files = repo_files(task)
    files[f"{LLM_DIR}/relay.py"] = relay
    return files


def launch_command(argv: list[str], *, call_timeout: float, detach: bool) -> str:
    """Bash that starts the relay (which starts the agent) in the background and returns.

    ``detach`` puts the run in a session of its own (and records its pid in ``.llm/pid``) so it
    outlives the exec that started it; without it the run stays in the caller's process group
    (a bash session, whose close ends it).
    """
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in AGENT_ENV.items())
    relay = (
        f"env {env} python3 ../{LLM_DIR}/relay.py serve ../{LLM_DIR} --timeout {call_timeout:g} "
        f"-- {shlex.join(argv)}"
    )
    redirect = f"> ../{LLM_DIR}/agent.log 2>&1 < /dev/null &"
    if detach:
        return f"cd {REPO_DIR} && {{ setsid {relay} {redirect} echo $! > ../{LLM_DIR}/pid; }}"
    return f"cd {REPO_DIR} && {{ {relay} {redirect} }}"


def next_argv(n: int, wait: float) -> list[str]:
    """The command that waits (up to ``wait`` seconds) for call ``n`` or the agent's exit."""
    return ["python3", f"{LLM_DIR}/relay.py", "next", LLM_DIR, str(n), f"{wait:g}"]


@dataclass(frozen=True)
class CallEvent:
    """The agent's call number ``n`` is pending; ``request`` is its chat.completions body."""

    n: int
    request: dict[str, Any]


@dataclass(frozen=True)
class ExitEvent:
    """The agent exited with ``exit_code`` after ``calls`` LLM calls."""

    exit_code: int
    calls: int


def parse_event(stdout: str) -> CallEvent | ExitEvent | None:
    """What ``next_argv`` printed: a call, the exit, or None (nothing yet).

    Raises:
        ValueError: The output is not the relay's.
    """
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    data = json.loads(line)
    kind = data.get("kind")
    if kind == "call":
        return CallEvent(int(data["n"]), dict(data["request"]))
    if kind == "exit":
        return ExitEvent(int(data["exit_code"]), int(data.get("calls", 0)))
    if kind == "timeout":
        return None
    raise ValueError(f"unexpected relay output {line[:200]!r}")


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


def response_body(
    n: int, answer: dict[str, Any] | None, error: str | None = None
) -> tuple[str, str]:
    """The path and content that answer call ``n`` (a completion, or an error message)."""
    body = {"error": error} if error is not None else {"completion": answer}
    return f"{LLM_DIR}/{n}.resp.json", json.dumps(body)
