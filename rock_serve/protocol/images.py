"""Image references, registry credentials and the image routes' bodies.

A reference is what ``docker pull`` takes (``python:3.11-slim``, ``registry:5000/org/task:v2``,
``name@sha256:<hex>``), or one of skopeo's local sources spelled as skopeo spells them:
``docker-daemon:REF`` (the node's Docker), ``oci:/abs/layout[:tag]``, ``oci-archive:/abs/file
[:tag]``, ``docker-archive:/abs/file``. An absolute path alone names a host root directory
(the runtime decides whether it allows that).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_core import PydanticCustomError

from rock_serve.errors import ErrorCode, InvalidImageReference
from rock_serve.protocol._base import WireModel

__all__ = [
    "CommitRequest",
    "CommitResult",
    "ImageInfo",
    "ImageList",
    "ImagePullEvent",
    "ImagePullRequest",
    "ImagePushRequest",
    "ImagePushResult",
    "ImageRef",
    "ImageRefText",
    "RegistryAuth",
    "check_image_ref",
    "validate_image_ref",
    "parse_image_ref",
]

# Every repeat starts with a separator that the piece before it cannot end with, so a failing
# match backtracks linearly: with the distribution spec's ``[-]*`` (may be empty) a name like
# ``a-b-c-...-z*`` took exponential time in Python's re, in the Admin's event loop (a pushed
# reference held the request and every other one behind it). The same names match.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9]+(?:-+[a-zA-Z0-9]+)*"
_LOWER_LABEL = r"[a-z0-9]+(?:-+[a-z0-9]+)*"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}"
_REF = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
_LOCAL = ("docker-daemon", "oci", "oci-archive", "docker-archive")
Transport = Literal["docker", "docker-daemon", "oci", "oci-archive", "docker-archive", "host"]


@dataclass(frozen=True)
class ImageRef:
    """A parsed, normalised image reference."""

    transport: Transport
    #: docker/docker-daemon: ``domain/path[:tag][@digest]``; oci*: ``/path[:tag]``; host: path.
    name: str
    #: The registry host[:port] of a docker reference, else None.
    registry: str | None = None

    def __str__(self) -> str:
        return self.name if self.transport == "docker" else f"{self.transport}:{self.name}"

    def source(self) -> str:
        """The image as skopeo names it (``docker://...``, ``oci:...``)."""
        if self.transport == "docker":
            return f"docker://{self.name}"
        return f"{self.transport}:{self.name}"

    @property
    def loopback(self) -> bool:
        """The registry is on this host (plain HTTP is allowed there, as Docker does)."""
        if self.registry is None:
            return False
        host = self.registry.rsplit(":", 1)[0] if "]" not in self.registry else self.registry
        host = host.strip("[]").split("]")[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _docker_name(text: str) -> tuple[str, str]:
    m = _REF.match(text)
    if m is None or len(text) > 512:
        raise InvalidImageReference(f"malformed image reference {text!r}")
    domain, path = m.group("domain"), m.group("path")
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        if domain != domain.lower():
            raise InvalidImageReference(
                f"malformed image reference {text!r} (repository must be lowercase)"
            )
        path, domain = f"{domain}/{path}", None
    if domain is None or domain in ("docker.io", "index.docker.io"):
        domain = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    name = f"{domain}/{path}"
    tag, digest = m.group("tag"), m.group("digest")
    if tag is None and digest is None:
        tag = "latest"
    if tag is not None:
        name += f":{tag}"
    if digest is not None:
        name += f"@{digest}"
    return name, domain


def parse_image_ref(text: str) -> ImageRef:
    """Parse and normalise a reference (``python`` -> ``docker.io/library/python:latest``).

    Raises:
        InvalidImageReference: the reference is malformed (a ``ValueError``).
    """
    if not text or text != text.strip() or any(c in text for c in "\0\n\t "):
        raise InvalidImageReference(f"malformed image reference {text!r}")
    if text.startswith("/"):
        return ImageRef("host", text)
    transport, sep, rest = text.partition(":")
    if sep and transport in _LOCAL:
        if transport == "docker-daemon":
            name, domain = _docker_name(rest)
            return ImageRef("docker-daemon", name, domain)
        if not rest.startswith("/") or "/../" in rest + "/" or any(c in rest for c in ",\\"):
            raise InvalidImageReference(f"{transport} image path must be absolute: {text!r}")
        return ImageRef(transport, rest)  # type: ignore[arg-type]
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    name, domain = _docker_name(text)
    return ImageRef("docker", name, domain)


#: The domains parse_image_ref accepts, written so a schema can state them: a lone label is a
#: repository component (lowercase); a registry has a dot, a port or brackets.
_SCHEMA_DOMAIN = (
    rf"(?:{_LOWER_LABEL}|{_LABEL}(?:\.{_LABEL})+(?::[0-9]+)?|{_LABEL}:[0-9]+"
    r"|\[[0-9a-fA-F]*:[0-9a-fA-F:]*\](?::[0-9]+)?)"
)
_SCHEMA_DOCKER = (
    rf"(?:docker-daemon:|docker://)?(?:{_SCHEMA_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"  # ASCII \w: Rust's and Python's \w differ
    rf"(?:@{_DIGEST})?"
)
#: Control characters and every Unicode space, spelled out: ``\s`` differs between the
#: validator (Rust), Python and the schema fuzzer's generator (U+0085, U+001C..U+001F...).
_SPACE = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_PATH_CHAR = rf"[^{_SPACE},\\/]"
#: An absolute path with no ``..`` segment (no look-ahead: schema generators lack it).
_SCHEMA_PATH = (
    rf"(?:/(?:[^{_SPACE},\\/.]{_PATH_CHAR}*|\.|\.[^{_SPACE},\\/.]{_PATH_CHAR}*"
    rf"|\.\.{_PATH_CHAR}+)?)+"
)
#: The whole grammar of :func:`parse_image_ref` as a JSON-schema pattern, so that what the
#: schema accepts is what the server accepts (malformed references are schema-invalid).
IMAGE_REF_PATTERN = (
    rf"^(?:/[^{_SPACE}]*|(?:oci|oci-archive|docker-archive):{_SCHEMA_PATH}|{_SCHEMA_DOCKER})$"
)
_IMAGE_REF_RE = re.compile(IMAGE_REF_PATTERN)


def validate_image_ref(text: str) -> ImageRef:
    """Parse a reference as the wire does: the schema's pattern (what clients were told) and
    :func:`parse_image_ref` (what the store understands) must both accept it.

    Raises:
        InvalidImageReference: either refuses it (422 over HTTP).
    """
    if not 1 <= len(text) <= 512 or _IMAGE_REF_RE.match(text) is None:
        raise InvalidImageReference(f"malformed image reference {text[:200]!r}")
    return parse_image_ref(text)


def check_image_ref(value: object) -> object:
    """A pydantic before-validator: a string :func:`validate_image_ref` refuses is a validation
    error of type ``invalid_image_reference`` (the Admin answers 422 with that code, see
    :func:`rock_serve.errors.from_validation`); other types pass on to the ``str`` check. It runs
    before the pattern, so a malformed reference never ends as a bare ``string_pattern_mismatch``.
    """
    if isinstance(value, str):
        try:
            validate_image_ref(value)
        except InvalidImageReference as exc:
            raise PydanticCustomError(
                ErrorCode.INVALID_IMAGE_REFERENCE.value, "{message}", {"message": exc.message}
            ) from None
    return value


#: An image reference as the schema states it; a malformed one is ``invalid_image_reference``.
ImageRefText = Annotated[
    str,
    Field(min_length=1, max_length=512, pattern=IMAGE_REF_PATTERN),
    BeforeValidator(check_image_ref),  # after Field: it then runs first and keeps the pattern
]


class RegistryAuth(WireModel):
    """Credentials for one pull (never logged, stored or returned)."""

    username: str | None = Field(default=None, max_length=256, description="Registry user.")
    password: SecretStr | None = Field(default=None, description="Password for ``username``.")
    token: SecretStr | None = Field(
        default=None, description="A registry bearer token (instead of username/password)."
    )


class ImagePullRequest(WireModel):
    """``POST /v1/images/pull``: prepull images on some or all nodes."""

    images: list[ImageRefText] = Field(
        min_length=1, max_length=256, description="References to pull (a malformed one: 422)."
    )
    nodes: list[str] | None = Field(
        default=None, description="Worker names to pull on; None = every Worker."
    )
    auth: RegistryAuth | None = Field(default=None, description="Registry credentials.")


class ImagePullEvent(WireModel):
    """One NDJSON line of a pull's progress."""

    node: str = Field(default="", description="Worker that reports it.")
    image: str = Field(description="The reference as given.")
    phase: Literal["queued", "pulling", "unpacking", "done", "error"] = Field(
        description="Where the pull is."
    )
    layers_done: int = Field(default=0, description="Layers unpacked so far.")
    layers_total: int = Field(default=0, description="Layers in the image (0 = not known yet).")
    digest: str | None = Field(default=None, description="Image id (config digest) when done.")
    size_bytes: int | None = Field(default=None, description="Unpacked size when done.")
    error: dict[str, str] | None = Field(default=None, description="{code, message} on error.")


class ImageInfo(WireModel):
    """One image held by a node's store."""

    node: str = Field(default="", description="Worker holding it.")
    refs: list[str] = Field(description="References that name it.")
    id: str = Field(description="Image id: the digest of its config.")
    manifest_digest: str | None = Field(default=None, description="Manifest digest, if known.")
    layers: list[str] = Field(description="Layer diff ids, lowest first.")
    size_bytes: int = Field(
        description="Bytes of its layers on disk: unpacked, plus their compressed blobs where "
        "the store keeps them (shared layers counted)."
    )
    last_used: float = Field(description="Last create or pull that used it (epoch seconds).")
    in_use: int = Field(default=0, description="Sandboxes using it now.")


class ImageList(WireModel):
    """``GET /v1/images``."""

    images: list[ImageInfo] = Field(description="Images per node.")
    disk_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="Bytes of layers on disk on each node (unpacked, plus kept blobs).",
    )
    pulls: list[ImagePullEvent] = Field(
        default_factory=list,
        description="Pulls in flight on each node (a create's too) with their progress.",
    )


class CommitRequest(WireModel):
    """``POST /v1/sandboxes/{id}/commit``: save a sandbox's files as a new image."""

    image: ImageRefText = Field(description="Reference (repo:tag).")


class ImagePushRequest(WireModel):
    """``POST /v1/images/push``: push an image of a node's store to a registry."""

    image: ImageRefText = Field(description="The stored image (reference or id) to push.")
    destination: ImageRefText = Field(
        description="Registry reference to push to (`host[:port]/repo:tag`); plain HTTP only "
        "for registries on loopback (and the nodes' insecure_registries)."
    )
    node: str | None = Field(
        default=None, max_length=256, description="Worker whose store has it; None = the first."
    )
    auth: RegistryAuth | None = Field(
        default=None, description="Credentials for the destination (never logged or stored)."
    )


class ImagePushResult(WireModel):
    """The pushed image."""

    destination: str = Field(description="The normalised destination reference.")
    digest: str = Field(description="Manifest digest in the registry.")
    node: str = Field(default="", description="Worker whose store pushed it.")


class CommitResult(WireModel):
    """The committed image."""

    image: str = Field(description="Its reference, usable at once for new sandboxes there.")
    node: str = Field(default="", description="Worker whose store (or daemon) holds it.")
