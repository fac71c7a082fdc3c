"""Optional dependencies: one place that turns a missing extra into a typed error naming it.

``pip install rock-serve`` is the SDK alone (httpx + pydantic). The CLI, the rocklet's HTTP mode,
the server, the docker runtime, envs and Redis state are extras; code that needs one imports it
through :func:`require`, so a user without it reads which extra to install instead of a bare
``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rock_serve.errors import InvalidConfig

__all__ = ["MissingExtra", "require"]


class MissingExtra(InvalidConfig, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``rock-serve[extra]``.

    Raises:
        MissingExtra: the module (or one it needs) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        need = what or f"module {module!r}"
        raise MissingExtra(
            f"{need} needs the {extra!r} extra ({exc.name} is not installed): "
            f"pip install 'rock-serve[{extra}]'"
        ) from None
