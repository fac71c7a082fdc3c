"""The wrappers ``make`` applies: time limit and order enforcing, sync and async.

Sync envs get Gymnasium's own ``TimeLimit`` and an ``OrderEnforcing`` that subclasses
Gymnasium's, raising the typed :class:`~rock_serve.envs.ResetNeeded` (still a Gymnasium
``ResetNeeded``) and also refusing a step after the episode ended. Async envs get twins.
"""

from __future__ import annotations

from typing import Any, TypeVar

import gymnasium
from gymnasium.wrappers import OrderEnforcing as _GymOrderEnforcing

from rock_serve.envs._async_env import AsyncEnv, AsyncWrapper
from rock_serve.envs._errors import EnvClosed, EpisodeOver, ResetNeeded
from rock_serve.errors import InvalidRequest

__all__ = ["AsyncOrderEnforcing", "AsyncTimeLimit", "OrderEnforcing", "close_env"]

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")


def close_env(env: gymnasium.Env[Any, Any]) -> None:
    """``env.close()`` (untyped in Gymnasium 1.2, typed in 1.4)."""
    closer: Any = env.close
    closer()


class OrderEnforcing(_GymOrderEnforcing[ObsT, ActT]):
    """Gymnasium's ``OrderEnforcing`` with typed errors: no step before the first reset
    (:class:`ResetNeeded`) and none after a step that terminated or truncated
    (:class:`EpisodeOver`).
    """

    def __init__(
        self, env: gymnasium.Env[ObsT, ActT], disable_render_order_enforcing: bool = False
    ) -> None:
        """Wrap ``env``."""
        super().__init__(env, disable_render_order_enforcing=disable_render_order_enforcing)
        self._episode_over = False
        self._closed = False

    def step(self, action: ActT) -> tuple[ObsT, Any, bool, bool, dict[str, Any]]:
        """Step the env, refusing out-of-order calls."""
        if self._closed:
            raise EnvClosed("the env is closed")
        if not self._has_reset:
            raise ResetNeeded("call reset() before step()")
        if self._episode_over:
            raise EpisodeOver("the episode is over (terminated or truncated): call reset()")
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._episode_over = bool(terminated or truncated)
        return obs, reward, terminated, truncated, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Reset the env; later steps are allowed once it succeeded."""
        if self._closed:
            raise EnvClosed("the env is closed")
        result = self.env.reset(seed=seed, options=options)
        self._has_reset = True
        self._episode_over = False
        return result

    def close(self) -> None:
        """Close the env; every later reset or step raises :class:`EnvClosed`."""
        self._closed = True
        close_env(self.env)


class AsyncTimeLimit(AsyncWrapper[ObsT, ActT]):
    """Truncate episodes after ``max_episode_steps`` steps (Gymnasium's ``TimeLimit``, async)."""

    def __init__(self, env: AsyncEnv[ObsT, ActT], max_episode_steps: int) -> None:
        """Wrap ``env``."""
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise InvalidRequest(f"max_episode_steps must be an int >= 1: {max_episode_steps!r}")
        super().__init__(env)
        self.max_episode_steps = max_episode_steps
        self._elapsed_steps: int | None = None

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Step the env; ``truncated`` is True once the limit is reached."""
        obs, reward, terminated, truncated, info = await self.env.step(action)
        self._elapsed_steps = (self._elapsed_steps or 0) + 1
        if self._elapsed_steps >= self.max_episode_steps:
            truncated = True
        return obs, reward, terminated, truncated, info

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Reset the env and the step count."""
        self._elapsed_steps = 0
        return await self.env.reset(seed=seed, options=options)


class AsyncOrderEnforcing(AsyncWrapper[ObsT, ActT]):
    """The async twin of :class:`OrderEnforcing`."""

    def __init__(self, env: AsyncEnv[ObsT, ActT]) -> None:
        """Wrap ``env``."""
        super().__init__(env)
        self._has_reset = False
        self._episode_over = False
        self._closed = False

    @property
    def has_reset(self) -> bool:
        """Whether a reset succeeded."""
        return self._has_reset

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Step the env, refusing out-of-order calls."""
        if self._closed:
            raise EnvClosed("the env is closed")
        if not self._has_reset:
            raise ResetNeeded("call reset() before step()")
        if self._episode_over:
            raise EpisodeOver("the episode is over (terminated or truncated): call reset()")
        obs, reward, terminated, truncated, info = await self.env.step(action)
        self._episode_over = bool(terminated or truncated)
        return obs, reward, terminated, truncated, info

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Reset the env; later steps are allowed once it succeeded."""
        if self._closed:
            raise EnvClosed("the env is closed")
        result = await self.env.reset(seed=seed, options=options)
        self._has_reset = True
        self._episode_over = False
        return result

    async def close(self) -> None:
        """Close the env; every later reset or step raises :class:`EnvClosed`."""
        self._closed = True
        await self.env.close()
