"""Content-addressed artifact stores for task bundles: the interface and the local one.

An artifact is named by the SHA-256 of its bytes, so the same bundle is stored once however many
env versions use it, and a download is checked against its name (:class:`ArtifactCorrupt` when
the bytes do not match). Stores are synchronous and thread-safe; async callers go through
``run_sync`` (see :class:`~rock_serve.envs.hub.AsyncEnvHub`).

Bundles are tar archives (gzip-compressed when packed here). :func:`pack_bundle` packs a
directory deterministically (sorted names, zeroed owners and times), so the same tree always
gives the same digest; :func:`unpack_bundle` refuses members that would land outside the target
(absolute paths, ``..``, links pointing out, device files).
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from rock_serve.errors import InternalError, InvalidRequest, NotFound

__all__ = [
    "ArtifactCorrupt",
    "ArtifactStore",
    "LocalArtifactStore",
    "check_digest",
    "pack_bundle",
    "sha256_file",
    "unpack_bundle",
]

_CHUNK = 1 << 20


class ArtifactCorrupt(InternalError):
    """A downloaded artifact's bytes do not hash to its name (the store holds bad data)."""


def check_digest(sha256: str) -> str:
    """Return ``sha256`` if it is a lowercase hex SHA-256 digest.

    Raises:
        InvalidRequest: it is not one.
    """
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidRequest(f"{sha256!r} is not a lowercase hex SHA-256 digest")
    return sha256


def sha256_file(path: Path) -> tuple[str, int]:
    """The SHA-256 hex digest and the size of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream while hashing it; returns the digest and size of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def verify_file(path: Path, sha256: str, where: str) -> None:
    """Raise :class:`ArtifactCorrupt` unless the file at ``path`` hashes to ``sha256``."""
    actual, size = sha256_file(path)
    if actual != sha256:
        raise ArtifactCorrupt(
            f"artifact {sha256} from {where} is corrupt: its {size} bytes hash to {actual}",
            expected=sha256,
            actual=actual,
        )


class ArtifactStore(abc.ABC):
    """Where bundles live, by SHA-256 digest. Implementations are synchronous and thread-safe."""

    #: Short name of the backend (``local``, ``s3``).
    kind: str = "abstract"

    @abc.abstractmethod
    def put_file(self, path: Path, sha256: str) -> None:
        """Store the file at ``path`` under ``sha256`` (its digest; the caller computed it).

        Storing a digest that is already present does nothing.
        """

    @abc.abstractmethod
    def fetch(self, sha256: str, dest: Path) -> None:
        """Download the artifact to ``dest`` (created or replaced) and check its digest.

        Raises:
            NotFound: no artifact with that digest.
            ArtifactCorrupt: the stored bytes do not hash to ``sha256`` (``dest`` is not left).
        """

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether an artifact with that digest is stored."""

    @abc.abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the artifact; a missing one counts as removed."""

    @abc.abstractmethod
    def url(self, sha256: str, expires: int | None = None) -> str:
        """A URL from which the artifact can be downloaded without credentials.

        A presigned GET URL for S3 (valid ``expires`` seconds), a ``file://`` URL locally.
        """

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its digest."""
        sha256 = hashlib.sha256(data).hexdigest()
        with tempfile.TemporaryDirectory(prefix="rock-artifact-") as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            self.put_file(path, sha256)
        return sha256

    def read_bytes(self, sha256: str) -> bytes:
        """The artifact's bytes, checked against the digest."""
        with tempfile.TemporaryDirectory(prefix="rock-artifact-") as tmp:
            path = Path(tmp) / "blob"
            self.fetch(sha256, path)
            return path.read_bytes()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, if any."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under ``root/sha256/<first two hex digits>/<digest>``."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        """Use (and create) the directory ``root``."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def put_file(self, path: Path, sha256: str) -> None:
        """Copy the file in (atomically: a temp file in the same directory, then a rename)."""
        target = self._path(sha256)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def fetch(self, sha256: str, dest: Path) -> None:
        """Copy the artifact to ``dest``, hashing as it goes."""
        source = self._path(sha256)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch-")
        try:
            try:
                src = open(source, "rb")  # closed by the with below
            except FileNotFoundError:
                raise NotFound(f"no artifact {sha256} in {self.root}") from None
            with src, os.fdopen(fd, "wb") as out:
                actual, size = copy_hashing(src, out)
            if actual != sha256:
                raise ArtifactCorrupt(
                    f"artifact {sha256} in {self.root} is corrupt: its {size} bytes hash to "
                    f"{actual}",
                    expected=sha256,
                    actual=actual,
                )
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, sha256: str) -> bool:
        """Whether the file is there."""
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove the file."""
        self._path(sha256).unlink(missing_ok=True)

    def url(self, sha256: str, expires: int | None = None) -> str:
        """A ``file://`` URL of the artifact (``expires`` does not apply).

        Raises:
            NotFound: no artifact with that digest.
        """
        path = self._path(sha256)
        if not path.is_file():
            raise NotFound(f"no artifact {sha256} in {self.root}")
        return path.resolve().as_uri()


# --------------------------------------------------------------------------- bundles


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if info.isdir():
        info.mode = 0o755
    elif info.isfile():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def pack_bundle(directory: Path, dest: Path) -> tuple[str, int]:
    """Pack a directory into a deterministic ``.tar.gz`` at ``dest``.

    Members are the directory's contents (not the directory itself), sorted, with owners, times
    and permission bits normalised, so equal trees give equal bytes and the same digest.

    Returns:
        The SHA-256 digest and size of the archive.

    Raises:
        InvalidRequest: ``directory`` is not a directory, or holds something other than
            regular files, directories and symlinks.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidRequest(f"bundle {directory} is not a directory")
    entries: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            entries.append(Path(root) / name)
    entries.sort(key=lambda p: p.relative_to(directory).as_posix())
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in entries:
                    arcname = path.relative_to(directory).as_posix()
                    if not (path.is_symlink() or path.is_dir() or path.is_file()):
                        raise InvalidRequest(f"bundle member {arcname} is not a file or directory")
                    info = _normalized(tar.gettarinfo(str(path), arcname))
                    if info.isfile():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    return sha256_file(dest)


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    name = member.name
    resolved = (target / name).resolve()
    if Path(name).is_absolute() or not resolved.is_relative_to(target):
        raise InvalidRequest(f"bundle member {name!r} lands outside the bundle")
    if member.issym() or member.islnk():
        base = (target / name).parent if member.issym() else target
        link = (base / member.linkname).resolve()
        if Path(member.linkname).is_absolute() or not link.is_relative_to(target):
            raise InvalidRequest(f"bundle link {name!r} points outside the bundle")
    elif not (member.isfile() or member.isdir()):
        raise InvalidRequest(f"bundle member {name!r} is not a file, directory or link")


def unpack_bundle(archive: Path, target: Path) -> None:
    """Unpack a tar archive (plain or compressed) into the new directory ``target``.

    Raises:
        InvalidRequest: not a tar archive, or a member would land outside ``target``.
    """
    target = Path(target)
    target.mkdir(parents=True)
    root = target.resolve()
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, root)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706 (3.10 < 3.10.12)
                tar.extractall(root, members=members)
    except tarfile.TarError as exc:
        raise InvalidRequest(f"bundle is not a readable tar archive: {exc}") from None
