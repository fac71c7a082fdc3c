"""``check_env``: Gymnasium's checker plus the checks of our text envs, sync and async.

For a sync env, Gymnasium's ``check_env`` runs on ``env.unwrapped`` (spaces, reset and step
signatures and return types, seeding and step determinism, fresh data on every call, close
twice); a warning of it fails the check. Then, on the env as given (wrapped by ``make``, or not):

- a step before any reset raises :class:`ResetNeeded` (on a fresh env made from the spec);
- observations lie in the observation space (strings for text spaces), rewards are finite
  numbers, flags are bools, infos are dicts;
- an action outside the action space raises :class:`InvalidAction` and changes nothing;
- after the episode ends, a step raises :class:`EpisodeOver`;
- with an id (the checker owns the env): close twice is fine, a step after close raises
  :class:`EnvClosed`, and the env's sandbox is gone afterwards.

:func:`check_async_env` runs the same on an :class:`AsyncEnv`, with its own seeding and step
determinism checks in place of Gymnasium's. A failed check raises ``AssertionError``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import gymnasium
from gymnasium.spaces import Text
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.utils.env_checker import data_equivalence

from rock_serve.envs._async_env import AsyncEnv, AsyncSandboxEnv
from rock_serve.envs._env import SandboxEnv
from rock_serve.envs._errors import EnvClosed, EpisodeOver, InvalidAction, ResetNeeded
from rock_serve.envs._registry import make, make_async
from rock_serve.envs._wrappers import close_env
from rock_serve.errors import SandboxNotFound
from rock_serve.sdk import AsyncClient, Client

__all__ = ["check_async_env", "check_env"]

#: Steps a check rolls out at most when the env has no time limit and never terminates.
EPISODE_STEPS = 40


class _NotAnAction:
    def __repr__(self) -> str:
        return "<not an action>"


def _check_obs(obs: Any, space: gymnasium.Space[Any], where: str) -> None:
    if isinstance(space, Text):
        assert isinstance(obs, str), f"{where}: observation is a {type(obs).__name__}, not a str"
    assert space.contains(obs), f"{where}: observation {str(obs)[:80]!r} is not in {space}"


def _check_step(result: Any, space: gymnasium.Space[Any], where: str) -> tuple[bool, bool]:
    assert isinstance(result, tuple) and len(result) == 5, f"{where}: step must return 5 items"
    obs, reward, terminated, truncated, info = result
    _check_obs(obs, space, where)
    assert isinstance(reward, (int, float)) and not isinstance(reward, bool), (
        f"{where}: reward is a {type(reward).__name__}"
    )
    assert math.isfinite(reward), f"{where}: reward {reward} is not finite"
    assert isinstance(terminated, bool) and isinstance(truncated, bool), f"{where}: flags not bool"
    assert isinstance(info, dict), f"{where}: info is a {type(info).__name__}"
    return terminated, truncated


def _limit(env: Any) -> int:
    unwrapped = env.unwrapped
    spec = unwrapped.spec
    steps = spec.max_episode_steps if spec is not None else None
    steps = getattr(unwrapped, "max_episode_steps", None) or steps
    return int(steps) if steps else EPISODE_STEPS


def check_env(
    env: gymnasium.Env[Any, Any] | str,
    *,
    client: Client | None = None,
    gymnasium_checks: bool = True,
    **make_kwargs: Any,
) -> None:
    """Check a sync env (see the module docstring).

    Args:
        env: An env, or a registered id (then made here, with ``client`` and ``make_kwargs``,
            and closed at the end).
        client: The client of envs made here (and of the fresh env of the order check).
        gymnasium_checks: Also run Gymnasium's own checker on ``env.unwrapped``.
        **make_kwargs: Passed to ``make`` when ``env`` is an id.

    Raises:
        AssertionError: A check failed.
    """
    owned = isinstance(env, str)
    made = make(env, client=client, **make_kwargs) if isinstance(env, str) else env
    raw = made.unwrapped
    if client is None and isinstance(raw, SandboxEnv):
        client = raw.client
    try:
        if gymnasium_checks:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gym_check_env(raw, skip_render_check=True)
            problems = [str(w.message) for w in caught]
            assert not problems, f"Gymnasium's checker warned: {'; '.join(problems)}"
        spec = raw.spec
        if spec is not None:
            fresh = make(spec.id, client=client, **spec.kwargs)
            try:
                try:
                    fresh.step(fresh.action_space.sample())
                except ResetNeeded:
                    pass
                else:
                    raise AssertionError("step() before reset() did not raise ResetNeeded")
            finally:
                close_env(fresh)
        _check_episode_sync(made)
        if owned:
            sandbox_id = raw.sandbox_id if isinstance(raw, SandboxEnv) else None
            close_env(made)
            close_env(made)
            if isinstance(raw, SandboxEnv):
                try:
                    made.step(made.action_space.sample())
                except EnvClosed:
                    pass
                else:
                    raise AssertionError("step() after close() did not raise EnvClosed")
                if sandbox_id is not None:
                    assert client is not None
                    try:
                        client.get_sandbox(sandbox_id)
                    except SandboxNotFound:
                        pass
                    else:
                        raise AssertionError(f"sandbox {sandbox_id} outlived close()")
    finally:
        if owned:
            close_env(made)


def _check_episode_sync(env: gymnasium.Env[Any, Any]) -> None:
    obs, info = env.reset(seed=0)
    _check_obs(obs, env.observation_space, "reset")
    assert isinstance(info, dict), "reset: info is not a dict"
    env.action_space.seed(0)
    try:
        env.step(_NotAnAction())
    except InvalidAction:
        pass
    else:
        raise AssertionError("an action outside the action space did not raise InvalidAction")
    for i in range(_limit(env)):
        terminated, truncated = _check_step(
            env.step(env.action_space.sample()), env.observation_space, f"step {i}"
        )
        if terminated or truncated:
            try:
                env.step(env.action_space.sample())
            except EpisodeOver:
                return
            raise AssertionError("step() after the episode ended did not raise EpisodeOver")


async def check_async_env(
    env: AsyncEnv[Any, Any] | str, *, client: AsyncClient | None = None, **make_kwargs: Any
) -> None:
    """Check an async env (see the module docstring).

    Args:
        env: An env, or a registered id (then made here, and closed at the end).
        client: The client of envs made here.
        **make_kwargs: Passed to ``make_async`` when ``env`` is an id.

    Raises:
        AssertionError: A check failed.
    """
    owned = isinstance(env, str)
    made: AsyncEnv[Any, Any] = (
        make_async(env, client=client, **make_kwargs) if isinstance(env, str) else env
    )
    raw = made.unwrapped
    if client is None and isinstance(raw, AsyncSandboxEnv):
        client = raw.client
    try:
        spec = raw.spec
        if spec is not None:
            fresh = make_async(spec.id, client=client, **spec.kwargs)
            try:
                try:
                    await fresh.step(fresh.action_space.sample())
                except ResetNeeded:
                    pass
                else:
                    raise AssertionError("step() before reset() did not raise ResetNeeded")
            finally:
                await fresh.close()
        await _check_determinism_async(made, spec is None or not spec.nondeterministic)
        await _check_episode_async(made)
        if owned:
            sandbox_id = raw.sandbox_id if isinstance(raw, AsyncSandboxEnv) else None
            await made.close()
            await made.close()
            if isinstance(raw, AsyncSandboxEnv):
                try:
                    await made.step(made.action_space.sample())
                except EnvClosed:
                    pass
                else:
                    raise AssertionError("step() after close() did not raise EnvClosed")
                if sandbox_id is not None:
                    assert client is not None
                    try:
                        await client.get_sandbox(sandbox_id)
                    except SandboxNotFound:
                        pass
                    else:
                        raise AssertionError(f"sandbox {sandbox_id} outlived close()")
    finally:
        if owned:
            await made.close()


async def _check_determinism_async(env: AsyncEnv[Any, Any], deterministic: bool) -> None:
    first, _ = await env.reset(seed=123)
    _check_obs(first, env.observation_space, "reset(seed=123)")
    other, _ = await env.reset(seed=456)
    _check_obs(other, env.observation_space, "reset(seed=456)")
    again, _ = await env.reset(seed=123)
    if deterministic:
        assert data_equivalence(first, again), "reset(seed=123) twice gave different observations"
    env.action_space.seed(123)
    action = env.action_space.sample()
    step_1 = await env.step(action)
    _check_step(step_1, env.observation_space, "step after reset(seed=123)")
    await env.reset(seed=123)
    step_2 = await env.step(action)
    if deterministic:
        assert data_equivalence(step_1, step_2), "the same seed and action gave different steps"


async def _check_episode_async(env: AsyncEnv[Any, Any]) -> None:
    obs, info = await env.reset(seed=0)
    _check_obs(obs, env.observation_space, "reset")
    assert isinstance(info, dict), "reset: info is not a dict"
    env.action_space.seed(0)
    try:
        await env.step(_NotAnAction())
    except InvalidAction:
        pass
    else:
        raise AssertionError("an action outside the action space did not raise InvalidAction")
    for i in range(_limit(env)):
        terminated, truncated = _check_step(
            await env.step(env.action_space.sample()), env.observation_space, f"step {i}"
        )
        if terminated or truncated:
            try:
                await env.step(env.action_space.sample())
            except EpisodeOver:
                return
            raise AssertionError("step() after the episode ended did not raise EpisodeOver")
