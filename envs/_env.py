"""The sync sandbox env: a :class:`gymnasium.Env` that drives an :class:`EnvCore`."""

from __future__ import annotations

import weakref
from collections.abc import Generator, Mapping
from typing import Any, Generic, TypeVar

import gymnasium

from rock_serve.envs._clients import default_client
from rock_serve.envs._core import EnvCore, sandbox_request
from rock_serve.envs._lease import Effect, Lease
from rock_serve.envs._machine import Machine, OnSandboxError, names
from rock_serve.errors import InvalidRequest
from rock_serve.protocol import CreateSandboxRequest
from rock_serve.sdk import Client

__all__ = ["SandboxEnv"]

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")
T = TypeVar("T")


class SandboxEnv(gymnasium.Env[ObsT, ActT], Generic[ObsT, ActT]):
    """A Gymnasium env whose logic is an :class:`~rock_serve.envs.EnvCore` and whose actions
    run in a sandbox of its own (or in a session of a shared one).

    The sandbox is created at the first ``reset`` and reused by later episodes (the episode
    directory is emptied and the session restarted at each reset). ``close()`` deletes it, and
    so does garbage collection when the env is dropped without ``close()``. Usually made by
    :func:`~rock_serve.envs.make`, which adds the time limit and order enforcing of the spec.
    """

    def __init__(
        self,
        core: EnvCore[ObsT, ActT],
        *,
        client: Client | None = None,
        sandbox: CreateSandboxRequest | Mapping[str, Any] | None = None,
        shared_sandbox: bool = False,
        max_episode_steps: int | None = None,
        on_sandbox_error: OnSandboxError = "raise",
    ) -> None:
        """Wrap a core.

        Args:
            core: The env's logic.
            client: The sync client to use; None makes one from ``ROCK_BASE_URL``/``ROCK_URL``
                and ``ROCK_TOKEN`` (owned: closed with the env).
            sandbox: Fields of the sandbox's create request (image, resources, ttl_seconds...).
            shared_sandbox: Share one sandbox with the other envs of this client that ask for
                the same sandbox, in a session and directory of its own.
            max_episode_steps: Truncate episodes after this many steps (the core sees it, so
                it can score the last step).
            on_sandbox_error: When the sandbox dies during a step: ``"raise"`` its typed error,
                or ``"terminate"`` the episode with an observation saying so.
        """
        if client is not None and not isinstance(client, Client):
            raise InvalidRequest("a sync env needs a rock_serve.sdk.Client (use make_async)")
        self.core = core
        self.observation_space = core.observation_space
        self.action_space = core.action_space
        self.metadata = dict(core.metadata)
        session, workdir = names(shared_sandbox)
        request = sandbox_request(core, None, sandbox, {})
        owns = client is None
        self.client: Client = default_client() if client is None else client
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
        self._finalizer = weakref.finalize(self, self._lease.release_sync)

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

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Start an episode (creating the sandbox at the first one).

        Args:
            seed: Seed of the env's random generator, which draws the task.
            options: Passed to the core (for instance ``{"family": ...}``).

        Returns:
            The first observation and an info dict.
        """
        super().reset(seed=seed)
        return self._drive(self._machine.reset(self.np_random, seed, options))

    def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Apply an action.

        Returns:
            ``(observation, reward, terminated, truncated, info)``.

        Raises:
            ResetNeeded: Before the first reset, or after a step that failed.
            EpisodeOver: After the episode terminated or was truncated.
            EnvClosed: After close.
            InvalidAction: The action is not in the action space.
        """
        return self._drive(self._machine.step(action))

    def close(self) -> None:
        """Delete the sandbox (or leave the shared one) and close an owned client; idempotent."""
        self._machine.close()
        self._finalizer()

    def _drive(self, gen: Generator[Effect, Any, T]) -> T:
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
                send = self._lease.perform_sync(effect)
            except Exception as exc:
                error = exc
            except BaseException:
                gen.close()
                raise

    def __repr__(self) -> str:
        return f"<SandboxEnv {type(self.core).__name__} sandbox={self.sandbox_id}>"
