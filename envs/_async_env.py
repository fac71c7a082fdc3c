"""The async env contract (:class:`AsyncEnv`, :class:`AsyncWrapper`) and the async sandbox env.

:class:`AsyncEnv` is Gymnasium's ``Env`` with ``await`` on ``reset``, ``step`` and ``close``:
the same arguments, return values, spaces, ``spec``, ``metadata`` and seeding (``np_random``),
plus ``async with``. Rollout loops step many of them concurrently on one event loop
(:mod:`rock_serve.envs.vector`).
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

import numpy as np
from gymnasium import Space
from gymnasium.envs.registration import EnvSpec as GymEnvSpec
from gymnasium.utils import seeding

from rock_serve.envs._clients import default_async_client
from rock_serve.envs._core import EnvCore, sandbox_request
from rock_serve.envs._lease import Effect, Lease
from rock_serve.envs._machine import Machine, OnSandboxError, names
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.sdk import AsyncClient

__all__ = ["AsyncEnv", "AsyncSandboxEnv", "AsyncWrapper"]

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")
T = TypeVar("T")


class AsyncEnv(Generic[ObsT, ActT]):
    """The async twin of :class:`gymnasium.Env`.

    Subclasses set the spaces and implement :meth:`step` and :meth:`reset` (calling
    ``await super().reset(seed=seed)`` first, as Gymnasium envs do, to seed :attr:`np_random`).
    """

    metadata: dict[str, Any] = {"render_modes": []}
    render_mode: str | None = None
    spec: GymEnvSpec | None = None
    observation_space: Space[ObsT]
    action_space: Space[ActT]

    _np_random: np.random.Generator | None = None
    _np_random_seed: int | None = None

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Start an episode; the base implementation only seeds :attr:`np_random`."""
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        return None, {}  # type: ignore[return-value]

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Apply an action; returns ``(observation, reward, terminated, truncated, info)``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the env holds (idempotent)."""

    @property
    def np_random(self) -> np.random.Generator:
        """The env's random generator (seeded at random on first use if never seeded)."""
        if self._np_random is None:
            self._np_random, self._np_random_seed = seeding.np_random()
        return self._np_random

    @np_random.setter
    def np_random(self, value: np.random.Generator) -> None:
        self._np_random = value
        self._np_random_seed = -1

    @property
    def np_random_seed(self) -> int:
        """The seed of :attr:`np_random` (-1 when it was set directly)."""
        if self._np_random_seed is None:
            self._np_random, self._np_random_seed = seeding.np_random()
        return self._np_random_seed

    @property
    def unwrapped(self) -> AsyncEnv[ObsT, ActT]:
        """The innermost env (itself, unless this is a wrapper)."""
        return self

    async def __aenter__(self) -> AsyncEnv[ObsT, ActT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __str__(self) -> str:
        if self.spec is None:
            return f"<{type(self).__name__} instance>"
        return f"<{type(self).__name__}<{self.spec.id}>>"


class AsyncWrapper(AsyncEnv[ObsT, ActT]):
    """Wraps an :class:`AsyncEnv` to change part of its behaviour (the twin of
    :class:`gymnasium.Wrapper`); everything not overridden goes to the wrapped env.
    """

    def __init__(self, env: AsyncEnv[ObsT, ActT]) -> None:
        """Wrap ``env``."""
        self.env = env

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Reset the wrapped env."""
        return await self.env.reset(seed=seed, options=options)

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Step the wrapped env."""
        return await self.env.step(action)

    async def close(self) -> None:
        """Close the wrapped env."""
        await self.env.close()

    @property
    def observation_space(self) -> Space[ObsT]:  # type: ignore[override]
        """The wrapped env's observation space."""
        return self.env.observation_space

    @property
    def action_space(self) -> Space[ActT]:  # type: ignore[override]
        """The wrapped env's action space."""
        return self.env.action_space

    @property
    def metadata(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped env's metadata."""
        return self.env.metadata

    @property
    def spec(self) -> GymEnvSpec | None:  # type: ignore[override]
        """The wrapped env's spec."""
        return self.env.spec

    @property
    def np_random(self) -> np.random.Generator:
        """The wrapped env's random generator."""
        return self.env.np_random

    @np_random.setter
    def np_random(self, value: np.random.Generator) -> None:
        self.env.np_random = value

    @property
    def np_random_seed(self) -> int:
        """The seed of the wrapped env's random generator."""
        return self.env.np_random_seed

    @property
    def unwrapped(self) -> AsyncEnv[ObsT, ActT]:
        """The innermost env."""
        return self.env.unwrapped

    def __str__(self) -> str:
        return f"<{type(self).__name__}{self.env}>"

    def __repr__(self) -> str:
        return str(self)


class AsyncSandboxEnv(AsyncEnv[ObsT, ActT]):
    """The async twin of :class:`~rock_serve.envs.SandboxEnv`: the same core, driven with an
    :class:`~rock_serve.sdk.AsyncClient` (HTTP, or the Ray transport inside the cluster).

    The sandbox is created at the first ``reset`` and released by ``await close()``, by
    ``async with``, or by garbage collection (scheduled on the running loop, else done
    synchronously). A cancelled reset or step leaves the env needing a reset; a cancelled
    sandbox create deletes the sandbox once the create finishes.
    """

    def __init__(
        self,
        core: EnvCore[ObsT, ActT],
        *,
        client: AsyncClient | None = None,
        sandbox: CreateSandboxRequest | Mapping[str, Any] | None = None,
        shared_sandbox: bool = False,
        max_episode_steps: int | None = None,
        on_sandbox_error: OnSandboxError = "raise",
    ) -> None:
        """Wrap a core; the arguments are those of :class:`~rock_serve.envs.SandboxEnv`, with
        an :class:`~rock_serve.sdk.AsyncClient` (None: see :mod:`rock_serve.envs._clients`).
        """
        if client is not None and not isinstance(client, AsyncClient):
            raise InvalidRequest("an async env needs a rock_serve.sdk.AsyncClient (use make)")
        self.core = core
        self.observation_space = core.observation_space
        self.action_space = core.action_space
        self.metadata = dict(core.metadata)
        session, workdir = names(shared_sandbox)
        request = sandbox_request(core, None, sandbox, {})
        owns = client is None
        self.client: AsyncClient = default_async_client() if client is None else client
        self._lease = Lease(
            self.client,
            owns_client=owns,
            request=request,
            shared=shared_sandbox,
            session=session,
            workdir=workdir,
        )
        self._machine: Machine[ObsT, ActT] = Machine(
            core,
            self._lease,
            max_episode_steps=max_episode_steps,
            on_sandbox_error=on_sandbox_error,
        )
        self._finalizer = weakref.finalize(self, self._lease.release_from_gc)
        self._fork: tuple[AsyncSandboxEnv[ObsT, ActT], str, ObsT, dict[str, Any]] | None = None

    def take_fork(
        self, source: AsyncSandboxEnv[ObsT, ActT], sandbox_id: str, obs: ObsT, info: dict[str, Any]
    ) -> None:
        """Make the next :meth:`reset` continue ``source``'s just-reset episode in
        ``sandbox_id``, a fork of ``source``'s sandbox, instead of setting one up (issue 16).

        The reset then returns ``obs`` and ``info`` (with this sandbox's id and
        ``forked_from``) and replays nothing: files come from the fork, the task's Python state
        is a copy of ``source``'s. Wrappers see an ordinary reset.
        """
        self._fork = (source, sandbox_id, obs, info)

    @property
    def sandbox_id(self) -> str | None:
        """The id of the env's sandbox, once a reset has created it."""
        return self._lease.sandbox_id

    @property
    def max_episode_steps(self) -> int | None:
        """The time limit the env runs under, if any."""
        return self._machine.max_episode_steps

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._machine.closed

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Start an episode (creating the sandbox at the first one); see ``SandboxEnv.reset``."""
        await super().reset(seed=seed)
        fork, self._fork = self._fork, None
        if fork is not None:
            source, sandbox_id, obs, info = fork
            await self._lease.adopt_async(sandbox_id)
            self.core = copy.deepcopy(source.core)
            self._machine.adopt(source._machine, self.core)
            self.np_random.bit_generator.state = source.np_random.bit_generator.state
            forked = {**info, "sandbox_id": sandbox_id, "forked_from": source.sandbox_id}
            return copy.deepcopy(obs), forked
        return await self._drive(self._machine.reset(self.np_random, seed, options))

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Apply an action; see ``SandboxEnv.step`` for the result and errors."""
        return await self._drive(self._machine.step(action))

    async def close(self) -> None:
        """Delete the sandbox (or leave the shared one) and close an owned client; idempotent."""
        self._machine.close()
        self._finalizer.detach()
        # Shielded: a cancelled close() still finishes the release.
        await asyncio.shield(self._lease.arelease())

    async def _drive(self, gen: Generator[Effect, Any, T]) -> T:
        send: Any = None
        error: Exception | None = None
        while True:
            try:
                effect = gen.send(send) if error is None else gen.throw(error)
            except StopIteration as stop:
                result: T = stop.value
                return result
            send, error = None, None
            try:
                send = await self._lease.perform_async(effect)
            except Exception as exc:
                error = exc
            except BaseException:  # cancelled: the machine marks the episode broken
                gen.close()
                raise

    def __repr__(self) -> str:
        return f"<AsyncSandboxEnv {type(self.core).__name__} sandbox={self.sandbox_id}>"
