"""Transfers with skopeo: a registry, the node's Docker daemon or an OCI/docker archive ->
an OCI layout directory in the store's tmp dir.

Why skopeo (Debian's 1.9): it speaks the registry v2 API with token and basic auth, TLS with
the system CAs and plain HTTP where we allow it, docker-daemon and archive sources, verifies
every blob's digest while it copies, and picks the platform of a manifest list. We only
unpack the layers it leaves (see :mod:`._image_unpack`).

Credentials never appear in argv: username/password go to a 0600 authfile in a private temp
dir (``--src-authfile``) that is deleted after the copy. A bearer token has no authfile form
in skopeo 1.9, so it goes in ``--src-registry-token`` (visible in the node's process list
while the copy runs: prefer username/password, which registries also take for tokens).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import tempfile

from rock_serve.errors import (
    ImageNotFound,
    InvalidRequest,
    RegistryUnauthorized,
    RegistryUnavailable,
    RockError,
    RuntimeUnavailable,
)
from rock_serve.protocol.images import ImageRef, RegistryAuth

__all__ = ["classify", "skopeo_copy"]

log = logging.getLogger(__name__)

_NOT_FOUND = (
    "manifest unknown",
    "name unknown",
    "not found",
    "no such image",
    "no such file or directory",
    "does not exist",
    "reference does not exist",
    "no descriptor found",
    "repository name not known",
)
_UNAUTHORIZED = ("unauthorized", "authentication required", "access to the resource is denied")
_UNAVAILABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "timeout",
    "connection reset",
    "server misbehaving",
    "http status: 5",
    "503 service unavailable",
    "502 bad gateway",
    "504 gateway",
    ": eof",
    "cannot connect to the docker daemon",
    "tls handshake",
    "network is unreachable",
)


_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def classify(ref: ImageRef, stderr: str) -> RockError:
    """The typed error for a failed skopeo transfer (from its stderr)."""
    text = stderr.lower()
    found = _MSG.findall(stderr)
    short = found[-1] if found else (stderr.strip().splitlines() or ["skopeo failed"])[-1]
    short = short[:400]
    if any(k in text for k in _UNAUTHORIZED):
        return RegistryUnauthorized(f"registry refused access to {ref}: {short}")
    if any(k in text for k in _UNAVAILABLE):
        return RegistryUnavailable(f"cannot reach the source of {ref}: {short}", retry_after=5.0)
    if any(k in text for k in _NOT_FOUND):
        return ImageNotFound(f"image {ref} not found: {short}")
    if "invalid reference" in text or "invalid image name" in text:
        return InvalidRequest(f"bad image reference {ref}: {short}")
    return RegistryUnavailable(f"pulling {ref} failed: {short}", retry_after=5.0)


def _authfile(dirpath: str, ref: ImageRef, auth: RegistryAuth) -> str | None:
    if auth.username is None or auth.password is None or ref.registry is None:
        return None
    pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
    path = os.path.join(dirpath, "auth.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        registry = "docker.io" if ref.registry == "docker.io" else ref.registry
        json.dump({"auths": {registry: {"auth": base64.b64encode(pair).decode()}}}, f)
    return path


async def run_skopeo(
    argv: list[str], home: str, skopeo: str, timeout: float, what: str
) -> tuple[int, str]:
    """Run one skopeo command (HOME = ``home``, nothing of the node's environment but PATH).

    Returns:
        Its exit status and stderr text.

    Raises:
        RuntimeUnavailable: no skopeo.
        RegistryUnavailable: it took longer than ``timeout`` (killed; retry later).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", os.defpath), "HOME": home},
        )
    except FileNotFoundError:
        raise RuntimeUnavailable(f"skopeo not found ({skopeo!r}): install skopeo") from None
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RegistryUnavailable(
            f"{what} took longer than {timeout:.0f}s", retry_after=5.0
        ) from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode("utf-8", "replace")


async def skopeo_copy(
    skopeo: str,
    ref: ImageRef,
    dest_layout: str,
    *,
    auth: RegistryAuth | None = None,
    insecure: bool = False,
    timeout: float = 1800.0,
) -> None:
    """Copy ``ref`` into a new OCI layout at ``dest_layout`` (tag ``img``); typed errors."""
    argv = [skopeo, "copy", "--quiet", "--retry-times", "0"]
    with tempfile.TemporaryDirectory(prefix="rock-auth-") as private:
        os.chmod(private, 0o700)
        if ref.transport == "docker":
            argv.append(f"--src-tls-verify={'false' if insecure else 'true'}")
            if auth is not None:
                authfile = _authfile(private, ref, auth)
                if authfile is not None:
                    argv += ["--src-authfile", authfile]
                elif auth.token is not None:
                    argv += ["--src-registry-token", auth.token.get_secret_value()]
            else:
                # no credentials: never pick up the node's own docker login by accident
                empty = os.path.join(private, "none.json")
                with open(empty, "w") as f:
                    f.write('{"auths": {}}')
                argv += ["--src-authfile", empty]
        argv += [ref.source(), f"oci:{dest_layout}:img"]
        returncode, text = await run_skopeo(argv, private, skopeo, timeout, f"pulling {ref}")
    if returncode != 0:
        log.info("skopeo copy %s failed: %s", ref, text.strip()[-300:])
        raise classify(ref, text)
