"""Push a stored image to a registry: its layers -> a temporary OCI layout -> skopeo.

The store keeps layers unpacked (the blobs are not kept: they would double the disk), so a
push writes each layer dir back as an uncompressed tar (:func:`upper_to_layer`: overlay
whiteouts become OCI ones) and a config with those tars' diff ids (the image's Env,
WorkingDir, User and labels), then ``skopeo copy oci:<layout> docker://<dest>``, which
gzips the layers on the way (``--dest-compress``), checks the registry's answers and skips
blobs the registry has. The pushed image's manifest digest is returned (``--digestfile``).

Credentials go to a 0600 authfile in a private temp dir (deleted after the copy), never
argv, logs or records; a bearer token has no authfile form in skopeo 1.9 and goes in
``--dest-registry-token``. Plain HTTP only for loopback registries (and the configured
``insecure_registries``), as for pulls.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from rock_serve.protocol.images import ImageRef, RegistryAuth
from rock_serve.runtime._image_commit import upper_to_layer
from rock_serve.runtime._image_pull import _authfile, classify, run_skopeo

__all__ = ["export_layout", "skopeo_push"]

_LAYER = "application/vnd.oci.image.layer.v1.tar"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: str, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def export_layout(layer_dirs: list[str], config: dict[str, Any], layout: str) -> None:
    """Write an OCI layout at ``layout`` (tag ``img``): ``layer_dirs`` (lowest first) as
    tars, ``config`` (its ``config`` part: Env, WorkingDir, User, Labels) as the image config.
    """
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, mode=0o700)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers, diff_ids = [], []
    for n, d in enumerate(layer_dirs):
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
