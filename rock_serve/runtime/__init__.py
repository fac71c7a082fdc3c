"""Sandbox backends behind one async interface.

Backends are imported lazily by :func:`build_runtime` (and each config's ``build()``), so
importing this package never needs bwrap, Docker or their Python libraries.
"""

from __future__ import annotations

from typing import Any

from rock_serve.runtime.base import LABEL_ID, LABEL_OWNER, LABEL_RUNTIME, Runtime

__all__ = ["LABEL_ID", "LABEL_OWNER", "LABEL_RUNTIME", "Runtime", "build_runtime"]


def build_runtime(config: Any) -> Runtime:
    """Build a runtime from a config model or plain data such as ``{"type": "bwrap"}``.

    Raises:
        InvalidConfig: unknown type, bad fields, or the backend cannot work with this config
            (missing bwrap binary, missing rootfs, no writable cgroups, a docker_host
            that is not a local socket or TCP address, ...).
    """
    from rock_serve.config import (
        BwrapRuntimeConfig,
        DockerRuntimeConfig,
        FakeRuntimeConfig,
        LocalRuntimeConfig,
        parse_runtime_config,
    )

    if isinstance(
        config, FakeRuntimeConfig | LocalRuntimeConfig | BwrapRuntimeConfig | DockerRuntimeConfig
    ):
        return config.build()
    return parse_runtime_config(config).build()
