"""rock_serve.agents without a sandbox: scripted policies, the agent's command line, typed bad
input, the pinned public surface and the env's kwargs. The runs themselves (on the platform's
model service) are in tests/e2e/test_agents.py.
"""

from __future__ import annotations

import shlex

import pytest

from rock_serve.agents import ScriptedPolicy, action_message
from rock_serve.agents._protocol import AGENT_ENV, LLM_DIR, agent_command, repo_files
from rock_serve.agents._tasks import builtin_task


def test_scripted_policy_answers_by_conversation_length():
    policy = ScriptedPolicy(["a", "b"])
    assert policy({"messages": [{"role": "system"}, {"role": "user"}]}) == "a"
    assert policy.reply([{"role": "assistant"}]) == "b"
    assert policy.reply([{"role": "assistant"}] * 5) == "b"
    assert "```mswea_bash_command\nls\n```" in action_message("ls")
    with pytest.raises(ValueError, match="at least one"):
        ScriptedPolicy([])


def test_bad_agent_task_and_limits_are_typed():
    from rock_serve.agents._protocol import agent_argv
    from rock_serve.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="unknown agent"):
        agent_argv("no-such-agent", builtin_task(), step_limit=5)
    with pytest.raises(InvalidRequest, match="step_limit"):
        agent_argv("mini-swe-agent", builtin_task(), step_limit=0)
    with pytest.raises(InvalidRequest, match="unknown agent task"):
        builtin_task("nope")
    argv = agent_argv("mini-swe-agent", builtin_task(), step_limit=7)
    assert argv[:3] == ["mini", "-y", "--exit-immediately"] and "agent.step_limit=7" in argv


def test_public_surface_is_pinned():
    import rock_serve.agents as agents

    assert set(agents.__all__) == {
        "AGENTS", "AGENT_IMAGE", "BUILTIN_TASKS", "SUBMIT", "AgentOutcome", "AgentRun",
        "AgentTask", "HTTPPolicy", "LLMCall", "Policy", "ScriptedPolicy", "action_message",
        "builtin_task", "completion", "llm_calls", "run_agent", "solution_replies", "start_agent",
    }  # fmt: skip
    for name in agents.__all__:
        assert getattr(agents, name) is not None


def test_agent_task_env_kwargs_are_checked():
    from rock_serve.envs.builtin.agent_task import AgentTaskEnv
    from rock_serve.errors import InvalidRequest

    env = AgentTaskEnv(step_limit=5)
    assert env.task.id == "fix_add" and env.sandbox_defaults["image"].endswith(":agent-mini")
    with pytest.raises(InvalidRequest, match="unknown agent task"):
        AgentTaskEnv(task="nope")
    with pytest.raises(InvalidRequest, match="unknown agent"):
        AgentTaskEnv(agent="aider")
    assert env.sandbox_defaults["model_service"] == {"mode": "relay"}
    with pytest.raises(InvalidRequest, match="wait_timeout"):
        AgentTaskEnv(wait_timeout=0)


def test_agent_command_runs_unattended_into_its_log():
    task = builtin_task()
    files = repo_files(task)
    assert files and all(path.startswith("repo/") for path in files)
    command = agent_command(["mini", "-t", "fix it; now"])
    assert command.startswith("exec env ") and "'fix it; now'" in command
    assert all(f"{k}={shlex.quote(v)}" in command for k, v in AGENT_ENV.items())
    assert command.endswith(f"> ../{LLM_DIR}/agent.log 2>&1 < /dev/null")
