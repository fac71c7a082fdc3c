"""Images for the docker runtime: pulling with progress, looking for python3, references.

Plain blocking functions over the SDK's low-level client; the runtime calls them through
:func:`~rock_serve.runtime._sync.run_sync`.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from typing import Any

import docker
import docker.errors

__all__ = ["has_python", "pull", "python_candidates", "valid_reference"]

log = logging.getLogger("rock_serve.runtime.docker")

_MIN_PYTHON = (3, 8)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PY_VERSION = re.compile(r"python(\d+)\.(\d+)$")
#: Docker's reference grammar: [registry[:port]/]path components, lower case; and a tag.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def valid_reference(repo: str, tag: str) -> bool:
    """True when ``repo:tag`` is a valid image reference to create."""
    return bool(_REPO.match(repo) and _TAG.match(tag))


def pull(api: Any, ref: str, auth_config: dict[str, str] | None = None) -> None:
    """Pull ``ref``, logging progress every 2 s.

    Raises:
        docker.errors.APIError: the daemon or the registry refused (not found, no access,
            registry unreachable), also when reported in the progress stream.
    """
    repo, tag = docker.utils.parse_repository_tag(ref)
    started = last = time.monotonic()
    layers: dict[str, tuple[int, int]] = {}
    events = api.pull(repo, tag=tag or "latest", stream=True, decode=True, auth_config=auth_config)
    for event in events:
        if "error" in event:
            raise docker.errors.APIError(str(event["error"]))
        detail = event.get("progressDetail") or {}
        if event.get("id") and detail.get("total"):
            layers[event["id"]] = (int(detail.get("current", 0)), int(detail["total"]))
        now = time.monotonic()
        if now - last >= 2.0:
            last = now
            done = sum(c for c, _ in layers.values()) >> 20
            total = sum(t for _, t in layers.values()) >> 20
            log.info(
                "docker runtime: pulling %s: %s, %d/%d MiB of %d layers",
                ref,
                event.get("status", ""),
                done,
                total,
                len(layers),
            )
    log.info("docker runtime: pulled %s in %.1fs", ref, time.monotonic() - started)


def python_candidates(python: str, image: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Where ``python`` (a name or a path) may be in a container of ``image`` with ``env``."""
    if "/" in python:
        return [python]
    image_env = dict(
        e.split("=", 1) for e in (image.get("Config") or {}).get("Env") or [] if "=" in e
    )
    path = env.get("PATH") or image_env.get("PATH") or _DEFAULT_PATH
    return [f"{d}/{python}" for d in path.split(":") if d.startswith("/")]


def has_python(api: Any, container_id: str, candidates: list[str]) -> bool:
    """Whether a (created) container has one of ``candidates``, >= 3.8, by reading its files.

    Symlinks are followed; a version in a name (``python3.6``) is checked.
    """
    for candidate in candidates:
        target = candidate
        for _ in range(8):  # follow symlinks
            try:
                stream, stat = api.get_archive(container_id, target)
            except docker.errors.NotFound:
                break
            for _chunk in stream:
                pass
            link = stat.get("linkTarget") or ""
            found = _PY_VERSION.search(link or target)
            if found and (int(found[1]), int(found[2])) < _MIN_PYTHON:
                break
            if not link:
                return True
            target = posixpath.normpath(posixpath.join(posixpath.dirname(target), link))
    return False
