"""mini-swe-agent in a bwrap sandbox (image ``agent-mini``), its LLM calls answered by a
scripted policy: ``run_agent`` end to end (right and wrong policy), and the ``rock/AgentTask-v0``
env stepped one LLM call at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import rock_serve.envs as envs
from rock_serve.agents import (
    AGENT_IMAGE,
    SUBMIT,
    ScriptedPolicy,
    action_message,
    builtin_task,
    run_agent,
    solution_replies,
)
from rock_serve.envs import EpisodeOver
from rock_serve.sdk import AsyncClient, Client
from tests.e2e.conftest import Platform

pytestmark = [pytest.mark.ray, pytest.mark.bwrap, pytest.mark.timeout(300)]

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


def _episode(env, policy: ScriptedPolicy, seed: int) -> tuple[float, int, dict]:
    obs, info = env.reset(seed=seed)
    messages = json.loads(obs)
    assert messages[0]["role"] == "system" and info["call"] == 1
    assert builtin_task("fix_add").instruction in messages[-1]["content"]
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = env.step(policy.reply(messages))
        steps += 1
        assert not truncated
        if terminated:
            return reward, steps, info
        messages = json.loads(obs)
        assert reward == 0.0 and info["request"]["messages"] == messages


@pytest.mark.slow
def test_env_turn_by_turn_right_then_wrong(agent_platform):
    """One env, two episodes in the same sandbox: the solving script gets 1, a policy that
    submits without fixing gets 0 (the reset ends the first agent and starts a fresh one)."""
    task = builtin_task("fix_add")
    with Client(agent_platform.url) as client:
        with envs.make("rock/AgentTask-v0", client=client) as env:
            reward, steps, info = _episode(env, ScriptedPolicy(solution_replies(task)), seed=1)
            assert (reward, steps) == (1.0, len(task.solution) + 1), info
            assert info["exit_code"] == 0 and info["verifier"]["passed"] is True
            wrong = ScriptedPolicy([action_message("cat calc.py"), action_message(SUBMIT)])
            reward, steps, info = _episode(env, wrong, seed=2)
            assert (reward, steps) == (0.0, 2), info
            assert info["verifier"]["passed"] is False
            with pytest.raises(EpisodeOver):
                env.step("anything")
