"""The RLlib env (numeric spaces, state read from the sandbox) on the session's platform.

Driven over HTTP here (``transport="http"``); the RLlib job test (test_rllib_ppo.py) drives it
over the Ray transport inside RLlib's env runners. Gymnasium's vector env runs it as RLlib does.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from rock_serve.envs import EpisodeOver, InvalidAction, check_env
from rock_serve.envs.integrations import FileFlagsCore, rllib_env_creator
from rock_serve.errors import InvalidRequest

pytestmark = pytest.mark.ray

SLOTS = 3


def _ids(api) -> list[str]:
    items = api.get("/v1/sandboxes", params={"label": "rock-serve/integration=rllib"})
    return [i["id"] for i in items.json()["items"]]


def _solve(obs: np.ndarray) -> list[int]:
    """The actions of an optimal policy from the first observation."""
    exists, target = obs[:SLOTS], obs[SLOTS : 2 * SLOTS]
    return [k if target[k] else SLOTS + k for k in range(SLOTS) if exists[k] != target[k]]


def test_env_passes_the_checks(api, platform):
    env = rllib_env_creator({"transport": "http", "base_url": platform.url, "slots": SLOTS})
    try:
        check_env(env)
    finally:
        env.close()
    assert _ids(api) == []


def test_an_optimal_policy_solves_every_task(api, platform):
    config = {"transport": "http", "base_url": platform.url, "max_episode_steps": 8}
    env = rllib_env_creator(config)
    assert env.observation_space == gymnasium.spaces.Box(0, 1, (7,), np.float32)
    assert env.action_space == gymnasium.spaces.Discrete(6)
    try:
        for seed in range(4):
            obs, info = env.reset(seed=seed)
            assert obs.dtype == np.float32 and env.observation_space.contains(obs)
            assert info["target"] != info["exists"]
            assert "".join(str(int(b)) for b in obs[:SLOTS]) == info["exists"]
            again, _ = env.reset(seed=seed)
            assert np.array_equal(obs, again)  # seeded: the same start and target
            actions = _solve(obs)
            for i, action in enumerate(actions):
                obs, reward, terminated, truncated, info = env.step(np.int64(action))
                assert info["exit_code"] == 0 and obs[-1] == 1.0
                last = i == len(actions) - 1
                assert (reward, terminated) == ((1.0, True) if last else (-0.05, False))
            assert np.array_equal(obs[:SLOTS], obs[SLOTS : 2 * SLOTS])
            with pytest.raises(EpisodeOver):
                env.step(0)
        (sandbox,) = _ids(api)  # one sandbox for every episode
        env.reset(seed=0)
        with pytest.raises(InvalidAction):
            env.step(6)
        # Time limit: undoing and redoing one file never solves it.
        flags = [env.step(a)[2:4] for a in (0, 3) * 4]
        assert flags[-1] == (False, True) and not any(t for t, _ in flags[:-1])
    finally:
        env.close()
    assert _ids(api) == []


def test_vector_env_as_rllib_runs_it(api, platform):
    config = {"transport": "http", "base_url": platform.url, "max_episode_steps": 4}
    vec = gymnasium.vector.SyncVectorEnv([lambda: rllib_env_creator(config)] * 2)
    try:
        obs, _ = vec.reset(seed=7)
        assert obs.shape == (2, 7)
        episodes = 0
        for _ in range(10):  # autoreset ("next step") after each episode's end
            obs, rewards, terminated, truncated, _ = vec.step(vec.action_space.sample())
            episodes += int(np.sum(terminated | truncated))
        assert episodes >= 2
        assert len(_ids(api)) == 2
    finally:
        vec.close()
    assert _ids(api) == []


def test_bad_config():
    with pytest.raises(InvalidRequest):
        FileFlagsCore(slots=1)
    with pytest.raises(InvalidRequest):
        rllib_env_creator({"transport": "carrier-pigeon"})
