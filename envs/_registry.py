"""The env registry: :class:`EnvSpec`, ``register``, ``make``, ``make_async``, ``spec``.

An entry point (``"module:attr"`` or a callable) is either an :class:`EnvCore` subclass (or a
callable returning a core), which ``make`` drives with a :class:`SandboxEnv` and
``make_async`` with an :class:`AsyncSandboxEnv`; or a callable returning a ready env (a
:class:`gymnasium.Env` for ``make``, an :class:`AsyncEnv` for ``make_async``).

``make(id, **kwargs)``: the spec's kwargs, overridden by ``kwargs``, reach the entry point, and
unknown names are refused with :class:`InvalidEnvKwargs` before anything is built. These names
are ``make``'s own and never reach a core:

- ``client``: the SDK client (``Client`` for ``make``, ``AsyncClient`` for ``make_async``);
- ``sandbox``: fields of the sandbox's create request (``image``, ``resources``,
  ``ttl_seconds``, ``env``, ``labels``...), over the spec's ``image``;
- ``shared_sandbox``: override the spec's flag;
- ``on_sandbox_error``: ``"raise"`` (default) or ``"terminate"``;
- ``max_episode_steps``: override the spec's time limit (None in the spec: no limit).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
from gymnasium.envs.registration import EnvSpec as GymEnvSpec
from gymnasium.wrappers import TimeLimit
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rock_serve.envs._async_env import AsyncEnv, AsyncSandboxEnv
from rock_serve.envs._core import EnvCore, sandbox_request
from rock_serve.envs._env import SandboxEnv
from rock_serve.envs._errors import EnvExists, EnvNotFound, InvalidEnvKwargs
from rock_serve.envs._wrappers import AsyncOrderEnforcing, AsyncTimeLimit, OrderEnforcing
from rock_serve.errors import InvalidRequest

__all__ = [
    "ENV_ID",
    "MAKE_KWARGS",
    "EnvSpec",
    "list_envs",
    "make",
    "make_async",
    "register",
    "spec",
    "unregister",
]

#: Env ids as Gymnasium parses them: ``[namespace/]name[-vN]``.
ENV_ID = r"^(?:(?P<namespace>[\w:.-]+)/)?(?P<name>[\w:.-]+?)(?:-v(?P<version>\d+))?$"
_ENV_ID = re.compile(ENV_ID)

#: Keyword arguments that ``make`` consumes itself (see the module docstring).
MAKE_KWARGS = ("client", "sandbox", "shared_sandbox", "on_sandbox_error", "max_episode_steps")
#: The label every env's sandbox carries, with the env id as value.
ENV_LABEL = "rock.env"


class EnvSpec(BaseModel):
    """A registered env: what ``make`` builds and how."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    id: str = Field(pattern=ENV_ID, max_length=256)
    """``namespace/Name-vN``, for example ``rock/Terminal-v0``."""
    entry_point: str | Callable[..., Any]
    """``"module:attr"`` naming an :class:`EnvCore` subclass or an env factory, or a callable."""
    max_episode_steps: int | None = Field(default=None, gt=0)
    """Episodes are truncated after this many steps (None: no limit)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Default keyword arguments of the entry point (``make``'s kwargs override them)."""
    description: str = ""
    """One paragraph for listings."""
    image: str | None = None
    """Image (docker) or rootfs (bwrap) of the env's sandbox; None = the runtime's default."""
    version: int | None = None
    """The ``-vN`` suffix of the id (filled in from the id)."""
    shared_sandbox: bool = False
    """Envs made with one client share a sandbox, each in a session and directory of its own."""
    nondeterministic: bool = False
    """The same seed and actions may give different results (``check_env`` then skips the
    determinism checks)."""
    order_enforce: bool = True
    """Wrap in order enforcing (no step before reset or after the episode's end)."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form extras given to :func:`register`."""

    @model_validator(mode="after")
    def _version_from_id(self) -> EnvSpec:
        match = _ENV_ID.match(self.id)
        assert match is not None
        from_id = int(match["version"]) if match["version"] is not None else None
        if self.version is None and from_id is not None:
            object.__setattr__(self, "version", from_id)
        elif self.version is not None and self.version != from_id:
            raise ValueError(f"version {self.version} does not match id {self.id!r}")
        return self

    @property
    def namespace(self) -> str | None:
        """The part of the id before ``/``, if any."""
        match = _ENV_ID.match(self.id)
        assert match is not None
        return match["namespace"]

    @property
    def name(self) -> str:
        """The id without namespace and version."""
        match = _ENV_ID.match(self.id)
        assert match is not None
        return str(match["name"])


_REGISTRY: dict[str, EnvSpec] = {}
_LOCK = threading.Lock()


def register(
    id: str,
    entry_point: str | Callable[..., Any],
    max_episode_steps: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    replace: bool = False,
    **metadata: Any,
) -> EnvSpec:
    """Register an env.

    Args:
        id: ``namespace/Name-vN``.
        entry_point: ``"module:attr"`` or a callable (see the module docstring).
        max_episode_steps: Time limit of its episodes.
        kwargs: Default keyword arguments of the entry point.
        replace: Replace an env registered under the same id.
        **metadata: :class:`EnvSpec` fields (``description``, ``image``, ``shared_sandbox``,
            ``nondeterministic``, ``order_enforce``, ``version``); other names are kept in
            ``EnvSpec.metadata``.

    Returns:
        The registered spec.

    Raises:
        EnvExists: The id is taken and ``replace`` is False.
        InvalidRequest: A field is invalid.
    """
    extra = dict(metadata.pop("metadata", None) or {})
    own = ("id", "entry_point", "max_episode_steps", "kwargs")
    fields = {
        k: metadata.pop(k) for k in list(metadata) if k in EnvSpec.model_fields and k not in own
    }
    try:
        new = EnvSpec(
            id=id,
            entry_point=entry_point,
            max_episode_steps=max_episode_steps,
            kwargs=dict(kwargs or {}),
            metadata={**extra, **metadata},
            **fields,
        )
    except ValidationError as exc:
        raise InvalidRequest(f"bad env spec {id!r}: {_problems(exc)}") from None
    with _LOCK:
        if new.id in _REGISTRY and not replace:
            raise EnvExists(f"env {new.id!r} is registered already (pass replace=True)")
        _REGISTRY[new.id] = new
    return new


def unregister(id: str) -> None:
    """Remove an env from the registry.

    Raises:
        EnvNotFound: No env has that id.
    """
    with _LOCK:
        if _REGISTRY.pop(id, None) is None:
            raise _not_found(id)


def spec(id: str) -> EnvSpec:
    """The spec registered under ``id``.

    Raises:
        EnvNotFound: No env has that id (the error suggests close ones).
    """
    found = _REGISTRY.get(id)
    if found is None:
        raise _not_found(id)
    return found


def list_envs(namespace: str | None = None) -> list[EnvSpec]:
    """Registered specs sorted by id, optionally only those of one namespace."""
    specs = sorted(_REGISTRY.values(), key=lambda s: s.id)
    return [s for s in specs if namespace is None or s.namespace == namespace]


def _not_found(id: str) -> EnvNotFound:
    ids = list(_REGISTRY)
    suggestions = difflib.get_close_matches(id, ids, n=3, cutoff=0.8)
    match = _ENV_ID.match(id) if isinstance(id, str) else None
    if match is not None:
        # Same name in another version or namespace counts as close too.
        name = (match["name"] or "").lower()
        suggestions += [
            other for other in ids if other not in suggestions and spec_name(other) == name
        ]
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return EnvNotFound(f"no env {id!r} is registered{hint}", suggestions=suggestions)


def spec_name(id: str) -> str:
    """The lower-cased name part of an id."""
    match = _ENV_ID.match(id)
    return (match["name"] or "").lower() if match is not None else id.lower()


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
    )


# ---------------------------------------------------------------------------------------------
# make


def _load(entry_point: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(entry_point):
        return entry_point
    module_name, _, attr = entry_point.partition(":")
    if not module_name or not attr:
        raise InvalidRequest(f"entry point {entry_point!r} is not 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidRequest(f"cannot import entry point module {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InvalidRequest(f"entry point {entry_point!r}: no {attr!r} in {module_name}")
    if not callable(target):
        raise InvalidRequest(f"entry point {entry_point!r} is not callable")
    result: Callable[..., Any] = target
    return result


def _is_core_class(creator: Callable[..., Any]) -> bool:
    return isinstance(creator, type) and issubclass(creator, EnvCore)


def _accepted(creator: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword names ``creator`` takes, and whether it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(creator).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _split_kwargs(
    env_spec: EnvSpec, creator: Callable[..., Any], given: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entry point kwargs, make's own kwargs), refusing names the env does not take."""
    merged = {**env_spec.kwargs, **given}
    own = {k: merged.pop(k) for k in MAKE_KWARGS if k in merged}
    accepted, any_name = _accepted(creator)
    if not _is_core_class(creator) and "client" in accepted and "client" in own:
        merged["client"] = own.pop("client")  # a factory that takes the client itself
    unexpected = sorted(k for k in merged if k not in accepted) if not any_name else []
    if unexpected:
        valid = sorted(accepted | set(MAKE_KWARGS))
        hints = []
        for name in unexpected:
            close = difflib.get_close_matches(name, valid, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InvalidEnvKwargs(
            f"{env_spec.id} takes no keyword argument {', '.join(hints)}; "
            f"valid: {', '.join(valid)}",
            unexpected=unexpected,
            valid=valid,
        )
    return merged, own


def _lookup(id: str | EnvSpec) -> EnvSpec:
    if isinstance(id, EnvSpec):
        return id
    if not isinstance(id, str):
        raise InvalidRequest(f"an env id is a string, not {type(id).__name__}")
    return spec(id)


def _gym_spec(env_spec: EnvSpec, kwargs: Mapping[str, Any], max_steps: int | None) -> GymEnvSpec:
    """The Gymnasium spec set on made envs (``env.spec``): ``env.spec.make()`` works."""
    return GymEnvSpec(
        id=env_spec.id,
        entry_point=functools.partial(_make_unwrapped, env_spec.id),
        nondeterministic=env_spec.nondeterministic,
        max_episode_steps=max_steps,
        order_enforce=env_spec.order_enforce,
        disable_env_checker=True,
        kwargs={k: v for k, v in kwargs.items() if k != "client"},
    )


def _make_unwrapped(id: str, **kwargs: Any) -> gymnasium.Env[Any, Any]:
    """What Gymnasium's ``make(env.spec)`` calls: the env without our wrappers."""
    return make(id, **kwargs).unwrapped


def _build(
    env_spec: EnvSpec, kwargs: Mapping[str, Any], *, asynchronous: bool
) -> tuple[Any, dict[str, Any], int | None]:
    creator = _load(env_spec.entry_point)
    env_kwargs, own = _split_kwargs(env_spec, creator, kwargs)
    max_steps = own.pop("max_episode_steps", env_spec.max_episode_steps)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise InvalidEnvKwargs(f"max_episode_steps must be an int >= 1 or None: {max_steps!r}")
    try:
        inspect.signature(creator).bind(**env_kwargs)
    except TypeError as exc:
        raise InvalidEnvKwargs(f"{env_spec.id}: {exc}") from None
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    made = creator(**env_kwargs)
    if isinstance(made, EnvCore):
        request = sandbox_request(
            made, env_spec.image, own.get("sandbox"), {ENV_LABEL: env_spec.id}
        )
        options = {
            "client": own.get("client"),
            "sandbox": request,
            "shared_sandbox": bool(own.get("shared_sandbox", env_spec.shared_sandbox)),
            "max_episode_steps": max_steps,
            "on_sandbox_error": own.get("on_sandbox_error", "raise"),
        }
        env: Any = AsyncSandboxEnv(made, **options) if asynchronous else SandboxEnv(made, **options)
    else:
        leftover = sorted(k for k in own if k != "client")
        if leftover:
            raise InvalidEnvKwargs(
                f"{env_spec.id} is not a sandbox env: it takes no {', '.join(leftover)}",
                unexpected=leftover,
            )
        if "client" in own:
            raise InvalidEnvKwargs(f"{env_spec.id} takes no client", unexpected=["client"])
        env = made
    wanted = AsyncEnv if asynchronous else gymnasium.Env
    if not isinstance(env, wanted):
        other = "make" if asynchronous else "make_async"
        raise InvalidRequest(
            f"{env_spec.id} makes a {type(env).__name__}, not a {wanted.__name__}: use {other}()"
        )
    remade = {k: v for k, v in own.items() if k not in ("client", "max_episode_steps")}
    return env, {**env_kwargs, **remade}, max_steps


def make(id: str | EnvSpec, **kwargs: Any) -> gymnasium.Env[Any, Any]:
    """Make a registered env, wrapped in the spec's time limit and order enforcing.

    Args:
        id: A registered id (or a spec).
        **kwargs: Override the spec's kwargs and reach the env; plus make's own (see the
            module docstring).

    Returns:
        The env (a Gymnasium env; ``env.unwrapped`` is the :class:`SandboxEnv`).

    Raises:
        EnvNotFound: Unknown id (with close-match suggestions).
        InvalidEnvKwargs: A keyword the env does not take (listing those it takes).
    """
    env_spec = _lookup(id)
    env, env_kwargs, max_steps = _build(env_spec, kwargs, asynchronous=False)
    env.unwrapped.spec = _gym_spec(env_spec, env_kwargs, max_steps)
    if max_steps is not None:
        env = TimeLimit(env, max_steps)
    if env_spec.order_enforce:
        env = OrderEnforcing(env)
    result: gymnasium.Env[Any, Any] = env
    return result


def make_async(id: str | EnvSpec, **kwargs: Any) -> AsyncEnv[Any, Any]:
    """Make a registered env for ``await`` (the async twin of :func:`make`).

    Returns:
        The env (an :class:`AsyncEnv`; ``env.unwrapped`` is the :class:`AsyncSandboxEnv`).

    Raises:
        EnvNotFound: Unknown id (with close-match suggestions).
        InvalidEnvKwargs: A keyword the env does not take (listing those it takes).
    """
    env_spec = _lookup(id)
    env, env_kwargs, max_steps = _build(env_spec, kwargs, asynchronous=True)
    env.unwrapped.spec = _gym_spec(env_spec, env_kwargs, max_steps)
    if max_steps is not None:
        env = AsyncTimeLimit(env, max_steps)
    if env_spec.order_enforce:
        env = AsyncOrderEnforcing(env)
    result: AsyncEnv[Any, Any] = env
    return result
