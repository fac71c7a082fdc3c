"""Push a stored image to a registry: its layers -> a temporary OCI layout -> skopeo.

The store keeps layers unpacked, and their compressed blobs as pulled only with
``keep_layer_blobs`` (about a third more disk). A kept blob goes into the layout as it is
(same digest as in the source registry, so the registry shares it instead of storing a
copy); any other layer dir is written back as an uncompressed tar (:func:`upper_to_layer`:
overlay whiteouts become OCI ones), whose bytes cannot equal the original tar's (member
order, headers and the compressor's output are not recorded), so its digest is new. The
config lists the layers' diff ids (the image's Env, WorkingDir, User and labels), then
``skopeo copy oci:<layout> docker://<dest>`` gzips the plain tars on the way
(``--dest-compress``; compressed blobs pass unchanged), checks the registry's answers and
skips blobs the registry has. The pushed image's manifest digest is returned (``--digestfile``).

Credentials go to a 0600 authfile in a private temp dir (deleted after the copy), never
argv, logs or records; a bearer token has no authfile form in skopeo 1.9 and goes in
``--dest-registry-token``. Plain HTTP only for loopback registries (and the configured
``insecure_registries``), as for pulls.

Before any of that, :func:`probe_registry` asks the registry's ``/v2/`` once, bounded by
``registry_answer_timeout_seconds``: skopeo 1.9 waits for a registry that accepts the
connection but never answers (or a dead route) until the whole transfer's timeout (30 min by
default), so an unreachable destination would hold the request that long.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

import httpx

from rock_serve.errors import RegistryUnavailable
from rock_serve.protocol.images import ImageRef, RegistryAuth
from rock_serve.runtime._image_commit import upper_to_layer
from rock_serve.runtime._image_pull import _authfile, classify, run_skopeo

__all__ = ["export_layout", "probe_registry", "skopeo_push"]

_LAYER = "application/vnd.oci.image.layer.v1.tar"
_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: str, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def export_layout(
    layer_dirs: list[str],
    config: dict[str, Any],
    layout: str,
    kept: list[tuple[str, dict[str, Any]] | None] | None = None,
) -> None:
    """Write an OCI layout at ``layout`` (tag ``img``): ``layer_dirs`` (lowest first) as
    tars, ``config`` (its ``config`` part: Env, WorkingDir, User, Labels) as the image config.

    ``kept``: per layer, the store's original compressed blob and its descriptor (mediaType,
    digest, size, diff_id), used as is instead of a re-tar of the dir (None where the store
    has none).
    """
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, mode=0o700)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers, diff_ids = [], []
    for n, d in enumerate(layer_dirs):
        original = kept[n] if kept else None
        if original is not None:
            path, desc = original
            target = os.path.join(blobs, desc["digest"].split(":", 1)[1])
            if not os.path.exists(target):
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copyfile(path, target)
            plain = "gzip" not in desc["mediaType"]
            media = _LAYER if plain else _LAYER_GZIP
            layers.append({"mediaType": media, "digest": desc["digest"], "size": desc["size"]})
            diff_ids.append(desc["diff_id"])
            continue
        tmp = os.path.join(layout, f"layer-{n}.tar")
        digest = upper_to_layer(d, tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, os.path.join(blobs, digest.split(":", 1)[1]))
        layers.append({"mediaType": _LAYER, "digest": digest, "size": size})
        diff_ids.append(digest)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg = _blob(layout, json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": _MANIFEST,
        "config": {"mediaType": _CONFIG, **cfg},
        "layers": layers,
    }
    man = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": _MANIFEST,
                **man,
                "annotations": {"org.opencontainers.image.ref.name": "img"},
            }
        ],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)


async def probe_registry(dest: ImageRef, *, insecure: bool, timeout: float) -> None:
    """Raise RegistryUnavailable unless ``dest``'s registry answers ``GET /v2/`` in ``timeout``.

    Any HTTP answer counts (401 asks for credentials: skopeo deals with those); HTTPS first,
    then plain HTTP where allowed (``insecure``), as skopeo tries them; ``timeout`` bounds
    each step (name lookup and connect, sending, the answer) and the tries together. The
    certificate is not checked here (skopeo checks it); no proxy from the environment
    (skopeo gets none either).
    """
    host = "registry-1.docker.io" if dest.registry == "docker.io" else dest.registry
    deadline = time.monotonic() + timeout
    last = "no answer"
    # httpx's own timeouts, not a cancellation from outside: one cancelled in the middle of a
    # TLS handshake leaves its transport open
    async with httpx.AsyncClient(verify=False, trust_env=False) as client:
        for scheme in ("https", "http") if insecure else ("https",):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await client.get(f"{scheme}://{host}/v2/", timeout=left)
                return
            except httpx.TimeoutException:
                last = f"no answer in {timeout:g}s"
                break
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"[:300]
    raise RegistryUnavailable(f"registry {host} of {dest} does not answer: {last}", retry_after=5.0)


async def skopeo_push(
    skopeo: str,
    layout: str,
    dest: ImageRef,
    *,
    auth: RegistryAuth | None = None,
    insecure: bool = False,
    timeout: float = 1800.0,
) -> str:
    """Copy the layout's ``img`` to ``dest`` (a registry reference); its manifest digest."""
    argv = [skopeo, "copy", "--quiet", "--retry-times", "0", "--dest-compress"]
    argv.append(f"--dest-tls-verify={'false' if insecure else 'true'}")
    with tempfile.TemporaryDirectory(prefix="rock-auth-") as private:
        os.chmod(private, 0o700)
        if auth is not None and _authfile(private, dest, auth) is not None:
            argv += ["--dest-authfile", os.path.join(private, "auth.json")]
        elif auth is not None and auth.token is not None:
            argv += ["--dest-registry-token", auth.token.get_secret_value()]
        else:
            empty = os.path.join(private, "none.json")  # never the node's own docker login
            with open(empty, "w") as f:
                f.write('{"auths": {}}')
            argv += ["--dest-authfile", empty]
        digestfile = os.path.join(private, "digest")
        argv += ["--digestfile", digestfile, f"oci:{layout}:img", dest.source()]
        returncode, text = await run_skopeo(argv, private, skopeo, timeout, f"pushing {dest}")
        if returncode != 0:
            raise classify(dest, text)
        with open(digestfile) as f:
            return f.read().strip()
