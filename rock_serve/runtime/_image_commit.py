"""An overlay upper dir -> an OCI layer tar (the inverse of :mod:`._image_unpack`).

Overlay whiteouts (0/0 character devices) become ``.wh.NAME`` entries, opaque directories
(``trusted.overlay.opaque=y``) get a ``.wh..wh..opq`` entry; ownership, modes, mtimes, hard
links (by inode) and symlinks are kept; sockets and device nodes are left out. Top-level
names in ``skip`` (the runtime's own mount points) are not part of the layer.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import threading

__all__ = ["upper_to_layer"]

_OPAQUE_XATTR = "trusted.overlay.opaque"


#: A sandbox's id range base (user namespaces): its files' owners are shifted back by it.
#: Per thread: a commit and a push may write layers at once.
_STATE = threading.local()


def _unshift(n: int) -> int:
    base = getattr(_STATE, "shift", 0)
    return n - base if base and base <= n < base + 65536 else n


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = _unshift(st.st_uid), _unshift(st.st_gid)
    info.mtime = int(st.st_mtime)
    info.uname = info.gname = ""
    return info


def upper_to_layer(
    upper: str, blob: str, skip: frozenset[str] = frozenset(), shift: int = 0
) -> str:
    """Write ``upper`` as an uncompressed layer tar at ``blob``; returns its sha256 digest.

    ``shift``: owners in ``shift .. shift+65535`` (a sandbox's user namespace range on the
    host) are written as ``0 .. 65535``, as the image had them.
    """
    _STATE.shift = shift
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(blob, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            if rel_dir == ".":
                dirnames[:] = sorted(d for d in dirnames if d not in skip)
                filenames = [f for f in filenames if f not in skip]
            else:
                dirnames.sort()
                st = os.lstat(dirpath)
                tar.addfile(_dir(rel_dir, st))
                try:
                    opaque = os.getxattr(dirpath, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
                except OSError:
                    opaque = False
                if opaque:
                    marker = _info(f"{rel_dir}/.wh..wh..opq", st)
                    marker.mode = 0o600
                    tar.addfile(marker)
            prefix = "" if rel_dir == "." else rel_dir + "/"
            dir_links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in sorted(filenames) + dir_links:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                rel = prefix + name
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
                    wh = _info(f"{prefix}.wh.{name}", st)
                    wh.mode = 0o600
                    tar.addfile(wh)
                elif stat.S_ISLNK(st.st_mode):
                    info = _info(rel, st)
                    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in links:
                        info = _info(rel, st)
                        info.type, info.linkname = tarfile.LNKTYPE, links[key]
                        tar.addfile(info)
                        continue
                    links[key] = rel
                    info = _info(rel, st)
                    info.size = st.st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif stat.S_ISFIFO(st.st_mode):
                    info = _info(rel, st)
                    info.type = tarfile.FIFOTYPE
                    tar.addfile(info)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _dir(rel: str, st: os.stat_result) -> tarfile.TarInfo:
    info = _info(rel, st)
    info.type = tarfile.DIRTYPE
    return info
