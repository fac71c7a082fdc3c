"""Unpack one OCI layer (a tar, plain or gzip) into a directory an overlay can use as a lower.

What the image says is kept: ownership (numeric, as in the tar: the runtime shifts ids),
modes with setuid/setgid/sticky bits, mtimes, symlinks (absolute ones too: they resolve
inside the sandbox's root, never here), hard links, fifos, and ``security.capability`` /
``user.*`` xattrs. OCI whiteouts become overlayfs ones: ``.wh.NAME`` -> a 0/0 character device
``NAME``, ``.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on its directory. Device nodes are
skipped (a sandbox gets its own /dev).

Refused (:class:`LayerEscape`, nothing written outside ``dest``): names with ``..`` or an
absolute path, writing through a symlink (``link -> /etc`` then ``link/passwd``), hard links
to a path outside the layer or through a symlink. The uncompressed stream's sha256 is the
layer's diff id, returned for the caller to check against the image config.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import tarfile
import threading
import zlib
from typing import IO, Any

__all__ = ["LayerEscape", "unpack_layer"]

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WH = ".wh."
_OPQ = ".wh..wh..opq"
_XATTR_KEEP = ("security.capability", "user.")


class LayerEscape(ValueError):
    """A layer's tar names a path outside its root (or writes through a symlink)."""


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Inflater:
    """A gzip blob, read, hashed and inflated by a thread of its own, as a readable stream.

    zlib and hashlib let go of the GIL while they work, so inflating overlaps with the tar
    parsing and file writes of the caller's thread (a layer unpack is otherwise one core's
    inflate plus the disk's metadata latency, one after the other). Multi-member gzip is
    read whole, as :mod:`gzip` does. The blob's digest covers every byte, trailing ones too.
    """

    _CHUNK = 1 << 20

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=32)
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layer-inflate", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while chunk := self.f.read(self._CHUNK):
                self.sha.update(chunk)
                data = chunk
                while data:
                    if d.eof:  # another gzip member follows (zero padding ends the stream)
                        if not data.strip(b"\0"):
                            break
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    out = d.decompress(data)
                    if out and not self._put(out):
                        return
                    data = d.unused_data if d.eof else b""
            if not d.eof:
                raise EOFError("compressed layer ended before the end of its stream")
            self._put(None)
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _next(self) -> bool:
        """The next inflated chunk into ``_buf`` (False at the end of the stream)."""
        if self._eof:
            return False
        item = self._q.get()
        if item is None:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            if isinstance(item, zlib.error):
                raise ValueError(f"corrupt gzip layer: {item}") from None
            raise item
        self._buf, self._pos = item, 0
        return True

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n
        while want != 0:
            if self._pos >= len(self._buf) and not self._next():
                break
            end = len(self._buf) if want < 0 else min(len(self._buf), self._pos + want)
            parts.append(self._buf[self._pos : end])
            if want > 0:
                want -= end - self._pos
            self._pos = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Stop the thread (after the stream was read, or on an error) and wait for it."""
        self._stop.set()
        self._thread.join()

    def drain(self) -> None:
        """Read (and so hash) the rest of the blob."""
        while self.read(self._CHUNK):
            pass


def _open(stack: contextlib.ExitStack, path: str) -> tuple[Any, Any]:
    """The uncompressed stream of a layer blob, and what hashes its raw bytes (``.sha``)."""
    f = stack.enter_context(open(path, "rb"))
    magic = f.read(4)
    f.seek(0)
    if magic == b"\x28\xb5\x2f\xfd":
        raise ValueError("zstd-compressed layers are not supported (gzip or plain tar only)")
    if magic[:2] == b"\x1f\x8b":
        inflater = _Inflater(f)
        stack.callback(inflater.close)
        return inflater, inflater
    raw = _Hashing(f)
    return raw, raw


def _clean(name: str) -> str:
    if name.startswith("/"):
        raise LayerEscape(f"absolute path in layer: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise LayerEscape(f"'..' in layer path: {name!r}")
    return "/".join(parts)


def _parent_ok(dest: str, rel: str) -> str:
    """``dest/rel``'s parent must be a real directory inside dest; make missing ones."""
    cur = dest
    parts = rel.split("/")
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise LayerEscape(f"layer writes through a symlink: {rel!r}")
        if not stat.S_ISDIR(st.st_mode):
            raise LayerEscape(f"layer writes under a non-directory: {rel!r}")
    return os.path.join(dest, rel)


def _clear(path: str, keep_dir: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in (member.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            if name.startswith(_XATTR_KEEP):
                out[name] = value.encode("utf-8", "surrogateescape")
    return out


def _finish(path: str, m: tarfile.TarInfo, is_link: bool = False) -> None:
    os.lchown(path, m.uid, m.gid)
    if not is_link:
        os.chmod(path, stat.S_IMODE(m.mode) & 0o7777)
        for name, value in _xattrs(m).items():
            try:
                os.setxattr(path, name, value)
            except OSError:
                pass  # a filesystem without that xattr namespace: the file stays usable
    os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def unpack_layer(blob: str, dest: str) -> dict[str, Any]:
    """Unpack the layer ``blob`` into the existing empty directory ``dest``.

    Returns ``{"diff_id": "sha256:...", "digest": "sha256:..." (of the blob as stored),
    "size": bytes written, "files": count}``.

    Raises:
        LayerEscape: the tar names something outside ``dest``.
        ValueError: the compression is not supported or the tar is corrupt.
    """
    size = files = 0
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    with contextlib.ExitStack() as stack:
        raw, blob_hash = _open(stack, blob)
        stream = _Hashing(raw)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]
        except tarfile.TarError as exc:
            raise ValueError(f"layer is not a tar: {exc}") from None
        with tar:
            for m in tar:
                rel = _clean(m.name)
                if not rel:
                    continue  # the root itself
                files += 1
                base = os.path.basename(rel)
                if base.startswith(_WH):
                    parent = os.path.dirname(_parent_ok(dest, rel))
                    if base == _OPQ:
                        os.setxattr(parent, _OPAQUE_XATTR, b"y")
                    elif not base.startswith(_WH + _WH):
                        target = os.path.join(parent, base[len(_WH) :])
                        _clear(target, keep_dir=False)
                        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
                    continue
                path = _parent_ok(dest, rel)
                if m.isdir():
                    _clear(path, keep_dir=True)
                    if not os.path.isdir(path):
                        os.mkdir(path, 0o700)
                    dirs.append((path, m))
                elif m.isreg():
                    _clear(path, keep_dir=False)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        src = tar.extractfile(m)
                        assert src is not None
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    size += m.size
                    _finish(path, m)
                elif m.issym():
                    _clear(path, keep_dir=False)
                    os.symlink(m.linkname, path)
                    _finish(path, m, is_link=True)
                elif m.islnk():
                    target = _clean(m.linkname)
                    if not target:
                        raise LayerEscape(f"hard link to the root: {rel!r}")
                    src_path = _parent_ok(dest, target)
                    try:
                        st = os.lstat(src_path)
                    except FileNotFoundError:
                        raise ValueError(f"hard link to a missing file: {rel!r}") from None
                    if stat.S_ISDIR(st.st_mode):
                        raise LayerEscape(f"hard link to a directory: {rel!r}")
                    _clear(path, keep_dir=False)
                    os.link(src_path, path, follow_symlinks=False)
                elif m.isfifo():
                    _clear(path, keep_dir=False)
                    os.mkfifo(path, 0o600)
                    _finish(path, m)
                # character and block devices: skipped (a sandbox gets its own /dev)
            stream.drain()
        blob_hash.drain()  # gzip may stop before trailing bytes
    for path, m in reversed(dirs):
        _finish(path, m)
    return {
        "diff_id": f"sha256:{stream.sha.hexdigest()}",
        "digest": f"sha256:{blob_hash.sha.hexdigest()}",
        "size": size,
        "files": files,
    }
