"""The SkyRL text envs against the session's platform, called the way SkyRL's generator does.

SkyRL's ``skyrl_gym_generator`` runs the synchronous ``env.init``/``env.step``/``env.close`` in
a ``ThreadPoolExecutor(max_workers=32)`` through ``loop.run_in_executor``, so one trajectory's
calls land on any of the pool's threads. The tests do the same: every call is submitted to a
32-thread pool, 32 trajectories at once. skyrl-gym is used when installed (registration and
``skyrl_gym.make`` as SkyRL calls it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rock_serve.envs.integrations import (
    SkyRLEnv,
    SkyRLSandboxEnv,
    thread_local_client,
    thread_transport,
)
from rock_serve.errors import InvalidRequest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "skyrl_sandbox_env.py"
EXPECTED = "reward=1.0"

WORKERS = 32
#: The games' range (small: few steps per trajectory, many trajectories at once).
HIGH = 16


def _ids(api, label: str) -> list[str]:
    items = api.get("/v1/sandboxes", params={"label": f"rock-serve/integration={label}"})
    return [i["id"] for i in items.json()["items"]]


def _all_ids(api) -> list[str]:
    return [i["id"] for i in api.get("/v1/sandboxes").json()["items"]]


async def _trajectory(
    loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor, env: Any, threads: set[int]
) -> tuple[float, int, list[dict[str, str]]]:
    """SkyRL's agent loop: init, then steps until done, each call on the pool; binary search."""

    def on_pool(fn: Any, *args: Any) -> Any:
        def run() -> Any:
            threads.add(threading.get_ident())
            return fn(*args)

        return loop.run_in_executor(pool, run)

    prompt = [{"role": "system", "content": "Play the game."}]
    messages, metadata = await on_pool(env.init, prompt)
    low, high, reward, turns = 1, HIGH, 0.0, 0
    try:
        while True:
            guess = (low + high) // 2
            out = await on_pool(env.step, f"My guess: {guess}")
            turns += 1
            reward = out["reward"]
            if out["done"]:
                return reward, turns, messages
            (observation,) = out["observations"]
            assert observation["role"] == "user"
            messages.append(observation)
            if "higher" in observation["content"]:
                low = guess + 1
            else:
                high = guess - 1
    finally:
        await on_pool(env.close)


def test_32_threads_step_32_trajectories_concurrently(api, platform):
    config = {
        "base_url": platform.url,
        "env_id": "rock/GuessNumber-v0",
        # One sandbox for all 32 (a session each): the platform's capacity is 4.
        "env_kwargs": {"shared_sandbox": True, "high": HIGH},
    }
    client = thread_local_client(platform.url)
    transport = thread_transport(client)
    pools_before = transport.pool_count
    envs = [SkyRLEnv(config, {"seed": seed, "max_turns": 10}) for seed in range(WORKERS)]
    per_env: list[set[int]] = [set() for _ in envs]

    async def main() -> list[tuple[float, int, list[dict[str, str]]]]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            trajectories = [
                _trajectory(loop, pool, env, seen) for env, seen in zip(envs, per_env, strict=True)
            ]
            return await asyncio.gather(*trajectories)

    started = time.perf_counter()
    results = asyncio.run(main())
    seconds = time.perf_counter() - started
    steps = sum(turns for _, turns, _ in results)
    print(f"\nSkyRL: {WORKERS} trajectories, {steps} steps in {seconds:.1f} s on 32 threads")
    assert [reward for reward, _, _ in results] == [1.0] * WORKERS
    assert all(turns <= 5 for _, turns, _ in results)
    first = results[0][2]
    assert first[0]["role"] == "system" and f"between 1 and {HIGH}" in first[1]["content"]
    # Calls of one trajectory hopped between threads, yet each thread made one pool only.
    threads = set().union(*per_env)
    assert any(len(seen) > 1 for seen in per_env)
    assert 1 < transport.pool_count - pools_before <= len(threads) <= WORKERS
    assert transport.open_pools == 0  # the pool's threads ended: their connections are closed
    assert thread_local_client(platform.url) is client
    assert envs[0].get_metrics()["total_reward"] == 1.0
    assert SkyRLEnv.aggregate_metrics([e.get_metrics() for e in envs])["total_reward"] == 1.0
    assert _all_ids(api) == []  # the last env to close deleted the shared sandbox


def test_skyrl_gym_make_builds_our_env(api, platform):
    skyrl_gym = pytest.importorskip("skyrl_gym")
    from skyrl_gym.envs.base_text_env import BaseTextEnv

    if "rock-e2e" not in skyrl_gym.registry:
        skyrl_gym.register("rock-e2e", entry_point="rock_serve.envs.integrations._skyrl:SkyRLEnv")
    omegaconf = pytest.importorskip("omegaconf")
    env_config = omegaconf.OmegaConf.create(
        {
            "base_url": platform.url,
            "env_id": "rock/Terminal-v0",
            "env_kwargs": {"family": ["count_lines"]},
        }
    )
    # What SkyRL's generator calls: make(env_class, env_config=cfg[env_class], extras=row).
    env = skyrl_gym.make("rock-e2e", env_config=env_config, extras={"seed": 4, "max_turns": 3})
    assert isinstance(env, BaseTextEnv) and isinstance(env, SkyRLEnv)
    with env:
        messages, metadata = env.init([{"role": "user", "content": "Solve the task."}])
        assert metadata["family"] == "count_lines" and "submit" in messages[-1]["content"]
        out = env.step("ls")
        assert out["done"] is False and out["metadata"]["exit_code"] == 0
        out = env.step("true")
        out = env.step("cat nothing-here")  # max_turns: the last turn
        assert out["done"] is True and out["observations"] == []
        assert "No such file" in out["metadata"]["observation"]
    assert _all_ids(api) == []


def test_sandbox_env(api, platform):
    config = {
        "base_url": platform.url,
        "files": {"data.txt": "3\n4\n5\n"},
        "setup_commands": ["mkdir -p out"],
        "reward_command": 'test "$(cat out/sum)" = 12',
        "command_timeout": 2,
    }

    def play(actions: list[str], max_turns: int = 10) -> tuple[list[dict[str, Any]], float]:
        env = SkyRLSandboxEnv(config, {"max_turns": max_turns})
        try:
            messages, metadata = env.init([{"role": "user", "content": "Sum data.txt."}])
            assert messages == [{"role": "user", "content": "Sum data.txt."}]
            assert _ids(api, "skyrl") == [metadata["sandbox_id"]]
            outputs = [env.step(a) for a in actions]
            return outputs, env.get_metrics()["reward"]
        finally:
            env.close()

    outputs, reward = play(
        [
            "I'll look first. <bash>cat data.txt</bash>",
            "```bash\nS=0; for n in $(cat data.txt); do S=$((S+n)); done\n```",
            "<bash>echo $S > out/sum; cat out/sum</bash>",  # the session kept $S
            "submit",
        ]
    )
    assert outputs[0]["observations"] == [{"role": "user", "content": "3\n4\n5\n"}]
    assert outputs[2]["observations"][0]["content"] == "12\n"
    assert outputs[3]["done"] is True and outputs[3]["reward"] == 1.0 and reward == 1.0
    assert _ids(api, "skyrl") == []

    outputs, reward = play(["false", "sleep 30", "echo 7 > out/sum"], max_turns=3)
    assert outputs[0]["observations"][0]["content"].endswith("[exit code 1]")
    assert "timed out after 2s" in outputs[1]["observations"][0]["content"]
    assert outputs[2]["done"] is True and outputs[2]["reward"] == 0.0 and reward == 0.0
    assert _ids(api, "skyrl") == []

    env = SkyRLSandboxEnv(config)
    with pytest.raises(InvalidRequest):
        env.step("ls")  # before init
    with pytest.raises(InvalidRequest):
        SkyRLSandboxEnv({**config, "setup_commands": ["exit 4"]}).init([])
    with pytest.raises(InvalidRequest):
        SkyRLEnv({"base_url": platform.url})  # no env_id
    assert _all_ids(api) == []


def test_example_runs(api, platform):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCK_")}
    env["ROCK_BASE_URL"] = platform.url
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / EXAMPLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED in result.stdout, result.stdout[-3000:]
    assert _all_ids(api) == []
