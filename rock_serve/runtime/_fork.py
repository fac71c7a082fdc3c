"""Fork, pause and resume of bwrap sandboxes (issue 16): frozen layers and the cgroup freezer.

A fork point must be atomic: the parent's processes are frozen (:class:`Freezer`: the v1
``freezer`` hierarchy here, ``cgroup.freeze`` on v2) while its writable layer (``upper/``) is
copied once into a *frozen layer* under ``<state_dir>/.frozen/<name>``, then thawed. The copy
is ``cp -a --reflink=auto`` (a reflink where the file system can, a plain copy on ext4) with
its owners shifted back from the parent's uid range to 0..65535, as image layers are, so each
child mounts it idmapped into its own range. overlayfs forbids changing a lower dir while it
is mounted, so the parent's live upper is never shared: the copy is what makes the children
independent of the parent (which keeps running and writing on its own upper, and may be
deleted at any time).

Each child is an ordinary sandbox whose ``root.json`` lists ``lowers = [frozen, *parent's
lowers]`` with a fresh (empty) upper of its own: a child costs only what it writes. A frozen
layer is refcounted by the sandboxes whose lowers name it (:class:`FrozenLayers`, rebuilt from
the state dir at start), and removed with its last user.

Pause freezes a sandbox's processes (no CPU; memory stays resident: the kernel cannot page a
frozen cgroup out without swap, and this platform disables swap for sandboxes), resume thaws
them. Frozen tasks ignore SIGKILL until thawed, so removal thaws first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable

from rock_serve.errors import RuntimeUnavailable
from rock_serve.runtime._cgroup import Cgroup, CgroupLayout
from rock_serve.runtime._snapshot import copy_tree

__all__ = ["FROZEN_DIR", "Freezer", "FrozenLayers", "copy_layer", "freezer_mount"]

#: Directory (under the state dir) holding frozen layers.
FROZEN_DIR = ".frozen"
#: How long a freeze may take before it is given up (seconds).
FREEZE_TIMEOUT = 10.0


def freezer_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point of the cgroup v1 ``freezer`` hierarchy, or None."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) > sep + 3 and fields[sep + 1] == "cgroup":
            if "freezer" in fields[sep + 3].split(","):
                return fields[4]
    return None


class Freezer:
    """Freezes and thaws every process of one sandbox's cgroup.

    v2: ``cgroup.freeze`` of the sandbox's cgroup. v1: a cgroup of the same name in the
    freezer hierarchy, made on first use, into which the sandbox's processes are moved (a task
    moved into a frozen v1 cgroup is frozen too, so processes forked meanwhile are caught by
    the next round).
    """

    def __init__(self, layout: CgroupLayout, cgroup: Cgroup, v1_mount: str | None) -> None:
        self.cgroup = cgroup
        self.v2 = layout.version == 2
        if self.v2:
            self.dir = cgroup.dirs[""]
        elif v1_mount is None:
            raise RuntimeUnavailable("pause/fork need the cgroup v1 freezer, not mounted here")
        else:
            self.dir = f"{v1_mount}/{cgroup.parent}/{cgroup.name}"

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.dir, name)) as f:
            return f.read().strip()

    def frozen(self) -> bool:
        """True while the sandbox is frozen."""
        try:
            if self.v2:
                return self._read("cgroup.freeze") == "1"
            return self._read("freezer.state") in ("FROZEN", "FREEZING")
        except OSError:
            return False

    def freeze(self) -> None:
        """Freeze every process of the sandbox; returns once they all are."""
        deadline = time.monotonic() + FREEZE_TIMEOUT
        if self.v2:
            self._write("cgroup.freeze", "1")
            while "frozen 1" not in self._read("cgroup.events"):
                if time.monotonic() > deadline:
                    raise RuntimeUnavailable("the sandbox did not freeze in time")
                time.sleep(0.001)
            return
        os.makedirs(self.dir, exist_ok=True)
        while True:
            for pid in self.cgroup.pids():
                with contextlib.suppress(ProcessLookupError, OSError):
                    self._write("cgroup.procs", str(pid))
            self._write("freezer.state", "FROZEN")
            while self._read("freezer.state") != "FROZEN":
                if time.monotonic() > deadline:
                    self.thaw()
                    raise RuntimeUnavailable("the sandbox did not freeze in time")
                time.sleep(0.001)
            inside = set(self._read("cgroup.procs").split())
            if all(str(p) in inside for p in self.cgroup.pids()):
                return
            if time.monotonic() > deadline:
                self.thaw()
                raise RuntimeUnavailable("the sandbox kept starting processes during a freeze")

    def thaw(self) -> None:
        """Let the sandbox's processes run again (no error when it was not frozen)."""
        with contextlib.suppress(FileNotFoundError):
            if self.v2:
                self._write("cgroup.freeze", "0")
            else:
                self._write("freezer.state", "THAWED")

    def remove(self) -> None:
        """Thaw, and (v1) remove the freezer cgroup once the sandbox's processes are gone."""
        self.thaw()
        if not self.v2 and os.path.isdir(self.dir):
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)


def copy_layer(upper: str, dest: str, shift: int) -> None:
    """Copy an upper dir to ``dest`` (made here) with owners shifted down by ``shift``
    (:func:`~rock_serve.runtime._snapshot.copy_tree`: what ``cp -a`` keeps).
    """
    tmp = f"{dest}.{secrets.token_hex(4)}.tmp"
    try:
        copy_tree(upper, tmp, "the sandbox's layer")
    except RuntimeUnavailable:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if shift:

        def down(path: str) -> None:
            st = os.lstat(path)
            uid = st.st_uid - shift if shift <= st.st_uid < shift + 65536 else st.st_uid
            gid = st.st_gid - shift if shift <= st.st_gid < shift + 65536 else st.st_gid
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(path, uid, gid)
                if not os.path.islink(path):  # chown clears setuid/setgid bits
                    os.chmod(path, st.st_mode & 0o7777)

        down(tmp)
        for parent, dirs, files in os.walk(tmp):
            for name in dirs + files:
                down(os.path.join(parent, name))
    os.rename(tmp, dest)


class FrozenLayers:
    """The frozen layers of one state dir and which sandboxes use each (thread-safe).

    Args:
        base: ``<state_dir>/.frozen``.
        scan: returns ``{sandbox id: its lower dirs}`` for every sandbox of the state dir
            (used once, on first use, so layers of an earlier instance are counted).
    """

    def __init__(self, base: str, scan: Callable[[], dict[str, list[str]]]) -> None:
        self.base = base
        self._scan = scan
        self._users: dict[str, set[str]] | None = None
        self._lock = threading.Lock()

    def _table(self) -> dict[str, set[str]]:
        if self._users is None:
            users: dict[str, set[str]] = {}
            for sandbox_id, lowers in self._scan().items():
                for layer in lowers:
                    if self.owns(layer):
                        users.setdefault(layer, set()).add(sandbox_id)
            self._users = users
            # Layers nobody uses (a crash between copy and child creation) go now.
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.base):
                    path = os.path.join(self.base, name)
                    if path not in users:
                        shutil.rmtree(path, ignore_errors=True)
        return self._users

    def owns(self, layer: str) -> bool:
        """True when ``layer`` is a frozen layer of this store."""
        return os.path.dirname(layer) == self.base

    def new_path(self, parent_id: str) -> str:
        """A fresh path for a frozen copy of ``parent_id``'s layer."""
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        with self._lock:
            self._table()
        return os.path.join(self.base, f"{parent_id}-{secrets.token_hex(6)}")

    def use(self, sandbox_id: str, lowers: list[str]) -> None:
        """``sandbox_id`` mounts ``lowers``: its frozen ones stay until it is released."""
        with self._lock:
            table = self._table()
            for layer in lowers:
                if self.owns(layer):
                    table.setdefault(layer, set()).add(sandbox_id)

    def release(self, sandbox_id: str) -> list[str]:
        """``sandbox_id`` is gone; remove the layers nobody uses any more (returned)."""
        gone = []
        with self._lock:
            table = self._table()
            for layer, users in list(table.items()):
                users.discard(sandbox_id)
                if not users:
                    del table[layer]
                    gone.append(layer)
        for layer in gone:
            shutil.rmtree(layer, ignore_errors=True)
        return gone

    def drop_unused(self, layer: str) -> None:
        """Remove ``layer`` when no sandbox uses it (a fork that made no child)."""
        with self._lock:
            if self._table().get(layer):
                return
        shutil.rmtree(layer, ignore_errors=True)

    def users(self, layer: str) -> set[str]:
        """The sandboxes using ``layer`` now."""
        with self._lock:
            return set(self._table().get(layer, set()))
