"""Vectorised rollouts: N async envs stepped concurrently, and GRPO groups.

:class:`AsyncVectorEnv` steps its envs with ``asyncio.gather`` on one event loop: no
subprocesses and no shared memory, so text observations come back as the env returned them
(Gymnasium's own ``AsyncVectorEnv`` corrupts ``Text`` observations unless
``shared_memory=False``). Observations and infos are lists, one item per env; rewards and the
terminated/truncated flags are numpy arrays.

Sandboxes are created concurrently at the first reset. If any create fails, every env of the
vector is closed (so the sandboxes that were created are deleted) before the error is raised.

Example::

    async with make_group("rock/Terminal-v0", seed=7, size=8) as group:
        observations, infos = await group.reset()        # eight copies of one task
        while not group.all_done:
            actions = [policy(o) if not d else None for o, d in zip(observations, group.done)]
            observations, rewards, terminated, truncated, infos = await group.step(actions)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
from gymnasium import Space
from gymnasium.spaces import Tuple

from rock_serve.envs._async_env import AsyncEnv, AsyncSandboxEnv
from rock_serve.envs._clients import default_async_client
from rock_serve.envs._errors import EnvClosed, EpisodeOver, ResetNeeded
from rock_serve.envs._registry import make_async
from rock_serve.errors import InvalidRequest
from rock_serve.protocol.fork import ForkRequest
from rock_serve.sdk import AsyncClient

__all__ = ["AsyncEnvGroup", "AsyncVectorEnv", "AutoresetMode", "make_group", "make_vec"]

AutoresetMode = Literal["next_step", "disabled"]

StepResult = tuple[
    list[Any],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.bool_],
    list[dict[str, Any]],
]


class AsyncVectorEnv:
    """Several :class:`~rock_serve.envs.AsyncEnv` stepped together (see the module docstring).

    ``autoreset_mode``:

    - ``"next_step"`` (Gymnasium's default): the step after an env's episode ended resets that
      env instead of stepping it (its action is ignored) and returns the new first observation,
      reward 0 and both flags False.
    - ``"disabled"``: an env whose episode ended is not stepped again until :meth:`reset`; give
      it the action ``None`` (it is then skipped: its last observation comes back with reward
      0, its flags unchanged and ``{"skipped": True}`` as info). Any other action raises
      :class:`~rock_serve.envs.EpisodeOver`.
    """

    def __init__(
        self,
        envs: Sequence[AsyncEnv[Any, Any]],
        *,
        autoreset_mode: AutoresetMode = "next_step",
        client: AsyncClient | None = None,
    ) -> None:
        """Group envs.

        Args:
            envs: The envs (at least one); they must share their spaces.
            autoreset_mode: ``"next_step"`` or ``"disabled"`` (see the class docstring).
            client: A client to close with the vector (the one its envs share), if any.
        """
        if not envs:
            raise InvalidRequest("a vector env needs at least one env")
        if autoreset_mode not in ("next_step", "disabled"):
            raise InvalidRequest(
                f"autoreset_mode must be 'next_step' or 'disabled': {autoreset_mode!r}"
            )
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self.autoreset_mode: AutoresetMode = autoreset_mode
        self.single_observation_space: Space[Any] = self.envs[0].observation_space
        self.single_action_space: Space[Any] = self.envs[0].action_space
        self.observation_space = Tuple([self.single_observation_space] * self.num_envs)
        self.action_space = Tuple([self.single_action_space] * self.num_envs)
        self.metadata: dict[str, Any] = {"autoreset_mode": autoreset_mode}
        self._client = client
        self._obs: list[Any] = [None] * self.num_envs
        self._terminated = np.zeros(self.num_envs, dtype=np.bool_)
        self._truncated = np.zeros(self.num_envs, dtype=np.bool_)
        self._has_reset = False
        self._closed = False

    @property
    def done(self) -> list[bool]:
        """Per env: whether its current episode has ended."""
        return [bool(t or u) for t, u in zip(self._terminated, self._truncated, strict=True)]

    @property
    def all_done(self) -> bool:
        """Whether every env's episode has ended."""
        return all(self.done)

    def _seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int):
            return [seed + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise InvalidRequest(f"{len(seeds)} seeds for {self.num_envs} envs")
        return seeds

    async def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
        mask: Sequence[bool] | None = None,
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Reset every env (or those in ``mask``) concurrently.

        Args:
            seed: One int (env ``i`` gets ``seed + i``), one seed per env, or None.
            options: Passed to every env's reset.
            mask: Reset only the envs whose entry is True.

        Returns:
            The observations and infos of all envs (unreset ones repeat their last
            observation, with an empty info).

        Raises:
            The first error of a failed reset, after closing every env.
        """
        self._check_open()
        seeds = self._seeds(seed)
        chosen = [True] * self.num_envs if mask is None else [bool(m) for m in mask]
        if len(chosen) != self.num_envs:
            raise InvalidRequest(f"mask has {len(chosen)} entries for {self.num_envs} envs")
        picked = [i for i in range(self.num_envs) if chosen[i]]
        results = await asyncio.gather(
            *(self.envs[i].reset(seed=seeds[i], options=options) for i in picked),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()  # nothing created by this reset outlives the error
            raise errors[0]
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i, result in zip(picked, results, strict=True):
            assert not isinstance(result, BaseException)
            self._obs[i], infos[i] = result
            self._terminated[i] = self._truncated[i] = False
        self._has_reset = True
        return list(self._obs), infos

    async def step(self, actions: Sequence[Any]) -> StepResult:
        """Step every env concurrently with its action.

        Returns:
            ``(observations, rewards, terminated, truncated, infos)``.

        Raises:
            The first error of a failed step (the other envs' steps complete first).
        """
        self._check_open()
        if not self._has_reset:
            raise ResetNeeded("call reset() before step()")
        if len(actions) != self.num_envs:
            raise InvalidRequest(f"{len(actions)} actions for {self.num_envs} envs")
        done = self.done
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        truncated = np.zeros(self.num_envs, dtype=np.bool_)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        calls: dict[int, Any] = {}
        for i, action in enumerate(actions):
            if not done[i]:
                calls[i] = self.envs[i].step(action)
            elif self.autoreset_mode == "next_step":
                calls[i] = self.envs[i].reset()
            elif action is not None:
                raise EpisodeOver(f"env {i}'s episode is over: give it the action None or reset")
            else:
                terminated[i], truncated[i] = self._terminated[i], self._truncated[i]
                infos[i] = {"skipped": True}
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for i, result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                continue
            if done[i]:  # autoreset
                self._obs[i], infos[i] = result
            else:
                self._obs[i], rewards[i], terminated[i], truncated[i], infos[i] = result
        self._terminated, self._truncated = terminated.copy(), truncated.copy()
        if errors:
            raise errors[0]
        return list(self._obs), rewards, terminated, truncated, infos

    async def close(self) -> None:
        """Close every env (deleting their sandboxes) and the vector's own client."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(env.close() for env in self.envs), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise EnvClosed("the vector env is closed")

    async def __aenter__(self) -> AsyncVectorEnv:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.num_envs} {self.envs[0]}>"


class AsyncEnvGroup(AsyncVectorEnv):
    """A GRPO group: envs that all reset with one seed, so they all get the same task.

    ``reset()`` uses the group's :attr:`seed`; ``reset(seed=s)`` moves the whole group to
    seed ``s``. Autoreset is disabled: a group is one task, rolled out ``size`` times.
    """

    def __init__(
        self,
        envs: Sequence[AsyncEnv[Any, Any]],
        seed: int,
        *,
        client: AsyncClient | None = None,
        fork_after_reset: bool = False,
    ) -> None:
        """Group envs under one seed.

        With ``fork_after_reset`` a reset sets up the first env only, then forks its sandbox
        into the others (issue 16): G members from one prepared sandbox, no setup replayed.
        """
        super().__init__(envs, autoreset_mode="disabled", client=client)
        self.seed = seed
        self.fork_after_reset = fork_after_reset
        if fork_after_reset:
            for env in self.envs:
                if not isinstance(env.unwrapped, AsyncSandboxEnv):
                    raise InvalidRequest("fork_after_reset needs envs that run in sandboxes")

    async def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
        mask: Sequence[bool] | None = None,
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Reset every env with the group's seed (or move the group to ``seed``)."""
        if seed is not None and not isinstance(seed, int):
            raise InvalidRequest("a group has one seed: pass an int")
        if seed is not None:
            self.seed = seed
        seeds: list[int | None] = [self.seed] * self.num_envs
        if self.fork_after_reset and self.num_envs > 1 and mask is None:
            return await self._forked_reset(seeds, options)
        return await super().reset(seed=seeds, options=options, mask=mask)

    async def _forked_reset(
        self, seeds: list[int | None], options: dict[str, Any] | None
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Reset the first member, fork its sandbox into the others; their reset takes it."""
        self._check_open()
        first = self.envs[0]
        try:
            obs, info = await first.reset(seed=self.seed, options=options)
            source = cast(AsyncSandboxEnv[Any, Any], first.unwrapped)
            if source.sandbox_id is not None:  # a core without a sandbox has nothing to fork
                result = await source.client.fork_sandbox(
                    source.sandbox_id, ForkRequest(count=self.num_envs - 1, session=False)
                )
                for env, record in zip(self.envs[1:], result.items, strict=True):
                    member = cast(AsyncSandboxEnv[Any, Any], env.unwrapped)
                    member.take_fork(source, record.id, obs, info)
        except BaseException:
            await self.close()  # nothing made by this reset outlives the error
            raise
        mask = [False] + [True] * (self.num_envs - 1)
        observations, infos = await super().reset(seed=seeds, options=options, mask=mask)
        self._obs[0], observations[0], infos[0] = obs, obs, info
        self._terminated[0] = self._truncated[0] = False
        return observations, infos


def _client(client: AsyncClient | None) -> tuple[AsyncClient, AsyncClient | None]:
    """The client the envs share, and the one the vector owns (closes)."""
    if client is None:
        own = default_async_client()
        return own, own
    if not isinstance(client, AsyncClient):
        raise InvalidRequest("vector envs need a rock_serve.sdk.AsyncClient")
    return client, None


def make_vec(
    id: str,
    n: int,
    *,
    client: AsyncClient | None = None,
    autoreset_mode: AutoresetMode = "next_step",
    **kwargs: Any,
) -> AsyncVectorEnv:
    """``n`` envs of ``id`` (each with its own sandbox unless the spec shares one), one client.

    Args:
        id: A registered env id.
        n: How many envs.
        client: The client they share (None: a default one, closed with the vector).
        autoreset_mode: See :class:`AsyncVectorEnv`.
        **kwargs: Passed to :func:`~rock_serve.envs.make_async` for every env.

    Returns:
        The vector env; its sandboxes are created concurrently at the first reset.
    """
    if not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"n must be an int >= 1, not {n!r}")
    shared, own = _client(client)
    envs = [make_async(id, client=shared, **kwargs) for _ in range(n)]
    return AsyncVectorEnv(envs, autoreset_mode=autoreset_mode, client=own)


def make_group(
    id: str,
    seed: int,
    size: int,
    *,
    client: AsyncClient | None = None,
    fork_after_reset: bool = False,
    **kwargs: Any,
) -> AsyncEnvGroup:
    """A GRPO group: ``size`` envs of ``id`` that reset with ``seed``, so on the same task.

    Args:
        id: A registered env id.
        seed: The group's seed.
        size: How many envs (G).
        client: The client they share (None: a default one, closed with the group).
        fork_after_reset: Set up one member per reset and fork its sandbox into the others
            (copy-on-write, on its node) instead of creating and setting up ``size`` sandboxes.
        **kwargs: Passed to :func:`~rock_serve.envs.make_async` for every env.

    Returns:
        The group; ``await group.reset()`` gives ``size`` copies of the same first observation.
    """
    if not isinstance(seed, int):
        raise InvalidRequest(f"seed must be an int, not {seed!r}")
    if not isinstance(size, int) or size < 1:
        raise InvalidRequest(f"size must be an int >= 1, not {size!r}")
    shared, own = _client(client)
    envs = [make_async(id, client=shared, **kwargs) for _ in range(size)]
    return AsyncEnvGroup(envs, seed, client=own, fork_after_reset=fork_after_reset)
