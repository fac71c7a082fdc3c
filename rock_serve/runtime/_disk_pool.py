"""Per-sandbox ext4 disks: a small pool of pre-formatted sparse files, and loop mounts
without the mount binary.

A bwrap sandbox with ``disk_mb`` gets its writable layer on a sparse ext4 file of that size,
loop-mounted. ``mkfs.ext4`` (10 ms idle, 50+ ms on a loaded node) and ``mount -o loop``
(util-linux scanning for a free loop device, 40+ ms loaded) were half of create -> first
command. Here:

- :class:`DiskPool` keeps up to ``per_size`` freshly made files per disk size in a directory
  of the state dir, made by one background thread after creates ask for one: as many as
  were asked for so far, up to ``per_size`` (a runtime that makes one sandbox makes one
  spare disk, not ``per_size``). A create renames one into its sandbox dir; a file is made once and
  used by one sandbox only: a removed sandbox's disk is deleted with its dir, never
  recycled, so nothing written by one tenant reaches another. Files are made under a
  ``.tmp`` name and renamed when complete, so a crash never leaves a half-made disk in the
  pool. At most :data:`MAX_SIZES` sizes are kept (the least recently used size's files go).
- :func:`loop_mount` attaches a file to a free loop device with ``LOOP_CONFIGURE`` (Linux
  >= 5.8; autoclear, so the device frees itself at unmount) and mounts it with mount(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import struct
import subprocess
import threading
import uuid

from rock_serve.errors import RuntimeUnavailable

log = logging.getLogger(__name__)

#: Distinct disk sizes kept in the pool at once.
MAX_SIZES = 4
_MKFS_OPTS = "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# loop_info64: 5 x u64, 4 x u32 (number, encrypt_type, encrypt_key_size, flags), name[64],
# crypt_name[64], key[32], 2 x u64: 232 bytes; lo_flags at offset 52 of it.
_LOOP_CONFIG_SIZE = 8 + 232 + 64
_LO_FLAGS_OFFSET = 8 + 52


def make_disk(image: str, size_mb: int, mkfs: str) -> None:
    """Create ``image`` as a sparse file of ``size_mb`` MiB holding an empty ext4."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_mb << 20)
    finally:
        os.close(fd)
    argv = [mkfs, "-q", "-F", "-O", "^has_journal", "-m", "0", "-E", _MKFS_OPTS, image]
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(image)
        err = done.stderr.decode(errors="replace").strip()
        raise RuntimeUnavailable(f"mkfs.ext4 failed: {err}")
    # Written back now: a loop mount of a file with mkfs's pages still dirty took 5x longer
    # (8.5 vs 1.7 ms p50, the fsync 0.5 ms; done in the pool's thread for pooled disks).
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_LIBC: ctypes.CDLL | None = None


def _mount(source: str, target: str, fstype: str, flags: int) -> None:
    global _LIBC
    _LIBC = _LIBC or ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if _LIBC.mount(source.encode(), target.encode(), fstype.encode(), flags, b"") != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def loop_mount(image: str, target: str, flags: int) -> None:
    """Mount the ext4 in ``image`` at ``target`` through a free loop device (autoclear).

    Raises:
        OSError: no loop device could be configured, or the mount failed.
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):  # another process may take the free device first
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                try:
                    loop = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # its node is not there yet
                try:
                    config = bytearray(_LOOP_CONFIG_SIZE)
                    struct.pack_into("=I", config, 0, backing)
                    struct.pack_into("=I", config, _LO_FLAGS_OFFSET, _LO_FLAGS_AUTOCLEAR)
                    try:
                        fcntl.ioctl(loop, _LOOP_CONFIGURE, bytes(config))
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:
                            continue
                        raise
                    # The mount holds the device now; closing our fd keeps it attached until
                    # the unmount (autoclear).
                    _mount(dev, target, "ext4", flags)
                    return
                finally:
                    os.close(loop)
            raise OSError(errno.EBUSY, "no free loop device", image)
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


class DiskPool:
    """Fresh ext4 disk files, a few per size, made ahead in a background thread."""

    def __init__(self, directory: str, per_size: int, mkfs: str) -> None:
        self.directory = directory
        self.per_size = per_size
        self.mkfs = mkfs
        os.makedirs(directory, 0o700, exist_ok=True)
        self._ready: dict[int, list[str]] = {}
        self._sizes: list[int] = []  # most recently wanted last
        self._asked: dict[int, int] = {}  # disks asked for per size: how many to keep ready
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            size, _, rest = name.partition("-")
            if name.endswith(".img") and size.isdigit():
                self._ready.setdefault(int(size), []).append(path)
                if int(size) not in self._sizes:
                    self._sizes.append(int(size))
            else:  # a file an earlier instance was still making
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def ready(self, size_mb: int) -> int:
        with self._cond:
            return len(self._ready.get(size_mb, []))

    def want(self, size_mb: int) -> None:
        """One more disk of this size was asked for: keep that many ready (up to
        ``per_size``), made in the background.
        """
        if self.per_size <= 0:
            return
        drop: list[str] = []
        with self._cond:
            if self._closed:
                return
            if size_mb in self._sizes:
                self._sizes.remove(size_mb)
            self._sizes.append(size_mb)
            self._asked[size_mb] = min(self.per_size, self._asked.get(size_mb, 0) + 1)
            while len(self._sizes) > MAX_SIZES:
                gone = self._sizes.pop(0)
                self._asked.pop(gone, None)
                drop += self._ready.pop(gone, [])
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._fill, name="rock-disk-pool", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        for path in drop:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def take(self, size_mb: int, dest: str) -> bool:
        """Move a ready disk of ``size_mb`` MiB to ``dest``; False when none is ready."""
        with self._cond:
            files = self._ready.get(size_mb)
            path = files.pop() if files else None
        self.want(size_mb)
        if path is None:
            return False
        try:
            os.rename(path, dest)
        except OSError as exc:
            log.warning("disk pool: cannot take %s: %s", path, exc)
            return False
        return True

    def _missing(self) -> int | None:
        for size in reversed(self._sizes):
            if len(self._ready.get(size, [])) < self._asked.get(size, 0):
                return size
        return None

    def _fill(self) -> None:
        while True:
            with self._cond:
                size = self._missing()
                while not self._closed and size is None:
                    self._cond.wait()
                    size = self._missing()
                if self._closed or size is None:
                    return
            name = f"{size}-{uuid.uuid4().hex}.img"
            tmp = os.path.join(self.directory, name + ".tmp")
            try:
                make_disk(tmp, size, self.mkfs)
                os.rename(tmp, os.path.join(self.directory, name))
            except (OSError, RuntimeUnavailable) as exc:
                log.warning("disk pool: cannot make a %d MiB disk: %s", size, exc)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                with self._cond:
                    # Give up on this size until a create wants it again.
                    if size in self._sizes:
                        self._sizes.remove(size)
                        self._asked.pop(size, None)
                continue
            with self._cond:
                if self._closed or size not in self._sizes:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.directory, name))
                    continue
                self._ready.setdefault(size, []).append(os.path.join(self.directory, name))

    def close(self) -> None:
        """Stop making disks (waits for the one being made).

        The ready ones stay for the next instance.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
