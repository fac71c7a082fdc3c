"""Snapshot archives of a sandbox's writable layer (issue 16 item 2; runtime level only).

A snapshot is the frozen copy a fork makes (see ``_fork``: owners shifted back to 0..65535,
overlay whiteouts and opaque markers kept), packed as a tar (``zstd``-compressed when the
binary is there) and named by the SHA-256 of the archive's bytes: the same digest is the
object name in an :class:`~rock_serve.envs.hub.ArtifactStore` (S3 through boto3), whose
``fetch`` checks it. :func:`unpack_layer` checks the digest again before it unpacks anything,
unpacks into a temporary directory and renames it into place only when tar succeeded: a corrupt
or truncated archive leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import subprocess

from rock_serve.errors import ArtifactCorrupt, RuntimeUnavailable

__all__ = [
    "OVERLAY_OPAQUE",
    "SnapshotCorrupt",
    "copy_tree",
    "pack_layer",
    "sha256_of",
    "squash_layers",
    "unpack_layer",
]

_CHUNK = 1 << 20
#: The xattr overlayfs marks an opaque directory with (value ``y``).
OVERLAY_OPAQUE = "trusted.overlay.opaque"
_TAR_OPTS = ["--xattrs", "--xattrs-include=trusted.overlay.*", "--numeric-owner"]


class SnapshotCorrupt(ArtifactCorrupt):
    """A snapshot archive's bytes do not hash to its name (or do not unpack)."""


def sha256_of(path: str) -> str:
    """The SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _zstd() -> str | None:
    return shutil.which("zstd")


def pack_layer(layer: str, dest_dir: str) -> tuple[str, str, int]:
    """Pack ``layer`` into ``dest_dir/<sha256>.tar[.zst]``; returns (path, sha256, size)."""
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    zstd = _zstd()
    suffix = ".tar.zst" if zstd else ".tar"
    tmp = os.path.join(dest_dir, f".{secrets.token_hex(6)}{suffix}")
    tar = ["tar", *_TAR_OPTS, "-C", layer, "-cf", "-" if zstd else tmp, "."]
    try:
        if zstd:
            with open(tmp, "wb") as out:
                packer = subprocess.Popen(tar, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                assert packer.stdout is not None
                done = subprocess.run(
                    [zstd, "-q", "-1", "-T0", "-c"], stdin=packer.stdout, stdout=out, check=False
                )
                packer.stdout.close()
                assert packer.stderr is not None
                with packer.stderr:
                    err = packer.stderr.read()
                if packer.wait() != 0 or done.returncode != 0:
                    raise RuntimeUnavailable(f"cannot pack the layer: {err.decode().strip()}")
        else:
            ran = subprocess.run(tar, capture_output=True, check=False)
            if ran.returncode != 0:
                raise RuntimeUnavailable(f"cannot pack the layer: {ran.stderr.decode().strip()}")
        sha = sha256_of(tmp)
        path = os.path.join(dest_dir, sha + suffix)
        os.replace(tmp, path)
        return path, sha, os.path.getsize(path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unpack_layer(archive: str, sha256: str, dest: str) -> None:
    """Check ``archive`` against ``sha256``, then unpack it to ``dest`` (made here).

    Raises:
        SnapshotCorrupt: the bytes do not hash to ``sha256``, or tar/zstd refuse them
            (nothing is left at ``dest``).
    """
    actual = sha256_of(archive)
    if actual != sha256:
        raise SnapshotCorrupt(f"snapshot archive {sha256} is corrupt (its bytes hash to {actual})")
    tmp = f"{dest}.{secrets.token_hex(4)}.tmp"
    os.mkdir(tmp, 0o755)
    tar = ["tar", *_TAR_OPTS, "-C", tmp, "-xf", "-"]
    try:
        with open(archive, "rb") as probe:
            head = probe.read(4)
        with open(archive, "rb", buffering=0) as src:  # its fd is handed to the child as is
            if head == b"\x28\xb5\x2f\xfd":  # zstd frame magic
                zstd = _zstd()
                if zstd is None:
                    raise RuntimeUnavailable("this snapshot is zstd-compressed: install zstd")
                unz = subprocess.Popen([zstd, "-q", "-d", "-c"], stdin=src, stdout=subprocess.PIPE)
                assert unz.stdout is not None
                ran = subprocess.run(tar, stdin=unz.stdout, capture_output=True, check=False)
                unz.stdout.close()
                ok = unz.wait() == 0 and ran.returncode == 0
            else:
                ran = subprocess.run(tar, stdin=src, capture_output=True, check=False)
                ok = ran.returncode == 0
        if not ok:
            raise SnapshotCorrupt(
                f"snapshot archive {sha256} does not unpack: {ran.stderr.decode().strip()}"
            )
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OVERLAY_OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, mode and xattrs (overlay's opaque marker among them) of a directory; its times
    are set after its children (``squash_layers``).
    """
    os.lchown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False))


def copy_tree(src: str, dst: str, what: str = "a layer") -> None:
    """``cp -a`` a layer, or one of its non-directories (a file, symlink, whiteout).

    ``cp -a`` keeps modes, times, xattrs (overlay's opaque markers) and whiteouts (0/0
    character devices); ``--reflink=auto`` shares extents where the file system can.

    Raises:
        RuntimeUnavailable: ``cp`` failed (``what`` names the copy in the message).
    """
    done = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", src, dst], capture_output=True, check=False
    )
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise RuntimeUnavailable(f"cannot copy {what}: {err}")


def _prune_whiteouts(layer: str, below: list[str] | tuple[str, ...]) -> None:
    """Remove the whiteouts of ``layer`` that hide nothing in ``below``."""
    for parent, _dirs, files in os.walk(layer):
        for name in files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                continue
            rel = os.path.relpath(path, layer)
            if not any(os.path.lexists(os.path.join(b, rel)) for b in below):
                os.unlink(path)


def squash_layers(layers: list[str], dest: str, below: list[str] | tuple[str, ...] = ()) -> None:
    """Merge overlay layers, the lowest first, into one new layer at ``dest`` (made here).

    What a layer deletes (a whiteout: a 0/0 character device) or makes opaque
    (``trusted.overlay.opaque=y``) hides what the layers below it had. The result goes over
    ``below`` (the image's layers) as the stack did: its opaque markers stay, and so do the
    whiteouts of paths that ``below`` has; the others hide nothing any more and would show
    as dangling names in a directory only this layer has, so they go. Owners are kept as
    they are (see ``copy_layer``).
    """
    tmp = f"{dest}.{secrets.token_hex(4)}.tmp"
    try:
        copy_tree(layers[0], tmp)
        for layer in layers[1:]:
            times: list[tuple[str, os.stat_result]] = []
            for parent, dirs, files in os.walk(layer):
                into = os.path.join(tmp, os.path.relpath(parent, layer))
                for name in list(dirs):
                    src, dst = os.path.join(parent, name), os.path.join(into, name)
                    st = os.lstat(src)
                    if not stat.S_ISDIR(st.st_mode):  # a symlink to a directory
                        dirs.remove(name)
                        files.append(name)
                        continue
                    replaced = os.path.islink(dst) or not os.path.isdir(dst)
                    if _is_opaque(src) or (os.path.lexists(dst) and replaced):
                        _remove(dst)
                    if not os.path.lexists(dst):
                        os.mkdir(dst)
                    _copy_meta(src, dst, st)
                    times.append((dst, st))
                for name in files:
                    src, dst = os.path.join(parent, name), os.path.join(into, name)
                    _remove(dst)
                    copy_tree(src, dst)
            for dst, st in reversed(times):  # children first: adding them moved the times
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        _prune_whiteouts(tmp, below)
        os.rename(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
