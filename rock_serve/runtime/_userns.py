"""User namespaces with a uid/gid range per sandbox, and idmapped mounts of its lower layers.

A sandbox with slot ``n`` runs in a user namespace that maps ids ``0..65535`` to host ids
``uid_base + n * 65536 + (0..65535)``: its root is an unprivileged host uid, different in
every sandbox. The namespace is made once per slot (a child of ``unshare --user`` run as the
slot's base uid, so that uid owns it; host root writes its maps) and held by an open fd of
the runtime's process (no mount that could outlive it); bwrap joins it with
``--userns FD`` as that uid (``setpriv``), so no process of the sandbox is ever host root.

The sandbox's lower layers are idmapped mounts (``open_tree`` + ``mount_setattr
(MOUNT_ATTR_IDMAP)`` + ``move_mount``, kernel >= 5.12; overlayfs over idmapped layers >= 5.19)
with the same mapping, so files keep the owners they have in the rootfs (root's files are
root's inside), while what the sandbox writes lands in its upper layer with the shifted ids.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
import time

from rock_serve.errors import InvalidConfig, RuntimeUnavailable

__all__ = ["IDS_PER_SANDBOX", "SlotPool", "UsernsCache", "idmapped_mount"]

#: Host ids each sandbox's user namespace maps (0..65535 inside).
IDS_PER_SANDBOX = 65536

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_O_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MOUNT_ATTR_RDONLY = 0x00000001


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _LIBC.syscall.restype = ctypes.c_long
    return _LIBC


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def idmapped_mount(source: str, target: str, userns_path: str) -> None:
    """Mount a read-only clone of the mount at ``source`` (not its submounts) at ``target``,
    its ids mapped through the user namespace file ``userns_path``.

    Read-only because the clone is of a whole file system (an image layer's, or the host's
    root for the default root): a host process that deletes a tree with the clone still
    mounted in it (``rm -rf`` of a state dir after a crash) must get EROFS, not delete the
    layer or the host's files through it.

    Raises:
        OSError: the kernel or the file system refuses (no idmapped mount support).
    """
    libc = _libc()
    ns = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, source.encode(), _OPEN_TREE_CLONE | _O_CLOEXEC)
        if fd < 0:
            raise _fail(f"open_tree {source}")
        try:
            attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, 0, 0, ns)
            size = ctypes.sizeof(attr)
            if libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), size):
                raise _fail(f"mount_setattr(MOUNT_ATTR_IDMAP) {source}")
            flags = _MOVE_MOUNT_F_EMPTY_PATH
            if libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, target.encode(), flags):
                raise _fail(f"move_mount {target}")
        finally:
            os.close(fd)
    finally:
        os.close(ns)


class UsernsCache:
    """One user namespace per slot, made on first use and held by an open fd.

    Each is made by a child of ``unshare --user`` run as the slot's base uid (so that uid owns
    it); host root writes its maps, opens ``/proc/PID/ns/user`` and the child exits. Nothing
    is mounted: the fd keeps the namespace (and the sandboxes that joined it keep it too), and
    :meth:`path` names it as ``/proc/<our pid>/fd/<fd>`` for the sandbox's start-up wrapper.
    """

    def __init__(self, setpriv: str, unshare: str) -> None:
        self.setpriv = setpriv
        self.unshare = unshare
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def path(self, base: int) -> str:
        """A path that opens the user namespace of the slot starting at host id ``base``.

        Raises:
            RuntimeUnavailable: the namespace could not be made.
        """
        with self._lock:
            fd = self._fds.get(base)
            if fd is None:
                fd = self._fds[base] = self._make(base)
        return f"/proc/{os.getpid()}/fd/{fd}"

    def close(self) -> None:
        """Let go of every namespace (running sandboxes keep theirs)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _make(self, base: int) -> int:
        own = os.readlink("/proc/self/ns/user")
        ids = [f"--reuid={base}", f"--regid={base}", "--clear-groups"]
        child = subprocess.Popen(
            [self.setpriv, *ids, "--", self.unshare, "--user", "--", "sleep", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if os.readlink(f"/proc/{child.pid}/ns/user") != own:
                        break
                except OSError:
                    pass
                if child.poll() is not None or time.monotonic() > deadline:
                    err = child.stderr.read().decode(errors="replace") if child.stderr else ""
                    raise RuntimeUnavailable(f"cannot make a user namespace: {err.strip()}")
                time.sleep(0.0002)
            for kind in ("uid_map", "gid_map"):
                with open(f"/proc/{child.pid}/{kind}", "w") as f:
                    f.write(f"0 {base} {IDS_PER_SANDBOX}\n")
            return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot make a user namespace: {exc}") from None
        finally:
            child.kill()
            child.wait()
            if child.stderr is not None:
                child.stderr.close()


class SlotPool:
    """Which uid slots are taken (thread-safe: creates run in worker threads)."""

    def __init__(self, uid_base: int, slots: int) -> None:
        if uid_base < 1 or uid_base + slots * IDS_PER_SANDBOX > 2**32 - 2:
            raise InvalidConfig(
                f"uid range {uid_base} + {slots} x {IDS_PER_SANDBOX} ids is invalid"
            )
        self.uid_base = uid_base
        self.slots = slots
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def base_of(self, slot: int) -> int:
        """The first host id of ``slot``."""
        return self.uid_base + slot * IDS_PER_SANDBOX

    def slot_of(self, base: int) -> int | None:
        """The slot whose range starts at ``base`` (None when it is not one of ours)."""
        slot, rest = divmod(base - self.uid_base, IDS_PER_SANDBOX)
        return slot if rest == 0 and 0 <= slot < self.slots else None

    def mark(self, base: int) -> None:
        """Record a range as taken (a sandbox found on disk)."""
        slot = self.slot_of(base)
        if slot is not None:
            with self._lock:
                self._used.add(slot)

    def take(self) -> int:
        """Take the lowest free slot and return its base id.

        Raises:
            RuntimeUnavailable: every slot is taken.
        """
        with self._lock:
            for slot in range(self.slots):
                if slot not in self._used:
                    self._used.add(slot)
                    return self.base_of(slot)
        raise RuntimeUnavailable(f"all {self.slots} uid ranges are in use (raise uid_slots)")

    def free(self, base: int) -> None:
        """Give a range back."""
        slot = self.slot_of(base)
        with self._lock:
            self._used.discard(slot if slot is not None else -1)
