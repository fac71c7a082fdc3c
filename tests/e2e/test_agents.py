"""mini-swe-agent in a bwrap sandbox (image ``agent-mini``), its LLM calls answered by a
scripted policy: ``run_agent`` end to end (right and wrong policy), and the ``rock/AgentTask-v0``
env stepped one LLM call at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rock_serve.agents import (
    AGENT_IMAGE,
    SUBMIT,
    ScriptedPolicy,
    action_message,
    builtin_task,
    run_agent,
    solution_replies,
)
from rock_serve.sdk import AsyncClient
from tests.e2e.conftest import Platform

pytestmark = [pytest.mark.ray, pytest.mark.bwrap]

_LAYOUT = AGENT_IMAGE.removeprefix("oci:").rsplit(":", 1)[0]


@pytest.fixture(scope="module")
def agent_platform(bwrap_platform: Platform) -> Platform:
    index = Path(_LAYOUT, "index.json")
    if not (index.exists() and '"agent-mini"' in index.read_text()):
        if os.environ.get("ROCK_REQUIRE_AGENT_IMAGE") == "1":
            pytest.fail("no agent-mini image: run scripts/build-agent-images")
        pytest.skip("no agent-mini image: run scripts/build-agent-images")
    return bwrap_platform


@pytest.mark.slow
async def test_scripted_policy_solves_the_task(agent_platform):
    task = builtin_task("fix_add")
    policy = ScriptedPolicy(solution_replies(task))
    async with AsyncClient(agent_platform.url) as client:
        async with client.sandbox(image=AGENT_IMAGE) as sb:
            outcome = await run_agent(sb, policy, task=task, timeout=300)
    assert outcome.reward == 1.0, (outcome.verifier_output, outcome.log_tail)
    assert outcome.exit_code == 0, outcome.log_tail
    assert outcome.calls == len(task.solution) + 1
    first = outcome.trajectory[0]["request"]
    assert task.instruction in first["messages"][-1]["content"]
    assert first["model"] == "rock-policy"
    # The agent ran the commands: the second request carries the first command's output.
    second = outcome.trajectory[1]["request"]["messages"]
    assert "return a - b" in second[-1]["content"]


async def test_wrong_policy_gets_no_reward(agent_platform):
    policy = ScriptedPolicy([action_message("cat calc.py"), action_message(SUBMIT)])
    async with AsyncClient(agent_platform.url) as client:
        async with client.sandbox(image=AGENT_IMAGE) as sb:
            outcome = await run_agent(sb, policy, task="fix_add", timeout=300)
    assert outcome.exit_code == 0, outcome.log_tail
    assert (outcome.reward, outcome.calls) == (0.0, 2)
    assert "want 5" in outcome.verifier_output or "add(" in outcome.verifier_output
