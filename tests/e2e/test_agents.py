"""mini-swe-agent in a bwrap sandbox (image ``agent-mini``, network none), its LLM calls going
to the platform's model service: answered by the trainer (relay) over HTTP and over Ray, by a
real OpenAI-compatible server (proxy), and from the recorded trajectory (replay, same verdict);
and the ``rock/AgentTask-v0`` env stepped one LLM call at a time with a solving and a wrong
scripted policy (reward 1, then 0).
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
    AgentOutcome,
    AgentTask,
    ScriptedPolicy,
    action_message,
    builtin_task,
    completion,
    run_agent,
    solution_replies,
)
from rock_serve.envs import EpisodeOver
from rock_serve.errors import AgentFailed
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


RELAY = {"mode": "relay", "timeout": 120}


def _assert_solved(outcome: AgentOutcome, task: AgentTask) -> None:
    assert outcome.reward == 1.0, (outcome.verifier_output, outcome.log_tail)
    assert outcome.exit_code == 0, outcome.log_tail
    assert outcome.calls == len(outcome.trajectory) == len(task.solution) + 1
    first = outcome.trajectory[0]["request"]
    assert task.instruction in first["messages"][-1]["content"]
    # The agent ran the commands: the second request carries the first command's output.
    assert "return a - b" in outcome.trajectory[1]["request"]["messages"][-1]["content"]
    assert outcome.trajectory[-1]["response"]["choices"][0]["message"]["content"].endswith(
        f"{SUBMIT}\n```"
    )


@pytest.mark.slow
async def test_agent_solves_over_http_and_the_trajectory_replays(agent_platform):
    """The trainer answers mini-swe-agent's calls through the model service (relay, HTTP
    transport): reward 1, every call recorded; a fresh sandbox in replay mode with that
    trajectory, and no trainer, reaches the same verdict; a wrong policy gets 0."""
    task = builtin_task("fix_add")
    async with AsyncClient(agent_platform.url) as client:
        async with client.sandbox(
            image=AGENT_IMAGE, model_service=RELAY, trajectory_id="fix-add-http"
        ) as sb:
            outcome = await run_agent(sb, ScriptedPolicy(solution_replies(task)), timeout=300)
            recorded = await sb.llm.trajectory()
        _assert_solved(outcome, task)
        assert outcome.trajectory_id == "fix-add-http"
        assert outcome.trajectory == recorded
        assert {s["request"]["model"] for s in recorded} == {"rock-policy"}
        async with client.sandbox(
            image=AGENT_IMAGE, model_service={"mode": "replay", "replay": recorded}
        ) as sb:
            replayed = await run_agent(sb, None, timeout=300)
        assert (replayed.reward, replayed.exit_code) == (1.0, 0), replayed.log_tail
        assert [s["response"] for s in replayed.trajectory] == [s["response"] for s in recorded]
        wrong = ScriptedPolicy([action_message("cat calc.py"), action_message(SUBMIT)])
        async with client.sandbox(image=AGENT_IMAGE, model_service=RELAY) as sb:
            failed = await run_agent(sb, wrong, timeout=300)
        assert (failed.reward, failed.exit_code, failed.calls) == (0.0, 0, 2), failed.log_tail


@pytest.mark.slow
async def test_agent_solves_over_ray(agent_platform):
    """The same episode with the trainer on the Ray transport (sandbox, files, the agent's
    process and its LLM calls all through ``AsyncClient.from_ray``): reward 1."""
    task = builtin_task("fix_add")
    async with (
        AsyncClient.from_ray(namespace="rock-e2e-bwrap") as client,
        client.sandbox(image=AGENT_IMAGE, model_service=RELAY) as sb,
    ):
        outcome = await run_agent(sb, ScriptedPolicy(solution_replies(task)), timeout=300)
    _assert_solved(outcome, task)
    assert outcome.trajectory_id == sb.id


async def test_an_agent_that_cannot_start_is_typed(agent_platform):
    """The default image has no mini-swe-agent: its process exits before any LLM call, and
    run_agent says so (AgentFailed with the log), no hang."""
    async with (
        AsyncClient(agent_platform.url) as client,
        client.sandbox(model_service=RELAY) as sb,
    ):
        with pytest.raises(AgentFailed, match="before its first LLM call") as info:
            await run_agent(sb, ScriptedPolicy(["never used"]), timeout=120)
    assert "mini" in str(info.value)


@pytest.mark.slow
async def test_agent_with_a_served_model_in_proxy_mode(agent_platform):
    """proxy mode: the node forwards the agent's calls to a real OpenAI-compatible server
    (scripted) with a key that never enters the sandbox; no trainer loop; reward 1."""
    task = builtin_task("fix_add")
    spec = {"mode": "proxy", "api_key": KEY, "model": "served-model"}
    async with (
        model_server(ScriptedPolicy(solution_replies(task))) as (url, seen),
        AsyncClient(agent_platform.url) as client,
        client.sandbox(image=AGENT_IMAGE, model_service={**spec, "base_url": url}) as sb,
    ):
        outcome = await run_agent(sb, None, timeout=300)
        leaked = await sb.exec(
            f"env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; "
            f"grep -rl {KEY} /tmp /root 2>/dev/null; true",
            timeout=60,
        )
        assert KEY not in leaked.stdout
    _assert_solved(outcome, task)
    assert len(seen) == outcome.calls
    assert {body["model"] for body in seen} == {"served-model"}


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
