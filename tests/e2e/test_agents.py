"""mini-swe-agent in a bwrap sandbox (image ``agent-mini``), its LLM calls answered by the
trainer: ``run_agent`` end to end with a real OpenAI-compatible server (scripted) behind the
trainer, and the ``rock/AgentTask-v0`` env stepped one LLM call at a time with a solving and a
wrong scripted policy (reward 1, then 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import rock_serve.envs as envs
from rock_serve.agents import (
    AGENT_IMAGE,
    SUBMIT,
    HTTPPolicy,
    ScriptedPolicy,
    action_message,
    builtin_task,
    completion,
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


KEY = "sk-trainer-side-secret"


@contextlib.asynccontextmanager
async def model_server(policy: ScriptedPolicy) -> AsyncIterator[tuple[str, list[dict]]]:
    """A small real OpenAI-compatible server on loopback answering with the scripted policy."""
    seen: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        seen.append(body)
        return JSONResponse(completion(policy(body), body, n=len(seen)))

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "the model server did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.mark.slow
async def test_agent_solves_the_task_with_a_served_model(agent_platform):
    """mini-swe-agent's calls go to a real OpenAI-compatible server through the trainer
    (HTTPPolicy); the scripted model behind it solves the task: reward 1."""
    task = builtin_task("fix_add")
    async with (
        model_server(ScriptedPolicy(solution_replies(task))) as (url, seen),
        HTTPPolicy(url, api_key=KEY, model="served-model") as policy,
        AsyncClient(agent_platform.url) as client,
        client.sandbox(image=AGENT_IMAGE) as sb,
    ):
        outcome = await run_agent(sb, policy, task=task, timeout=300)
        # The key stayed on the trainer's side.
        leaked = await sb.exec(f"grep -rl {KEY} /tmp /root /proc/*/environ 2>/dev/null", timeout=60)
        assert leaked.stdout == ""
    assert outcome.reward == 1.0, (outcome.verifier_output, outcome.log_tail)
    assert outcome.exit_code == 0, outcome.log_tail
    assert outcome.calls == len(seen) == len(task.solution) + 1
    assert {body["model"] for body in seen} == {"served-model"}
    first = outcome.trajectory[0]["request"]
    assert task.instruction in first["messages"][-1]["content"]
    assert first["model"] == "rock-policy"
    # The agent ran the commands: the second request carries the first command's output.
    assert "return a - b" in outcome.trajectory[1]["request"]["messages"][-1]["content"]
    assert outcome.trajectory[-1]["response"]["choices"][0]["message"]["content"].endswith(
        f"{SUBMIT}\n```"
    )


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
