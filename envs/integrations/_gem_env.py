"""ROCK's GEM env API: its wire models, and a GEM ``Env`` client of the Admin's GEM routes.

The Admin serves ROCK's five routes under :data:`GEM_PREFIX` (``/apis/v1/envs/gem``):

==========  ==================================  =============================================
route       body                                reply
==========  ==================================  =============================================
``make``    :class:`GemMakeRequest`             :class:`GemMakeResponse` (the instance id)
``reset``   :class:`GemResetRequest`            :class:`GemResetResponse`
``step``    :class:`GemStepRequest`             :class:`GemStepResponse`
``close``   :class:`GemCloseRequest`            :class:`GemCloseResponse`
``list``    :class:`GemListRequest`             :class:`GemListResponse`
==========  ==================================  =============================================

The bodies are ROCK's, field for field (``rock/actions/envs/request.py`` and ``response.py``):
replies are bare JSON objects, and the env instance is named ``sandbox_id`` as in ROCK, where an
instance is a sandbox. ``make`` also takes ``kwargs`` (ROCK's handler reads only ``env_id``) and
``reset`` takes ``options``: a superset, so ROCK's own client works unchanged. Unknown fields are
ignored, as ROCK does. Errors are the platform's one error body.

:class:`GemEnvClient` has GEM's ``gem.Env`` interface (``reset(seed=None) -> (obs, info)``,
``step(action) -> (obs, reward, terminated, truncated, info)``, ``close()``, ``spawn()``) and
talks to those routes over one pooled ``httpx.Client``; :func:`gem_make` is ROCK's ``rock.make``
with its keyword arguments reaching the env (ROCK's raises ``TypeError`` on any keyword). GEM
itself is not imported (``gem-llm`` pulls reasoning-gym): register the client with GEM yourself::

    import functools, gem
    gem.register("rock:Terminal-v0",
                 entry_point=functools.partial(GemEnvClient, "rock/Terminal-v0"))
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from rock_serve.errors import InvalidRequest, RockError
from rock_serve.sdk import _base

__all__ = [
    "GEM_PREFIX",
    "GemCloseRequest",
    "GemCloseResponse",
    "GemEnvClient",
    "GemListRequest",
    "GemListResponse",
    "GemMakeRequest",
    "GemMakeResponse",
    "GemResetRequest",
    "GemResetResponse",
    "GemStepRequest",
    "GemStepResponse",
    "gem_make",
]

#: Where the Admin serves the GEM routes (ROCK's prefix).
GEM_PREFIX = "/apis/v1/envs/gem"
#: Seconds per call of :class:`GemEnvClient` (ROCK's client uses 300: a reset may create a
#: sandbox and a step may run a verifier).
DEFAULT_TIMEOUT = 300.0

_ID = Field(min_length=1, max_length=128, description="The env instance (ROCK's name for it).")


class _GemModel(BaseModel):
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)


class GemMakeRequest(_GemModel):
    """Body of ``make``: a registered env id, and keyword arguments for it."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True, populate_by_name=True)

    env_id: str = Field(min_length=1, max_length=256)
    """A registered env id, e.g. ``rock/GuessNumber-v0`` (see ``list``)."""
    env_kwargs: dict[str, Any] = Field(default_factory=dict, alias="kwargs")
    """``kwargs`` on the wire: keyword arguments of ``rock_serve.envs.make`` (an extension:
    ROCK has none)."""


class GemMakeResponse(_GemModel):
    """Reply of ``make``: the new env instance's id."""

    sandbox_id: str
    """The env instance's id, for ``reset``, ``step`` and ``close`` (not a sandbox id: the
    instance owns a sandbox, created at its first reset)."""


class GemResetRequest(_GemModel):
    """Body of ``reset``."""

    sandbox_id: str = _ID
    seed: int | None = Field(default=None, ge=0)
    """Seed of the env's task generator (same seed, same task)."""
    options: dict[str, Any] | None = None
    """Reset options of the env (an extension)."""


class GemResetResponse(_GemModel):
    """Reply of ``reset``."""

    observation: Any
    """The first observation (text for the built-in envs)."""
    info: dict[str, Any] = Field(default_factory=dict)
    """What the env reports with it."""


class GemStepRequest(_GemModel):
    """Body of ``step``."""

    sandbox_id: str = _ID
    action: Any
    """The action: text for text envs (ROCK types it as a string), a number for discrete ones."""


class GemStepResponse(_GemModel):
    """Reply of ``step``: Gymnasium's five-tuple as an object."""

    observation: Any
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = Field(default_factory=dict)


class GemCloseRequest(_GemModel):
    """Body of ``close``."""

    sandbox_id: str = _ID


class GemCloseResponse(_GemModel):
    """Reply of ``close``: the closed instance's id (its sandbox is deleted)."""

    sandbox_id: str


class GemListRequest(_GemModel):
    """Body of ``list``; ROCK sends an instance id, which is checked when given."""

    sandbox_id: str | None = Field(default=None, max_length=128)


class GemListResponse(_GemModel):
    """Reply of ``list``: the ids ``make`` accepts."""

    env_id: list[str]


class GemEnvClient:
    """A GEM env whose episodes run on the platform, through the Admin's GEM routes.

    It has the interface of ``gem.Env`` without importing GEM. ``make`` happens in the
    constructor; the env's sandbox is created on the platform at the first :meth:`reset` and
    deleted by :meth:`close` (the platform also reaps instances left idle). Errors are the
    typed errors of :mod:`rock_serve.errors`: an unknown env id ``NotFound``, bad kwargs or
    actions ``InvalidRequest``, a step before reset or after the episode ended ``Conflict``.
    Each instance keeps one pooled HTTP client (not one per call, as ROCK's ``RockEnv`` does).
    """

    def __init__(
        self,
        env_id: str,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        kwargs: Mapping[str, Any] | None = None,
        http: httpx.Client | None = None,
        seed: int | None = None,
        **env_kwargs: Any,
    ) -> None:
        """Make an env instance on the platform.

        ``gem.make(id, **kw)`` and ``gem.make_vec(ids, seed=0, **kw)`` call the registered
        entry point with ``seed`` (``seed + index`` per env) and their own keyword arguments:
        ``seed`` seeds the first :meth:`reset` that names none (so the envs of a vector start
        on different tasks, reproducibly), and the other keywords join ``kwargs``.

        Args:
            env_id: A registered env id (``rock/GuessNumber-v0``, ...).
            base_url: Platform URL (default ``ROCK_BASE_URL``; ROCK's variable too).
            token: Bearer token (default ``ROCK_TOKEN`` or the saved credentials).
            timeout: Seconds per call.
            kwargs: Keyword arguments of the env (``rock_serve.envs.make``'s).
            http: An ``httpx.Client`` to share (its base URL and auth are the caller's); None
                makes one, closed with the env.
            seed: Seed of the first reset that names none (GEM's ``make_vec`` passes one).
            **env_kwargs: More keyword arguments of the env (GEM's ``make(id, **kw)``).

        Raises:
            NotFound: No env has that id.
            InvalidRequest: The env takes no such keyword arguments.
        """
        self._env_id = env_id
        self.kwargs = {**dict(kwargs or {}), **env_kwargs}
        self.seed = seed
        if http is None:
            settings = _base.ClientSettings.from_env(
                base_url=base_url, token=token, timeout=timeout
            )
            http = httpx.Client(
                base_url=settings.base_url,
                headers=_base.default_headers(settings),
                timeout=settings.timeout,
            )
            self._owns_http = True
            # What a spawned env connects with (its own client: this one closes with us).
            self._connect: dict[str, Any] = {
                "base_url": settings.base_url,
                "token": settings.token or "",
                "timeout": settings.timeout,
            }
        else:
            self._owns_http = False
            self._connect = {"http": http}
        self._http = http
        self._closed = False
        self.instance_id: str | None = None
        try:
            made = self._post("make", GemMakeRequest(env_id=env_id, env_kwargs=self.kwargs))
            self.instance_id = GemMakeResponse.model_validate(made).sandbox_id
        except BaseException:
            self._release_http()
            raise

    @property
    def remote_env_id(self) -> str:
        """The platform's env id this client plays."""
        return self._env_id

    @property
    def unwrapped(self) -> GemEnvClient:
        """The env itself (GEM's wrappers unwrap to it)."""
        return self

    def reset(
        self, seed: int | None = None, *, options: Mapping[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode (creating the sandbox at the first one).

        Returns:
            ``(observation, info)``.
        """
        if seed is None and self.seed is not None:
            seed, self.seed = self.seed, None  # the constructor's seed: first reset only
        body = GemResetRequest(
            sandbox_id=self._id(), seed=seed, options=dict(options) if options else None
        )
        reply = GemResetResponse.model_validate(self._post("reset", body))
        return reply.observation, reply.info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Apply an action.

        Returns:
            ``(observation, reward, terminated, truncated, info)``.

        Raises:
            Conflict: Before the first reset, or after the episode ended.
            InvalidRequest: The action is not in the env's action space.
        """
        body = GemStepRequest(sandbox_id=self._id(), action=action)
        reply = GemStepResponse.model_validate(self._post("step", body))
        return reply.observation, reply.reward, reply.terminated, reply.truncated, reply.info

    def close(self) -> None:
        """Close the instance on the platform (deleting its sandbox); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.instance_id is not None:
                try:
                    self._post("close", GemCloseRequest(sandbox_id=self.instance_id))
                except RockError as exc:
                    if exc.status != 404:  # already gone (reaped): closed all the same
                        raise
        finally:
            self._release_http()

    def list_envs(self) -> list[str]:
        """The env ids the platform can make."""
        body = GemListRequest(sandbox_id=self.instance_id)
        return GemListResponse.model_validate(self._post("list", body)).env_id

    def sample_random_action(self) -> str:
        """GEM's hook for random agents; remote envs have none."""
        raise NotImplementedError("a remote env has no local action sampler")

    def spawn(self, same_state: bool = False, **kwargs: Any) -> GemEnvClient:
        """A new instance of the same env, ``kwargs`` overriding this one's (GEM's ``spawn``).

        Raises:
            NotImplementedError: ``same_state`` (a sandbox's state cannot be copied yet).
        """
        if same_state:
            raise NotImplementedError("spawn(same_state=True) is not supported by remote envs")
        return GemEnvClient(self._env_id, kwargs={**self.kwargs, **kwargs}, **self._connect)

    def __enter__(self) -> GemEnvClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<GemEnvClient {self._env_id} instance={self.instance_id}>"

    # ----------------------------------------------------------------------------- HTTP

    def _id(self) -> str:
        if self._closed or self.instance_id is None:
            raise InvalidRequest("the env is closed")
        return self.instance_id

    def _post(self, route: str, body: BaseModel) -> Any:
        payload = body.model_dump(mode="json", by_alias=True)
        response = self._http.post(f"{GEM_PREFIX}/{route}", json=payload)
        if not response.is_success:
            raise _base.error_from_response(response)
        return response.json()

    def _release_http(self) -> None:
        if self._owns_http:
            self._http.close()


def gem_make(
    env_id: str,
    *,
    base_url: str | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> GemEnvClient:
    """ROCK's ``rock.make(env_id, **kwargs)``, with the keyword arguments reaching the env.

    Returns:
        The env, made on the platform.
    """
    return GemEnvClient(env_id, base_url=base_url, token=token, timeout=timeout, kwargs=kwargs)
