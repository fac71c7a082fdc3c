"""The client an env uses when it is given none.

``ROCK_BASE_URL`` (or ``ROCK_URL``) and ``ROCK_TOKEN`` name the platform. An async env with
neither URL set, in a process where Ray is already initialized (a Ray job, actor or driver on
the platform's cluster), talks to the platform's actors over Ray instead, in namespace
``ROCK_NAMESPACE`` (default ``rock-serve``); if no platform runs there it falls back to HTTP.
Detection only looks at ``sys.modules``: it never imports or starts Ray.
"""

from __future__ import annotations

import logging
import os
import sys

from rock_serve.errors import RockError
from rock_serve.sdk import AsyncClient, Client

__all__ = ["default_async_client", "default_client"]

log = logging.getLogger("rock_serve.envs")

DEFAULT_NAMESPACE = "rock-serve"


def _url() -> str | None:
    return os.environ.get("ROCK_BASE_URL") or os.environ.get("ROCK_URL") or None


def ray_initialized() -> bool:
    """Whether this process already runs Ray (without importing it)."""
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)
    return bool(callable(is_initialized) and is_initialized())


def default_client() -> Client:
    """A new sync client from ``ROCK_BASE_URL``/``ROCK_URL`` and ``ROCK_TOKEN``."""
    return Client(_url())


def default_async_client() -> AsyncClient:
    """A new async client: HTTP when a URL is set, else the Ray transport when available."""
    url = _url()
    if url is None and ray_initialized():
        namespace = os.environ.get("ROCK_NAMESPACE", DEFAULT_NAMESPACE)
        try:
            return AsyncClient.from_ray(namespace)
        except RockError as exc:
            log.info("no platform over Ray in namespace %r (%s): using HTTP", namespace, exc)
    return AsyncClient(url)
