"""The console's envs and trajectories view, below the browser: the episode record kept by the
env table (bounds, pages, namespaces) and the processes-running sample (no Ray).
"""

from __future__ import annotations

import json

import pytest

from rock_serve.auth import Principal
from rock_serve.deployments._console import Samples
from rock_serve.deployments._episodes import EpisodeLog, preview
from rock_serve.deployments._gem import EnvTable
from rock_serve.envs.integrations import (
    GemCloseRequest,
    GemMakeRequest,
    GemResetRequest,
    GemStepRequest,
)
from rock_serve.errors import Conflict, NotFound
from rock_serve.sdk import AsyncClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_an_episode_log_keeps_bounded_pages_of_episodes_and_steps() -> None:
    log = EpisodeLog(max_episodes=3, max_steps=4, clock=Clock())
    for episode in range(5):
        log.reset({"board": episode}, {"seed": episode}, f"sb-{episode}")
        for step in range(6):
            log.step(f"a{step}", f"o{step}", 0.5, step == 5, False, {"n": step})
    assert len(log) == 3  # the two oldest episodes went
    total, newest = log.page(0, 2)
    assert total == 3
    assert [e.index for e in newest] == [4, 3]
    assert newest[0].steps == 6 and newest[0].total_reward == 3.0 and newest[0].done
    assert newest[0].dropped_steps == 3  # reset + 3 steps kept of reset + 6
    assert newest[0].sandbox_id == "sb-4"
    assert [e.index for e in log.page(2, 10)[1]] == [2]
    summary, kept, steps = log.steps(4, 1, 10)
    assert (summary.index, kept) == (4, 4)
    assert [(s.index, s.action, s.reward) for s in steps] == [
        (1, '"a0"', 0.5),
        (2, '"a1"', 0.5),
        (3, '"a2"', 0.5),
    ]
    reset = log.steps(4, 0, 1)[2][0]
    assert (reset.index, reset.action, reset.reward) == (0, None, None)
    assert json.loads(reset.observation) == {"board": 4}
    with pytest.raises(NotFound, match="no episode 1"):
        log.steps(1, 0, 10)


def test_a_step_before_any_reset_is_not_recorded_and_previews_are_cut() -> None:
    log = EpisodeLog()
    log.step("a", "o", 1.0, False, False, {})
    assert log.page(0, 10) == (0, [])
    text = preview({"text": "x" * 10_000}, limit=100)
    assert len(text) == 100 and text.endswith("…")
    assert preview([1, "é"]) == '[1, "é"]'


async def test_the_env_table_records_episodes_per_namespace_and_after_close() -> None:
    table = EnvTable("rock-unit")
    alice = Principal(name="alice", namespace="team-a", role="tenant")
    bob = Principal(name="bob", namespace="team-b", role="tenant")
    vera = Principal(name="vera", namespace="ops", role="viewer")
    # The env keeps its game in memory: the client (the seam to the platform) is never called.
    async with AsyncClient("http://127.0.0.1:9") as client:
        table._clients["team-a"] = client
        made = await table.make(
            alice, GemMakeRequest(env_id="rock/GuessNumber-v0", env_kwargs={"state": "memory"})
        )
        instance = made.sandbox_id
        with pytest.raises(Conflict):
            await table.step(alice, GemStepRequest(sandbox_id=instance, action="5"))
        await table.reset(alice, GemResetRequest(sandbox_id=instance, seed=3))
        for guess in ("50", "not a number"):
            await table.step(alice, GemStepRequest(sandbox_id=instance, action=guess))
        listed = await table.episodes(alice, instance, 0, 10)
        assert (listed.env_id, listed.total) == ("rock/GuessNumber-v0", 1)
        assert listed.items[0].steps == 2 and not listed.items[0].done
        page = await table.episode_steps(alice, instance, 0, 0, 10)
        assert [s.index for s in page.items] == [0, 1, 2]
        assert page.items[1].action == '"50"'
        assert "50" in page.items[1].observation
        assert json.loads(page.items[2].info) == {"valid": False}
        assert (await table.episode_steps(alice, instance, 0, 2, 1)).items[0].index == 2
        # Another namespace sees nothing; a viewer sees it.
        with pytest.raises(NotFound):
            await table.episodes(bob, instance, 0, 10)
        assert await table.describe(bob) == []
        (row,) = await table.describe(vera)
        assert (row["id"], row["episodes"], row["closed"]) == (instance, 1, False)
        # Closed, it stays readable (the console shows finished runs), marked closed.
        await table.close(alice, GemCloseRequest(sandbox_id=instance))
        (row,) = await table.describe(alice)
        assert row["closed"] is True
        assert (await table.episodes(alice, instance, 0, 10)).total == 1
        with pytest.raises(NotFound):
            await table.step(alice, GemStepRequest(sandbox_id=instance, action="5"))


def test_a_sample_carries_the_processes_running() -> None:
    samples = Samples(1.0, clock=Clock())
    assert samples.take({"running": 2}, {}, 3).processes_running == 3
    assert samples.take({"running": 2}).processes_running is None
    assert [s.processes_running for s in samples.series().samples] == [3, None]
