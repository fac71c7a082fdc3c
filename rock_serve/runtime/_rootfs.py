"""The default root of bwrap sandboxes: system directories of the host, nothing else.

Until sandboxes default to an image, a sandbox without one gets a root synthesized from an
allow-list: the host's ``/usr``, ``/bin``, ``/sbin`` and ``/lib*`` (read-only lower layers
under the sandbox's own upper layer), a filtered copy of ``/etc`` (only world-readable entries
named in the allow-list: no shadow files, ssh host keys, machine-id, sudoers, private TLS keys),
and empty ``/root``, ``/home``, ``/var``, ``/run``, ``/tmp``. Every other entry of the host's
``/`` (``/opt``, ``/work``, ``/srv``, ``/mnt``, a checkout of this project...) is absent.

It is made as one overlay layer (the *skeleton*) stacked on top of the host's ``/``, the way
image layers stack: a whiteout for each host top-level entry that is not allowed, an opaque
directory for each one the skeleton replaces. The host's top level is listed again at every
create (a few microseconds), and a new skeleton is built when it changed, so a directory that
appears on the host later is hidden too. Skeletons live in ``skeleton_dir`` (on /dev/shm by
default: overlayfs wants it off the host root's file system), named by a hash of what they
are made of, so every instance and process with the same inputs shares one, and none leaks
a mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import threading

from rock_serve.config import DEFAULT_ETC_ALLOW, DEFAULT_ROOT_ALLOW
from rock_serve.runtime._snapshot import OVERLAY_OPAQUE

__all__ = ["Skeleton"]

#: Directories the skeleton provides itself (empty, or /etc filtered), with their modes.
_OWN_DIRS: dict[str, int] = {
    "etc": 0o755,
    "root": 0o700,
    "home": 0o755,
    "tmp": 0o1777,
    "run": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
    "var/lib": 0o755,
    "var/log": 0o755,
    "var/cache": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
}
#: Bumped when the skeleton's layout changes (part of its key).
_FORMAT = 1


def _whiteout(path: str) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


class Skeleton:
    """Builds and caches the skeleton layer for one host root listing.

    Args:
        base: directory holding the skeleton versions (created 0700).
        host_root: the host tree whose system directories are shown (``/``).
        allow: top-level entries of ``host_root`` shown as they are.
        etc_allow: entries of ``host_root/etc`` copied into the skeleton.
        hide: absolute paths (already glob-expanded, real paths) under the allowed entries
            to hide as well.
    """

    def __init__(
        self,
        base: str,
        host_root: str = "/",
        allow: tuple[str, ...] | list[str] = DEFAULT_ROOT_ALLOW,
        etc_allow: tuple[str, ...] | list[str] = DEFAULT_ETC_ALLOW,
        hide: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.base = base
        self.host_root = host_root
        self.allow = frozenset(allow)
        self.etc_allow = tuple(etc_allow)
        self.hide = tuple(hide)
        self._lock = threading.Lock()
        self._listing: frozenset[str] | None = None
        self._path = ""
        self._version = 0

    def layers(self) -> list[str]:
        """The lower layers of a default root, top first: the skeleton, then the host root."""
        listing = frozenset(os.listdir(self.host_root))
        with self._lock:
            if listing != self._listing or not os.path.isdir(self._path):
                self._path = self._build(listing)
                self._listing = listing
            return [self._path, self.host_root]

    def _key(self, listing: frozenset[str]) -> str:
        """What a skeleton is made of: equal keys, equal skeletons (shared by instances)."""
        etc = os.path.join(self.host_root, "etc")
        stamps = []
        for name in self.etc_allow:
            with contextlib.suppress(OSError):
                stamps.append((name, os.lstat(os.path.join(etc, name)).st_mtime_ns))
        hides = [h for h in self.hide if self._shown(h)]
        data = [sorted(listing), sorted(self.allow), stamps, sorted(hides), _FORMAT]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:24]

    def _shown(self, hidden: str) -> bool:
        rel = posixpath.relpath(hidden, self.host_root)
        return not rel.startswith("..") and "/" in rel and rel.split("/", 1)[0] in self.allow

    def _build(self, listing: frozenset[str]) -> str:
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        os.chmod(self.base, 0o700)
        path = os.path.join(self.base, self._key(listing))
        if os.path.isdir(path):
            return path  # built by another instance (or process) from the same inputs
        self._version += 1
        tmp = f"{path}.{os.getpid()}-{id(self):x}-{self._version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o755)
        for rel, mode in _OWN_DIRS.items():
            target = os.path.join(tmp, rel)
            os.mkdir(target, mode)
            os.chmod(target, mode)
            if "/" not in rel or os.path.lexists(os.path.join(self.host_root, rel)):
                os.setxattr(target, OVERLAY_OPAQUE, b"y")
        for name in sorted(listing):
            if name in self.allow or name in _OWN_DIRS:
                continue
            _whiteout(os.path.join(tmp, name))
        self._copy_etc(os.path.join(tmp, "etc"))
        for hidden in self.hide:
            self._hide(tmp, hidden)
        try:
            os.rename(tmp, path)
        except OSError:  # another instance won the race: same content
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _copy_etc(self, dest: str) -> None:
        src_root = os.path.join(self.host_root, "etc")

        def readable(p: str) -> bool:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                return True
            need = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
            return st.st_mode & need == need and (
                stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
            )

        def copy(src: str, dst: str) -> None:
            if not readable(src):
                return
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(dst)
                for child in sorted(os.listdir(src)):
                    copy(os.path.join(src, child), os.path.join(dst, child))
                os.chmod(dst, stat.S_IMODE(st.st_mode))
            else:
                shutil.copyfile(src, dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.lchown(dst, st.st_uid, st.st_gid)

        for name in self.etc_allow:
            src = os.path.join(src_root, name)
            if os.path.lexists(src) and not any(
                src == h or src.startswith(h + "/") for h in self.hide
            ):
                copy(src, os.path.join(dest, name))

    def _hide(self, tmp: str, hidden: str) -> None:
        rel = posixpath.relpath(hidden, self.host_root)
        if not self._shown(hidden):
            return  # not visible anyway (outside the allowed dirs or a top-level entry)
        parent = os.path.join(tmp, posixpath.dirname(rel))
        # Recreate the parents with the host's modes and owners (a non-opaque directory in an
        # upper layer merges with the lower one).
        parts = posixpath.dirname(rel).split("/")
        for i in range(1, len(parts) + 1):
            d = os.path.join(tmp, *parts[:i])
            if not os.path.isdir(d):
                st = os.stat(os.path.join(self.host_root, *parts[:i]))
                os.mkdir(d)
                os.chmod(d, stat.S_IMODE(st.st_mode))
                os.chown(d, st.st_uid, st.st_gid)
        target = os.path.join(parent, posixpath.basename(rel))
        if not os.path.lexists(target):
            _whiteout(target)
