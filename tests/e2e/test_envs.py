"""The env layer on the real platform (Ray + Serve, local runtime; one test on bwrap).

Every built-in env is played end to end with a right and a wrong answer; seeding, make kwargs,
time limits, order, groups, vector stepping, release on close and on garbage collection, the
bad inputs of the issue, and ``check_env`` over every registered env. The session's platform
allows 4 sandboxes per node: no test here holds more (a shared-sandbox group of 8 holds one).
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import rock_serve.envs as envs
from rock_serve.envs import EnvNotFound, EpisodeOver, InvalidEnvKwargs, ResetNeeded
from rock_serve.errors import InvalidConfig, RockletUnavailable
from rock_serve.sdk import AsyncClient, Client

pytestmark = pytest.mark.ray

NAMESPACE = "rock-e2e"
ROOT = Path(__file__).resolve().parents[2]
#: Envs whose sandbox needs an image (the session's platform is the local runtime, which has
#: none): tests/e2e/test_agents.py checks them on bwrap.
IMAGE_ENVS = {"rock/AgentTask-v0"}
ENV_IDS = [s.id for s in envs.list_envs() if s.id not in IMAGE_ENVS]


def _ids(api: httpx.Client) -> list[str]:
    return [item["id"] for item in api.get("/v1/sandboxes").json()["items"]]


def _wait_empty(api: httpx.Client, seconds: float = 30) -> None:
    """Wait until the platform lists no sandbox (releases from GC or cancellation are async)."""
    deadline = time.monotonic() + seconds
    while _ids(api):
        assert time.monotonic() < deadline, f"sandboxes leaked: {_ids(api)}"
        time.sleep(0.05)


async def _await_empty(client: AsyncClient, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while await client.list_sandboxes():
        assert time.monotonic() < deadline, "sandboxes leaked"
        await asyncio.sleep(0.05)


@pytest.fixture
def client(platform, api):
    with Client(platform.url) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# The built-in envs, end to end


@pytest.mark.parametrize("family", ["fix_test", "fix_config", "count_lines", "find_token"])
def test_terminal_right_and_wrong(client, api, family):
    with envs.make("rock/Terminal-v0", client=client, family=family) as env:
        obs, info = env.reset(seed=21)
        assert info["family"] == family and "submit" in obs
        assert _ids(api) == [info["sandbox_id"]]
        task = env.unwrapped.core.task
        listing = env.step("ls -R")
        assert listing[0].endswith("[exit code 0]") and listing[4]["exit_code"] == 0
        for command in task.solution:
            assert env.step(command)[4]["exit_code"] == 0
        obs, reward, terminated, truncated, info = env.step("submit")
        assert (reward, terminated, truncated) == (1.0, True, False), obs
        assert info["verifier"]["passed"] is True
        with pytest.raises(EpisodeOver):
            env.step("ls")
        # Same seed, same task, in a clean directory: submitting at once fails.
        again, info = env.reset(seed=21)
        assert info["task_id"] == task.id
        obs, reward, terminated, _, info = env.step("submit")
        assert (reward, terminated) == (0.0, True) and "not solved" in obs
        assert _ids(api) == [env.unwrapped.sandbox_id]
    assert _ids(api) == []


async def test_code_exec_right_and_wrong(platform, api):
    async with AsyncClient(platform.url) as client:
        for family in ("caesar", "recurrence"):
            async with envs.make_async("rock/CodeExec-v0", client=client, family=family) as env:
                obs, info = await env.reset(seed=3)
                problem = env.unwrapped.core.problem
                assert info["family"] == family and "solve(" in obs
                right = await env.step(f"Sure:\n```python\n{problem.solution}```")
                assert right[1:4] == (1.0, True, False), right[0]
                await env.reset(seed=3)
                wrong = await env.step("def solve(*args):\n    return 0\n")
                assert wrong[1:3] == (0.0, True) and "First failure" in wrong[0]
        # Several attempts with feedback, and partial credit.
        env = envs.make_async(
            "rock/CodeExec-v0", client=client, family="rotate", max_attempts=2, partial_credit=True
        )
        await env.reset(seed=5)
        first = await env.step("def solve(xs):\n    return xs\n")
        assert first[2] is False and 0.0 < first[1] < 1.0 and "expected" in first[0]
        second = await env.step(env.unwrapped.core.problem.solution)
        assert second[1:3] == (1.0, True)
        await env.close()
    assert _ids(api) == []


def test_guess_number_right_and_wrong(client, api):
    with envs.make("rock/GuessNumber-v0", client=client) as env:
        env.reset(seed=8)
        low, high, steps = 1, 100, 0
        while True:
            guess = (low + high) // 2
            obs, reward, terminated, truncated, info = env.step(f"I guess {guess}")
            steps += 1
            if terminated:
                break
            low, high = (guess + 1, high) if "higher" in obs else (low, guess - 1)
        assert reward == 1.0 and info["guesses"] == steps <= 7
        # The game's state lives in the sandbox.
        sandbox = env.unwrapped.sandbox_id
        assert client.read_file(sandbox, "task/game/guesses").strip() == str(steps).encode()
        env.reset(seed=8)
        secret = env.unwrapped.core.secret
        wrong = 1 if secret != 1 else 2
        results = [env.step(str(wrong)) for _ in range(10)]
        assert all(r[1] == 0.0 and not r[2] for r in results)
        assert [r[3] for r in results] == [False] * 9 + [True]
    assert _ids(api) == []


def test_terminal_on_bwrap(bwrap_platform):
    """One whole episode in an isolated sandbox: the built-ins need only bash and python3."""
    with Client(bwrap_platform.url) as client:
        with envs.make("rock/Terminal-v0", client=client, family="fix_test") as env:
            env.reset(seed=2)
            assert env.step("pwd")[0].splitlines()[0].endswith("/task")
            for command in env.unwrapped.core.task.solution:
                env.step(command)
            assert env.step("submit")[1] == 1.0
        assert client.list_sandboxes() == []


# ---------------------------------------------------------------------------------------------
# Seeding, kwargs, time limit, order


def test_seeding_is_deterministic(client):
    a = envs.make("rock/Terminal-v0", client=client)
    b = envs.make("rock/Terminal-v0", client=client)
    try:
        firsts = [a.reset(seed=s)[0] for s in range(4)]
        assert [b.reset(seed=s)[0] for s in range(4)] == firsts
        assert len(set(firsts)) >= 2
        # The same seed and actions give the same observations (fresh shell each episode).
        runs = []
        for env in (a, b):
            env.reset(seed=3)
            runs.append([env.step(cmd)[0] for cmd in ("ls", "echo $((6*7))", "nosuchcmd")])
        assert runs[0] == runs[1]
        assert "42" in runs[0][1] and "[exit code 127]" in runs[0][2]
    finally:
        a.close()
        b.close()


def test_make_kwargs_reach_the_env_and_the_sandbox(client, api):
    with envs.make(
        "rock/Terminal-v0",
        client=client,
        family="count_lines",
        step_timeout=3,
        sandbox={"labels": {"team": "rl"}, "ttl_seconds": 120},
    ) as env:
        _, info = env.reset(seed=1)
        assert info["family"] == "count_lines"
        record = client.get_sandbox(info["sandbox_id"])
        assert record.labels["team"] == "rl" and record.labels["rock.env"] == "rock/Terminal-v0"
        assert record.expires_at is not None and record.expires_at - record.created_at <= 121
        obs, _, _, _, info = env.step("sleep 10")
        assert info["timed_out"] is True and "timed out after 3s" in obs
        # The session survives the interrupt.
        assert env.step("echo alive")[0].startswith("alive")


def test_time_limit_truncates_and_still_verifies(client):
    with envs.make(
        "rock/Terminal-v0", client=client, family="count_lines", max_episode_steps=2
    ) as env:
        env.reset(seed=4)
        solution = env.unwrapped.core.task.solution
        assert env.step(solution[0])[3] is False
        obs, reward, terminated, truncated, info = env.step("cat answer.txt")
        assert (terminated, truncated, reward) == (False, True, 1.0)
        assert info["verifier"]["passed"] and "solved" in obs
        with pytest.raises(EpisodeOver):
            env.step("ls")


def test_order_is_enforced_and_sandboxes_are_lazy(client, api):
    env = envs.make("rock/Terminal-v0", client=client)
    with pytest.raises(ResetNeeded):
        env.step("ls")
    assert _ids(api) == []  # nothing is created before the first reset
    env.close()


# ---------------------------------------------------------------------------------------------
# Groups and vectors


async def test_groups_share_one_task(platform, api):
    async with AsyncClient(platform.url) as client:
        async with envs.make_group("rock/Terminal-v0", seed=77, size=3, client=client) as group:
            obs, infos = await group.reset()
            assert len(set(obs)) == 1
            assert len({i["task_id"] for i in infos}) == 1
            assert len({i["sandbox_id"] for i in infos}) == 3 == len(_ids(api))
            # Each member acts in its own sandbox.
            out, *_ = await group.step([f"echo member-{i} > me.txt; cat me.txt" for i in range(3)])
            assert [o.splitlines()[0] for o in out] == ["member-0", "member-1", "member-2"]
        assert _ids(api) == []
        # A spec-level or make-level shared sandbox: eight envs, one sandbox, eight sessions.
        group = envs.make_group(
            "rock/GuessNumber-v0", seed=3, size=8, client=client, shared_sandbox=True
        )
        obs, infos = await group.reset()
        assert len({i["sandbox_id"] for i in infos}) == 1 and len(_ids(api)) == 1
        out, rewards, *_ = await group.step(["50"] * 8)
        assert len(set(out)) == 1 and rewards.tolist() == [0.0] * 8
        await group.close()
        assert _ids(api) == []


async def test_vector_steps_keep_text_intact(platform, api):
    async with (
        AsyncClient(platform.url) as client,
        envs.make_vec("rock/Terminal-v0", 4, client=client) as vec,
    ):
        obs, infos = await vec.reset(seed=100)
        assert len({i["sandbox_id"] for i in infos}) == 4 == len(_ids(api))
        actions = [
            f"printf 'env %s: héllo ✓ %s\\n' {i} $(seq -s, 1 {200 * (i + 1)})" for i in range(4)
        ]
        for _ in range(3):
            out, rewards, terminated, truncated, _ = await vec.step(actions)
            for i, text in enumerate(out):
                first = text.splitlines()[0]
                assert first.startswith(f"env {i}: héllo ✓ 1,2,3")
                assert first.endswith(f",{200 * (i + 1)}")
            assert not terminated.any() and not truncated.any()
    assert _ids(api) == []


async def test_a_failed_create_does_not_leak_the_others(platform, api):
    async with AsyncClient(platform.url) as client:
        good = [envs.make_async("rock/GuessNumber-v0", client=client) for _ in range(3)]
        bad = envs.make_async("rock/GuessNumber-v0", client=client, sandbox={"image": "nope"})
        vec = envs.AsyncVectorEnv([*good, bad])
        with pytest.raises(InvalidConfig):
            await vec.reset(seed=1)
        assert await client.list_sandboxes() == []


# ---------------------------------------------------------------------------------------------
# Release: close, garbage collection, cancellation


def test_close_releases_the_sandbox(client, api):
    env = envs.make("rock/CodeExec-v0", client=client)
    _, info = env.reset(seed=0)
    assert _ids(api) == [info["sandbox_id"]]
    env.close()
    assert _ids(api) == []
    env.close()


def test_garbage_collection_releases_the_sandbox(client, api):
    env = envs.make("rock/GuessNumber-v0", client=client)
    env.reset(seed=1)
    assert len(_ids(api)) == 1
    del env
    gc.collect()
    assert _ids(api) == []  # the sync finalizer deletes before returning


async def test_garbage_collection_releases_the_sandbox_async(platform, api):
    async with AsyncClient(platform.url) as client:
        env = envs.make_async("rock/GuessNumber-v0", client=client)
        await env.reset(seed=1)
        assert len(await client.list_sandboxes()) == 1
        del env
        gc.collect()
        await _await_empty(client)  # deleted from a thread of the finalizer's own


async def test_a_cancelled_reset_does_not_leak(platform, api):
    class Watching(AsyncClient):
        """Says when a create is on its way (and does it unchanged)."""

        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.creating = asyncio.Event()
            self.answered = asyncio.Event()

        async def create_sandbox(self, request=None, /, **spec):
            self.creating.set()
            try:
                return await super().create_sandbox(request, **spec)
            finally:
                self.answered.set()

    async with Watching(platform.url) as client:
        env = envs.make_async("rock/Terminal-v0", client=client)
        task = asyncio.create_task(env.reset(seed=1))
        await client.creating.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ResetNeeded):
            await env.step("ls")
        assert env.unwrapped.sandbox_id is None
        await client.answered.wait()  # the create went on after the cancel ...
        await _await_empty(client)  # ... and what it made was deleted
        await env.close()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_typed(client, api):
    with pytest.raises(EnvNotFound) as err:
        envs.make("rock/Terminl-v0", client=client)
    assert "rock/Terminal-v0" in err.value.details["suggestions"]
    with pytest.raises(InvalidEnvKwargs) as err:
        envs.make("rock/Terminal-v0", client=client, familly="fix_test")
    assert "family" in err.value.details["valid"]
    assert _ids(api) == []


def test_an_action_that_kills_the_sandbox(platform, client, api):
    env = envs.make("rock/Terminal-v0", client=client)
    _, info = env.reset(seed=5)
    dead = info["sandbox_id"]
    with pytest.raises(RockletUnavailable):
        env.step("kill -9 $PPID")  # the session's parent is the sandbox's rocklet
    with pytest.raises(ResetNeeded):
        env.step("ls")
    assert _ids(api) == []  # the dead sandbox was dropped at once
    assert dead not in platform.runtime_ids()
    _, info = env.reset(seed=5)  # a new sandbox, the same task
    assert info["sandbox_id"] != dead
    env.close()
    assert _ids(api) == []

    with envs.make("rock/Terminal-v0", client=client, on_sandbox_error="terminate") as env:
        env.reset(seed=5)
        obs, reward, terminated, truncated, info = env.step("kill -9 $PPID")
        assert (reward, terminated, truncated) == (0.0, True, False)
        assert info["sandbox_error"] == "rocklet_unavailable" and "sandbox was lost" in obs
        with pytest.raises(EpisodeOver):
            env.step("ls")
    assert _ids(api) == []


def test_a_sandbox_deleted_behind_the_env_s_back(client, api):
    with envs.make("rock/GuessNumber-v0", client=client) as env:
        _, info = env.reset(seed=1)
        client.delete_sandbox(info["sandbox_id"])  # say, its TTL ended
        _, again = env.reset(seed=1)  # the reset starts over in a new one
        assert again["sandbox_id"] != info["sandbox_id"]
        assert env.step("50")[4]["valid"] is True
    assert _ids(api) == []


# ---------------------------------------------------------------------------------------------
# check_env over every registered env; default clients


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(client, api, env_id):
    envs.check_env(env_id, client=client)
    assert _ids(api) == []


@pytest.mark.parametrize("env_id", ENV_IDS)
async def test_check_async_env(platform, api, env_id):
    async with AsyncClient(platform.url) as client:
        await envs.check_async_env(env_id, client=client)
        assert await client.list_sandboxes() == []


def test_default_client_from_rock_url(platform, api, monkeypatch):
    monkeypatch.delenv("ROCK_BASE_URL", raising=False)
    monkeypatch.setenv("ROCK_URL", platform.url)
    with envs.make("rock/GuessNumber-v0") as env:
        _, info = env.reset(seed=2)
        assert _ids(api) == [info["sandbox_id"]]
    assert _ids(api) == []


async def test_default_client_is_the_ray_transport_in_the_cluster(platform, api, monkeypatch):
    monkeypatch.delenv("ROCK_BASE_URL", raising=False)
    monkeypatch.delenv("ROCK_URL", raising=False)
    monkeypatch.setenv("ROCK_NAMESPACE", NAMESPACE)
    async with envs.make_async("rock/GuessNumber-v0") as env:
        assert type(env.unwrapped.client._transport).__name__ == "AsyncRayTransport"
        _, info = await env.reset(seed=2)
        assert (await env.step("50"))[4]["valid"] is True
        assert _ids(api) == [info["sandbox_id"]]
    assert _ids(api) == []
    # Dropped without close: the finalizer deletes over Ray too.
    env = envs.make_async("rock/GuessNumber-v0")
    await env.reset(seed=3)
    assert len(_ids(api)) == 1
    del env
    gc.collect()
    deadline = time.monotonic() + 30
    while _ids(api):
        assert time.monotonic() < deadline, "the sandbox of a dropped env leaked"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The examples run as written


@pytest.mark.parametrize(
    ("example", "expected"),
    [("envs_quickstart.py", "reward=1.0 terminated=True"), ("envs_grpo_rollout.py", "advantages")],
)
def test_examples_run(platform, api, example, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCK_")}
    env["ROCK_BASE_URL"] = platform.url
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert _ids(api) == []
