"""Bubblewrap runtime, the default: namespaces, an overlayfs root and cgroup limits per sandbox.

A sandbox ``<id>`` is:

- ``<state_dir>/<id>/`` (0700): ``meta.json`` and ``env`` (0600), ``agent.log`` (the rocklet's
  stderr) and the overlay's ``upper/``, ``work/`` and ``merged/``. With a ``disk_mb`` limit
  (the default), ``upper/`` and ``work/`` live on ``disk/``: a sparse ext4 file ``disk.img``
  made per sandbox and loop-mounted (about 10 ms), so a write beyond the limit fails with ENOSPC
  inside and the host's disk holds at most ``disk_mb``. The lower layers (:meth:`_lower`) stay
  read-only: by default a synthesized root (see ``_rootfs``: the host's ``/usr``, ``/bin``,
  ``/lib*`` and a filtered ``/etc``, nothing else of the host); a spec's ``image`` may only
  name a directory under ``rootfs_allow``. Hidden paths of a configured rootfs are whiteouts
  and opaque directories in ``upper/``.
- With ``userns`` (the default): a host uid/gid range of its own (``_userns``: ids 0..65535
  inside are ``uid_base + slot * 65536 + ...`` on the host), lower layers mounted idmapped
  at ``lower<i>/`` so files keep their owners, and ``merged/`` bind-mounted at
  ``<roots_dir>/<id>``, where bwrap, started as the sandbox's uid by ``setpriv``, finds it
  and joins the slot's user namespace (``--userns``): no process of a sandbox is host root.
- ``<hierarchy>/<cgroup_parent>/<id>`` in each cgroup hierarchy it needs, with its limits.
- A ``bwrap`` process with its own mount, pid, ipc, uts, cgroup and net namespace (network
  ``none``: bwrap's, loopback only; ``bridge``: the one :mod:`._netns` made, joined with
  ``nsenter`` before bwrap runs; never the host's), ``--die-with-parent``, capabilities reduced
  to a Docker-like set, ``merged/`` as ``/``, a fresh ``/proc``, ``/dev`` and tmpfs ``/tmp``.
  It runs the rocklet from ``/.rock`` (agent.py and its .pyc, bind-mounted read-only)
  as the sandbox's first process. Docker's hardening on top: ``/proc/sys``, ``/proc/irq``,
  ``/proc/bus``, ``/proc/fs`` (and ``/proc/sysrq-trigger``) read-only, Docker's masked paths
  masked (``/proc/keys``, ``/proc/timer_list``, ``/proc/acpi``...), an empty ``/sys`` but for
  the sandbox's own cgroups, no-new-privileges (bwrap sets it), a root and writable layer
  mounted ``nodev``/``nosuid``, and the default seccomp profile (``_seccomp``) loaded by bwrap
  with ``--seccomp`` before it execs the rocklet, so every process of the sandbox has it.
  Env values never appear in argv: they are written to ``env`` (0600) and read by the
  rocklet's boot code from an inherited file descriptor. A ``/bin/sh`` wrapper writes its own
  pid into the cgroup's
  ``cgroup.procs`` files and then ``exec``-s bwrap, so bwrap and everything it starts are
  inside the limits from their first instruction (no ``nsenter``, no race).

Removal kills every process in the cgroup, unmounts everything under the sandbox directory,
removes the cgroup (retrying EBUSY) and deletes the directory only after checking that
nothing is mounted under it. Sandboxes of an earlier runtime instance on the same state dir
are listed, inspected and removed the same way.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import ctypes.util
import glob
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable

from rock_serve.config import BwrapRuntimeConfig
from rock_serve.errors import (
    Conflict,
    ImageNotFound,
    InvalidConfig,
    InvalidRequest,
    NotSupported,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxNotRunning,
)
from rock_serve.protocol import FailureReason, Resources, SandboxInfo, SandboxSpec
from rock_serve.rocklet.handle import RockletHandle, agent_argv, install_agent
from rock_serve.runtime._cgroup import Cgroup, CgroupLayout
from rock_serve.runtime._disk_pool import DiskPool, loop_mount, make_disk
from rock_serve.runtime._fork import FROZEN_DIR, Freezer, FrozenLayers, copy_layer, freezer_mount
from rock_serve.runtime._image_python import PYTHON_MOUNT, NodePython, node_python_bundle
from rock_serve.runtime._image_user import resolve_user
from rock_serve.runtime._netns import check_network, enter, for_runtime
from rock_serve.runtime._rootfs import Skeleton
from rock_serve.runtime._seccomp import compile_profile
from rock_serve.runtime._snapshot import (
    OVERLAY_OPAQUE,
    pack_layer,
    squash_layers,
    unpack_layer,
)
from rock_serve.runtime._state import (
    SandboxMeta,
    alive,
    check_id,
    finish_stop,
    labels_for,
    launch,
    list_metas,
    matches,
    read_meta,
    to_info,
    write_meta,
)
from rock_serve.runtime._sync import run_sync
from rock_serve.runtime._userns import SlotPool, UsernsCache, idmapped_mount
from rock_serve.runtime.base import Runtime
from rock_serve.runtime.images import ImageStore

__all__ = ["AGENT_MOUNT", "BwrapRuntime", "mounts_under"]

log = logging.getLogger(__name__)

#: Where the rocklet program (and its compiled __pycache__) appears inside a sandbox.
AGENT_MOUNT = "/.rock"
#: Seconds to wait for a fresh rocklet's first reply.
START_TIMEOUT = 30.0
_MNT_DETACH = 2
#: A sandbox's root: its lower dirs (top first) and the image config the start honours.
_ROOT_FILE = "root.json"
#: Runs as the sandbox's host-side first process: joins the cgroups, then becomes bwrap with
#: the seccomp program on fd 8, the env file on fd 9 and, with a user namespace, that
#: namespace on fd 7, the root (merged/) on fd 6 and the rocklet's dir on fd 5: opened here,
#: as host root, since bwrap runs as the sandbox's own uid (dash takes one-digit fds).
_JOIN_AND_EXEC = (
    "s=$1 e=$2 u=$3 m=$4 a=$5; shift 5; "
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
    'exec "$@" 8<"$s" 9<"$e" 7<"$u" 6<"$m" 5<"$a"'
)
_SECCOMP_FD = 8
_ENV_FD = 9
#: Prepended to the rocklet's boot code: the environment comes from fd 9 (``key\0value\0``
#: pairs), which is then closed, as are fds 5-8; then the capability bounding set is reduced
#: to the effective set.
_ENV_BOOT = (
    "import os;_f=os.fdopen(9,'rb');_d=_f.read().split(b'\\0');_f.close();os.closerange(5,9);"
    "os.environ.clear();[os.environb.__setitem__(_d[i],_d[i+1]) for i in range(0,len(_d)-1,2)];"
    "del _f,_d;"
    # Capability bounding set := the effective set (PR_CAPBSET_DROP; bwrap keeps it full).
    "import ctypes;_l=ctypes.CDLL(None);"
    "_e=int([x for x in open('/proc/self/status') if x[:7]=='CapEff:'][0].split()[1],16);"
    "[_l.prctl(24,c,0,0,0) for c in range(64) if not _e>>c&1];del _l,_e;"
)
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_BIND = 4096


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


_LIBC: ctypes.CDLL | None = None


def _sys_mount(source: str, target: str, fstype: str, data: str, flags: int = 0) -> None:
    global _LIBC
    _LIBC = _LIBC or _libc()
    if _LIBC.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _sys_umount(target: str, flags: int = 0) -> None:
    global _LIBC
    _LIBC = _LIBC or _libc()
    if _LIBC.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def mounts_under(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = path.rstrip("/") + "/"
    out = []
    with open(mountinfo) as f:
        for line in f:
            point = line.split()[4]
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            if point == path.rstrip("/") or point.startswith(prefix):
                out.append(point)
    return sorted(set(out), key=lambda p: (-p.count("/"), p))


def _unmount_all(path: str) -> None:
    for _ in range(8):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            try:
                _sys_umount(point)
            except OSError:
                with contextlib.suppress(OSError):
                    _sys_umount(point, _MNT_DETACH)
    left = mounts_under(path)
    if left:
        raise RuntimeUnavailable(f"cannot unmount {left} (files were left in place)")


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise RuntimeUnavailable(f"{os.path.basename(argv[0])} failed: {err}")


def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically with mode 0600."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def env_bytes(env: dict[str, str]) -> bytes:
    """``env`` as the NUL-separated key, value pairs the rocklet's boot code reads."""
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in env.items())


def _check_path_option(path: str, what: str) -> None:
    if any(c in path for c in ",:\\\n") or not os.path.isabs(path):
        raise InvalidConfig(f"{what} {path!r} must be absolute and free of ',', ':' and '\\'")


class _Hide:
    """One hidden path of a lower layer: an opaque dir or a whiteout in ``upper/``."""

    __slots__ = ("gid", "is_dir", "mode", "rel", "uid")

    def __init__(self, rel: str, st: os.stat_result) -> None:
        self.rel = rel
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.mode, self.uid, self.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    def apply(self, upper: str, shift: int = 0) -> None:
        target = os.path.join(upper, self.rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if self.is_dir:
            os.mkdir(target, self.mode)
            os.chown(target, self.uid + shift, self.gid + shift)
            os.chmod(target, self.mode)
            os.setxattr(target, OVERLAY_OPAQUE, b"y")
        else:
            os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


class BwrapRuntime(Runtime):
    """Bubblewrap sandboxes; see the module docstring for what one is made of."""

    name = "bwrap"

    def __init__(self, config: BwrapRuntimeConfig | None = None) -> None:
        self.config = config = config or BwrapRuntimeConfig()
        bwrap = shutil.which(config.bwrap_path)
        if bwrap is None:
            raise InvalidConfig(f"bwrap runtime: binary {config.bwrap_path!r} not found")
        self.bwrap = bwrap
        if not os.path.isdir(config.rootfs):
            raise InvalidConfig(f"bwrap runtime: rootfs {config.rootfs!r} is not a directory")
        self.rootfs = os.path.realpath(config.rootfs)
        _check_path_option(self.rootfs, "rootfs")
        if os.geteuid() != 0:
            raise InvalidConfig(
                "bwrap runtime: needs root (it mounts overlayfs and writes cgroups); "
                "use the local runtime or run the worker as root"
            )
        layout = CgroupLayout.detect()
        if layout is None:
            raise InvalidConfig("bwrap runtime: no cgroup v1 (memory+pids) or v2 hierarchy found")
        self.layout = layout
        for mount in layout.mounts.values():
            if not os.access(mount, os.W_OK):
                raise InvalidConfig(f"bwrap runtime: cgroup hierarchy {mount} is not writable")
        Cgroup(layout, config.cgroup_parent, "probe")  # validates cgroup_parent
        self.state_dir = os.path.realpath(config.state_dir)
        _check_path_option(self.state_dir, "state_dir")
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise InvalidConfig(
                f"bwrap runtime: cannot use state_dir {self.state_dir}: {exc}"
            ) from None
        for pattern in config.hide_paths:
            if not pattern.startswith("/"):
                raise InvalidConfig(f"bwrap runtime: hide path {pattern!r} must be absolute")
        if any(not c.startswith("CAP_") for c in config.capabilities):
            raise InvalidConfig("bwrap runtime: capabilities must be named like CAP_CHOWN")
        self.agent_dir = install_agent(os.path.join(self.state_dir, ".agent"))
        self.net = for_runtime(config.bridge, self.state_dir) if config.allow_network else None
        self._hides: dict[str, list[_Hide]] = {}
        self.rootfs_allow = [os.path.realpath(p) for p in config.rootfs_allow]
        self.skeleton: Skeleton | None = None
        if self.rootfs == "/":
            base = os.path.realpath(config.skeleton_dir)
            parent = os.path.dirname(base)
            if not os.path.isdir(parent) or os.stat(parent).st_dev == os.stat("/").st_dev:
                raise InvalidConfig(
                    f"bwrap runtime: skeleton_dir {base} must be on a file system other than "
                    "the host's / (overlayfs refuses nested layers): a tmpfs such as /dev/shm"
                )
            self.skeleton = Skeleton(
                base,
                allow=config.root_allow,
                etc_allow=config.etc_allow,
                hide=self._hide_targets("/"),
            )
            self.skeleton.layers()  # build it now: config errors show at start-up
        self.seccomp_file = os.path.join(self.state_dir, ".seccomp.bpf")
        if config.seccomp:
            _write_private(self.seccomp_file, compile_profile())
        # Masks and read-only binds of paths this kernel has (a bind needs its target).
        self._masks: list[str] = []
        for p in config.masked_paths:
            if not p.startswith("/proc/") or not os.path.lexists(p):
                continue  # /sys is an empty tmpfs in sandboxes: nothing of it to mask
            if os.path.isdir(p):
                self._masks += ["--tmpfs", p, "--remount-ro", p]
            else:
                self._masks += ["--ro-bind", "/dev/null", p]
        for p in config.readonly_paths:
            if os.path.lexists(p):
                self._masks += ["--ro-bind", p, p]
        self._mkfs = shutil.which("mkfs.ext4") or ""
        self._mount_bin = shutil.which("mount") or ""
        self.disks: DiskPool | None = None
        if self._mkfs and config.disk_pool > 0:
            self.disks = DiskPool(
                os.path.join(self.state_dir, ".disks"), config.disk_pool, self._mkfs
            )
        self.slots: SlotPool | None = None
        if config.userns:
            self._init_userns()
        self._handles: dict[str, RockletHandle] = {}
        gate = config.max_concurrent_starts or max(8, 4 * (os.cpu_count() or 2))
        self._start_gate = asyncio.Semaphore(gate)
        self.images = ImageStore(config.images) if config.images is not None else None
        self._node_python: NodePython | None = None
        if self.images is not None:
            self._adopt_images(self.images)

    # ------------------------------------------------------------------ helpers

    def _dir(self, sandbox_id: str) -> str:
        return os.path.join(self.state_dir, check_id(sandbox_id))

    def _cgroup(self, sandbox_id: str) -> Cgroup:
        return Cgroup(self.layout, self.config.cgroup_parent, sandbox_id)

    def _meta(self, sandbox_id: str) -> SandboxMeta:
        meta = read_meta(self._dir(sandbox_id))
        if meta is None or meta.runtime != self.name:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return meta

    def _resources(self, spec: SandboxSpec) -> Resources:
        dflt = self.config.default_resources
        mine = spec.resources
        return Resources(
            cpus=mine.cpus if mine.cpus is not None else dflt.cpus,
            memory_mb=mine.memory_mb if mine.memory_mb is not None else dflt.memory_mb,
            pids=mine.pids if mine.pids is not None else dflt.pids,
            disk_mb=mine.disk_mb if mine.disk_mb is not None else dflt.disk_mb,
        )

    def _init_userns(self) -> None:
        """Check that user namespaces and idmapped mounts work here; note the taken ranges."""
        cfg = self.config
        self._setpriv = shutil.which("setpriv") or ""
        self._unshare = shutil.which("unshare") or ""
        if not self._setpriv or not self._unshare:
            raise InvalidConfig("bwrap runtime: userns needs setpriv and unshare (util-linux)")
        self.slots = SlotPool(cfg.uid_base, cfg.uid_slots)
        # bwrap runs as the sandbox's uid and resolves the paths it binds: the roots (a bind
        # of each merged/) and the rocklet live under roots_dir, traversable but not listable.
        self.roots_dir = os.path.realpath(cfg.roots_dir)
        _check_path_option(self.roots_dir, "roots_dir")
        os.makedirs(self.roots_dir, mode=0o711, exist_ok=True)
        os.chmod(self.roots_dir, 0o711)
        # Named by content: every instance with this rocklet shares one copy.
        with open(os.path.join(self.agent_dir, "agent.py"), "rb") as f:
            key = hashlib.sha256(f.read() + sys.version.encode()).hexdigest()[:16]
        self.agent_dir = install_agent(os.path.join(self.roots_dir, f".agent-{key}"))
        os.chmod(self.agent_dir, 0o755)
        self.namespaces = UsernsCache(self._setpriv, self._unshare)
        for meta in list_metas(self.state_dir, self.name):
            if meta.uid_base is not None:
                self.slots.mark(meta.uid_base)
        probe = os.path.join(self.state_dir, ".idmap-probe")
        os.makedirs(probe, mode=0o700, exist_ok=True)
        try:
            ns = self.namespaces.path(self.slots.base_of(0))
            idmapped_mount(self.agent_dir, probe, ns)
            _sys_umount(probe, _MNT_DETACH)
        except (OSError, RuntimeUnavailable) as exc:
            raise InvalidConfig(
                f"bwrap runtime: user namespaces with idmapped mounts do not work here ({exc}); "
                "they need Linux >= 5.19 and a state dir on ext4/xfs/btrfs/tmpfs, or set "
                "userns: false"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(probe)

    def _userns(self, base: int) -> str:
        return self.namespaces.path(base)

    def _hide_targets(self, lower: str) -> list[str]:
        """The real paths under ``lower`` that ``hide_paths`` (and the state dir) name."""
        out = []
        for pattern in [*self.config.hide_paths, self.state_dir]:
            full = lower.rstrip("/") + "/" + pattern.lstrip("/")
            for path in glob.glob(full) if glob.has_magic(pattern) else [full]:
                if os.path.lexists(path):
                    parent = os.path.realpath(os.path.dirname(path))
                    out.append(os.path.join(parent, os.path.basename(path)))
        return out

    def _hidden(self, lower: str) -> list[_Hide]:
        """What to hide in ``lower`` (computed once per lower)."""
        cached = self._hides.get(lower)
        if cached is not None:
            return cached
        out: dict[str, _Hide] = {}
        patterns = [*self.config.hide_paths, self.state_dir]
        for pattern in patterns:
            full = lower.rstrip("/") + "/" + pattern.lstrip("/")
            matches_ = glob.glob(full) if glob.has_magic(pattern) else [full]
            for path in matches_:
                path = posixpath.normpath(path)
                rel = posixpath.relpath(path, lower)
                parent = os.path.dirname(path)
                if rel.startswith("..") or rel == "." or os.path.realpath(parent) != parent:
                    continue  # outside lower, or behind a symlink (hide the link itself)
                try:
                    out[rel] = _Hide(rel, os.lstat(path))
                except OSError:
                    continue
        # A parent hidden as a directory already hides its children.
        dirs = {r for r, h in out.items() if h.is_dir}
        result = [
            h
            for r, h in sorted(out.items())
            if not any(r.startswith(d + "/") for d in dirs if d != r)
        ]
        self._hides[lower] = result
        return result

    def _lower(self, spec: SandboxSpec) -> list[str]:
        """The read-only lower layers of a sandbox's root, top first.

        No image: the synthesized default root (rootfs '/') or the configured rootfs. An
        image names a directory, which must be under ``rootfs_allow``; any other path gets
        the same ``image_not_found`` whether it exists or not (no probing of host paths).
        """
        if spec.image is None:
            return self.skeleton.layers() if self.skeleton is not None else [self.rootfs]
        refused = ImageNotFound(
            f"image {spec.image!r} is not a rootfs this runtime serves (an absolute path "
            "under the configured rootfs_allow directories)"
        )
        if not os.path.isabs(spec.image):
            raise refused
        lower = os.path.realpath(spec.image)
        if not any(lower.startswith(d.rstrip("/") + "/") for d in self.rootfs_allow):
            raise refused
        state = self.state_dir.rstrip("/") + "/"
        if (lower + "/").startswith(state) or state.startswith(lower + "/"):
            raise refused  # another sandbox's files, or a tree that contains them
        if not os.path.isdir(lower):
            raise refused
        _check_path_option(lower, "rootfs")
        return [lower]

    async def _root(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, object]:
        """Resolve the spec's image (pulling it) into lowers + the config the start honours.

        No image: the store's default image. An absolute path: :meth:`_lower`'s rules.
        """
        ref = spec.image
        if self.images is None or (ref is not None and ref.startswith("/")):
            root: dict[str, object] = {"lowers": self._lower(spec), "host": True}
            return {**root, **await self._user(spec.user or "", root, "the root")}
        img = await self.images.get(ref or self.images.config.default_image, spec.registry_auth)
        self.images.acquire(img, sandbox_id)
        root = {
            "lowers": list(reversed(self.images.layer_dirs(img))),
            "host": False,
            "image_id": img.id,
            "env": img.env_dict(),
            "workdir": img.workdir,
            "python": img.python,
        }
        try:
            return {**root, **await self._user(spec.user or img.user, root, "the image")}
        except BaseException:
            self.images.release(sandbox_id)
            raise

    async def _user(self, user: str, root: dict[str, object], what: str) -> dict[str, object]:
        """The image's ``User`` (or the spec's) as ids in the sandbox's user namespace."""
        if not user:
            return {}
        lowers = [str(d) for d in root["lowers"]]  # type: ignore[attr-defined]
        ids = await run_sync(resolve_user, user, lowers, what)
        if ids.root:
            return {}
        if self.slots is None:
            raise Conflict(f"user {user!r}: running as a non-root user needs userns: true")
        return {"uid": ids.uid, "gid": ids.gid, "groups": list(ids.groups), "home": ids.home}

    def _adopt_images(self, store: ImageStore) -> None:
        """Sandboxes of an earlier instance keep their images in use."""
        for meta in list_metas(self.state_dir, self.name):
            image_id = self._read_root(meta.id).get("image_id")
            img = store.lookup(str(image_id)) if image_id else None
            if img is not None:
                store.acquire(img, meta.id)

    def _read_root(self, sandbox_id: str) -> dict[str, object]:
        try:
            with open(os.path.join(self._dir(sandbox_id), _ROOT_FILE)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _python_argv(self, root: dict[str, object]) -> tuple[list[str], list[str]]:
        """(bwrap mount args, interpreter argv) for the rocklet in this root."""
        if root.get("host", True) or root.get("python"):
            return [], [str(root.get("python") or self.config.python)]
        if self._node_python is None:
            # readable by a sandbox's own uid (userns): next to the rocklet's dir
            base = self.roots_dir if self.slots is not None else self.state_dir
            self._node_python = node_python_bundle(base)
        mounts: list[str] = []
        for src, dst in self._node_python.mounts():
            mounts += ["--ro-bind", src, dst]
        return mounts, self._node_python.argv()

    # ------------------------------------------------------------------ sync parts

    def _create_sync(
        self, sandbox_id: str, spec: SandboxSpec, root: dict[str, object]
    ) -> SandboxMeta:
        path = self._dir(sandbox_id)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise Conflict(f"sandbox {sandbox_id!r} exists already") from None
        uid_base = self.slots.take() if self.slots is not None else None
        lower = [str(d) for d in root["lowers"]]  # type: ignore[attr-defined]
        try:
            resources = self._resources(spec)
            os.mkdir(os.path.join(path, "merged"), 0o755)
            if resources.disk_mb is not None:
                self._make_disk(path, resources.disk_mb)
            rw = self._rw_dir(path)
            for sub in ("upper", "work"):
                os.mkdir(os.path.join(rw, sub), 0o755)
            if uid_base is not None:
                os.chown(os.path.join(rw, "upper"), uid_base, uid_base)  # the sandbox's root
            if root.get("host") and (self.skeleton is None or spec.image is not None):
                for hide in self._hidden(lower[0]):
                    hide.apply(os.path.join(rw, "upper"), uid_base or 0)
            if not root.get("host") and not root.get("python"):
                self._python_argv(root)  # makes the node's python bundle once, off the loop
            with open(os.path.join(path, _ROOT_FILE), "w") as f:
                json.dump(root, f)
            self._mount(path, lower, uid_base)
            self._cgroup(sandbox_id).create(resources)
            if self.net is not None and spec.network != "none":
                self.net.create(sandbox_id, spec.egress)
            meta = SandboxMeta(
                id=sandbox_id,
                runtime=self.name,
                image=spec.image,
                labels=labels_for(sandbox_id, spec, self.name),
                spec=spec.model_dump(mode="json"),
                uid_base=uid_base,
            )
            write_meta(path, meta)
        except BaseException:
            with contextlib.suppress(Exception):
                self._remove_sync(sandbox_id)
            if uid_base is not None and self.slots is not None:
                self.slots.free(uid_base)
            raise
        return meta

    def _rw_dir(self, path: str) -> str:
        """Where a sandbox's upper and work dirs live: its disk when it has one."""
        return os.path.join(path, "disk") if os.path.exists(f"{path}/disk.img") else path

    def _make_disk(self, path: str, disk_mb: int) -> None:
        """A sparse ext4 file of ``disk_mb`` MiB, loop-mounted at ``<path>/disk``."""
        if not self._mkfs or not self._mount_bin:
            raise RuntimeUnavailable("disk_mb needs mkfs.ext4 and mount (e2fsprogs, mount)")
        image = os.path.join(path, "disk.img")
        if self.disks is None or not self.disks.take(disk_mb, image):
            make_disk(image, disk_mb, self._mkfs)  # none ready: made here (the pool refills)
        os.mkdir(os.path.join(path, "disk"), 0o700)
        self._mount_disk(path)

    def _mount_disk(self, path: str) -> None:
        image, target = os.path.join(path, "disk.img"), os.path.join(path, "disk")
        try:
            loop_mount(image, target, _MS_NODEV | _MS_NOSUID)
        except OSError as exc:  # no LOOP_CONFIGURE (Linux < 5.8): util-linux finds a device
            log.debug("loop mount of %s by ioctl failed (%s); using mount(8)", image, exc)
            _run([self._mount_bin, "-o", "loop,nodev,nosuid", image, target])

    def _mount(self, path: str, lower: list[str], uid_base: int | None = None) -> None:
        merged = os.path.join(path, "merged")
        rw = self._rw_dir(path)
        if uid_base is not None and not os.path.ismount(merged):
            # Each lower layer through an idmapped, read-only mount: ids 0..65535 of the
            # rootfs appear as the sandbox's range, so files keep their owners inside. The
            # overlay keeps private clones of its layers, so the mounts are detached as soon
            # as it is up: no clone of an image layer (or of the host's root) stays mounted in
            # the state dir for a later ``rm -rf`` to reach.
            ns = self._userns(uid_base)
            mapped = []
            try:
                for i, layer in enumerate(lower):
                    target = os.path.join(path, f"lower{i}")
                    if not os.path.isdir(target):
                        os.mkdir(target, 0o700)
                    if not os.path.ismount(target):
                        try:
                            idmapped_mount(layer, target, ns)
                        except OSError as exc:
                            raise RuntimeUnavailable(f"cannot idmap {layer}: {exc}") from None
                    mapped.append(target)
                self._overlay(merged, mapped, rw)
            finally:
                for target in mapped:
                    with contextlib.suppress(OSError):
                        _sys_umount(target, _MNT_DETACH)
                        os.rmdir(target)
        else:
            self._overlay(merged, lower, rw)
        if uid_base is not None:
            link = self._root_link(os.path.basename(path))
            if not os.path.isdir(link):
                os.mkdir(link, 0o700)
            if not os.path.ismount(link):
                _sys_mount(merged, link, "", "", _MS_BIND)

    def _root_link(self, sandbox_id: str) -> str:
        """Where bwrap (running as the sandbox's uid) finds the sandbox's root."""
        return os.path.join(self.roots_dir, sandbox_id)

    def _overlay(self, merged: str, lower: list[str], rw: str) -> None:
        if os.path.ismount(merged):
            return
        opts = f"lowerdir={':'.join(lower)},upperdir={rw}/upper,workdir={rw}/work"
        try:
            _sys_mount("overlay", merged, "overlay", opts, _MS_NODEV | _MS_NOSUID)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot mount the overlay root at {merged} ({exc}); the state dir must be on "
                "a filesystem that can hold an overlay upper layer (not overlayfs itself)"
            ) from None

    def _prepare_start(self, sandbox_id: str, meta: SandboxMeta, spec: SandboxSpec) -> Cgroup:
        """Re-create what a reboot loses (the mount, the cgroup) before a start."""
        path = self._dir(sandbox_id)
        if os.path.exists(f"{path}/disk.img") and not os.path.ismount(f"{path}/disk"):
            self._mount_disk(path)
        lowers = self._read_root(sandbox_id).get("lowers") or self._lower(spec)
        self._mount(path, [str(d) for d in lowers], meta.uid_base)  # type: ignore[attr-defined]
        cg = self._cgroup(sandbox_id)
        if not cg.exists():
            cg.create(self._resources(spec))
        return cg

    def _remove_sync(self, sandbox_id: str) -> None:
        path = self._dir(sandbox_id)
        meta = read_meta(path)
        cg = self._cgroup(sandbox_id)
        freezer = self._freezer(sandbox_id, quiet=True)
        if freezer is not None:
            freezer.thaw()  # frozen tasks ignore SIGKILL
        if cg.exists():
            cg.kill_all()
        if self.net is not None:
            self.net.remove(sandbox_id)
        if os.path.isdir(path):
            _unmount_all(path)
        if self.slots is not None:
            link = self._root_link(sandbox_id)
            if os.path.lexists(link):
                _unmount_all(link)
                os.rmdir(link)
        if cg.exists():
            cg.remove()
        if os.path.isdir(path):
            if mounts_under(path):  # pragma: no cover - _unmount_all raised already
                raise RuntimeUnavailable(f"refusing to delete {path}: something is mounted in it")
            shutil.rmtree(path)
        if meta is not None and meta.uid_base is not None and self.slots is not None:
            self.slots.free(meta.uid_base)
        if freezer is not None:
            freezer.remove()
        self._frozen_layers().release(sandbox_id)
        if self._fork_locks is not None:
            self._fork_locks.pop(sandbox_id, None)

    # ------------------------------------------------------------------ argv

    def argv(
        self, sandbox_id: str, spec: SandboxSpec, cg: Cgroup, uid_base: int | None = None
    ) -> list[str]:
        """The full command that starts the sandbox (cgroup join, bwrap, rocklet).

        With ``uid_base`` bwrap runs as that host uid (``setpriv``) and joins the slot's user
        namespace; its root and the rocklet's dir come as fds opened by the wrapper.
        """
        cfg = self.config
        root_cfg = self._read_root(sandbox_id)
        workdir = spec.workdir
        if workdir == "/root" and root_cfg.get("workdir"):
            workdir = str(root_cfg["workdir"])  # the image's WorkingDir, unless the spec sets one
        elif workdir == "/root" and root_cfg.get("home"):
            workdir = str(root_cfg["home"])  # a non-root User's home, not root's
        workdir = posixpath.normpath(workdir)
        if not workdir.startswith("/"):
            raise InvalidRequest(f"workdir {spec.workdir!r} must be absolute")
        path = self._dir(sandbox_id)
        merged = os.path.join(path, "merged")
        fds = ["/dev/null", "/dev/null", "/dev/null"]
        args = [self.bwrap, "--die-with-parent", "--new-session"]
        if uid_base is not None:
            ids = [f"--reuid={uid_base}", f"--regid={uid_base}", "--clear-groups"]
            args = [self._setpriv, *ids, "--", *args, "--userns", "7"]
            fds[0] = self._userns(uid_base)
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        if spec.network == "none":
            args.append("--unshare-net")
        args += ["--hostname", sandbox_id[:63]]
        root = self._root_link(sandbox_id) if uid_base is not None else merged
        args += ["--bind", root, "/"]
        user_boot = ""
        tmp = ["--tmpfs", "/tmp"]
        if root_cfg.get("uid") is not None and uid_base is not None:
            # The image's User: the rocklet (root in the sandbox's user namespace) becomes it
            # once set up, as Docker's init does: ids only, caps gone, bounding set kept.
            uid, gid = int(root_cfg["uid"]), int(root_cfg.get("gid") or 0)  # type: ignore[call-overload]
            groups = sorted({gid, *(int(g) for g in root_cfg.get("groups") or [])})  # type: ignore[attr-defined]
            user_boot = f"os.setgroups({groups});os.setgid({gid});os.setuid({uid});"
            tmp = ["--perms", "1777", *tmp]  # /tmp as an image has it, writable by that user
        args += ["--proc", "/proc", "--dev", "/dev", *tmp, "--tmpfs", "/sys"]
        args += self._masks
        if self.layout.version == 2:
            args += ["--ro-bind", cg.dirs[""], "/sys/fs/cgroup"]
        else:
            for ctrl, d in sorted(cg.dirs.items()):
                args += ["--ro-bind", d, f"/sys/fs/cgroup/{ctrl}"]
        args += ["--ro-bind", self.agent_dir, AGENT_MOUNT]
        py_mounts, python = self._python_argv(root_cfg)
        args += py_mounts
        args += ["--dir", workdir, "--chdir", workdir]
        # The environment goes through the env file (see _ENV_BOOT), never argv.
        args += ["--clearenv", "--setenv", "PATH", cfg.path]
        args += ["--cap-drop", "ALL"]
        for cap in cfg.capabilities:
            args += ["--cap-add", cap]
        seccomp = "/dev/null"
        if cfg.seccomp and spec.seccomp == "default":
            args += ["--seccomp", str(_SECCOMP_FD)]
            seccomp = self.seccomp_file
        rocklet = agent_argv("python3", AGENT_MOUNT, "--root", "/")
        rocklet[4] = _ENV_BOOT + user_boot + rocklet[4]
        rocklet = [*python, *rocklet[1:]]
        args += ["--", *rocklet]
        args = enter(self.net, sandbox_id, spec.network, args)  # nsenter its own netns
        env_file = os.path.join(path, "env")
        wrapper = ["/bin/sh", "-c", _JOIN_AND_EXEC, "rock-sandbox", seccomp, env_file, *fds]
        return [*wrapper, *cg.procs_files, "--", *args]

    def sandbox_env(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, str]:
        """The environment of the rocklet (and every process it starts)."""
        env = {
            "PATH": self.config.path,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": sandbox_id[:63],
        }
        root = self._read_root(sandbox_id)
        if root.get("home"):
            env["HOME"] = str(root["home"])  # the image User's home, as Docker sets it
        image_env = root.get("env")
        if isinstance(image_env, dict):
            env.update({str(k): str(v) for k, v in image_env.items()})
        env.update(spec.env)
        return env

    # ------------------------------------------------------------------ Runtime API

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Make the overlay root, the cgroup with its limits and the record; nothing runs yet."""
        check_id(sandbox_id)
        await run_sync(check_network, spec.network, spec.egress, self.net)  # may resolve names
        if not posixpath.isabs(spec.workdir):
            raise InvalidRequest(f"workdir {spec.workdir!r} must be absolute")
        root = await self._root(sandbox_id, spec)
        try:
            meta = await run_sync(self._create_sync, sandbox_id, spec, root)
        except BaseException:
            if self.images is not None:
                self.images.release(sandbox_id)
            raise
        return self._info(meta)

    async def start(self, sandbox_id: str) -> RockletHandle:
        """Run bwrap with the rocklet as first process; return a handle after its first reply."""
        meta = self._meta(sandbox_id)
        spec = SandboxSpec.model_validate(meta.spec)
        cg = self._cgroup(sandbox_id)
        if alive(meta):
            raise Conflict(f"sandbox {sandbox_id!r} is running already")
        if cg.pids():
            await run_sync(cg.kill_all)  # stragglers of a sandbox whose bwrap is gone
        mounted = os.path.ismount(os.path.join(self._dir(sandbox_id), "merged"))
        if meta.uid_base is not None:
            mounted = mounted and os.path.ismount(self._root_link(sandbox_id))
        if not mounted or not cg.exists():
            cg = await run_sync(self._prepare_start, sandbox_id, meta, spec)
        if self.net is not None and spec.network != "none":
            await run_sync(self.net.ensure, sandbox_id, spec.egress)  # gone after a reboot
        if meta.uid_base is not None:
            await run_sync(self._userns, meta.uid_base)  # made again after a reboot
        argv = self.argv(sandbox_id, spec, cg, meta.uid_base)
        env_file = os.path.join(self._dir(sandbox_id), "env")
        _write_private(env_file, env_bytes(self.sandbox_env(sandbox_id, spec)))
        # A burst of starts on a loaded node queues here: START_TIMEOUT measures one start,
        # not the wait behind a hundred others (see max_concurrent_starts).
        async with self._start_gate:
            return await launch(
                self._dir(sandbox_id),
                meta,
                argv,
                env={"PATH": os.environ.get("PATH", os.defpath)},
                handles=self._handles,
                stop=lambda: self.stop(sandbox_id),
                timeout=START_TIMEOUT,
            )

    async def stop(self, sandbox_id: str) -> None:
        """Kill every process in the sandbox's cgroup; the overlay and files stay."""
        meta = self._meta(sandbox_id)
        cg = self._cgroup(sandbox_id)
        if cg.pids():
            await run_sync(cg.kill_all)
        await finish_stop(self._dir(sandbox_id), meta, self._handles)

    async def remove(self, sandbox_id: str) -> None:
        """Kill processes, unmount, remove the cgroup and the files. Idempotent."""
        check_id(sandbox_id)
        await run_sync(self._remove_sync, sandbox_id)
        if self.images is not None:
            self.images.release(sandbox_id)
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            await handle.close()

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """Running while bwrap runs; after that, stopped or failed (OOM counter says why)."""
        return self._info(self._meta(sandbox_id))

    async def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        """Sandboxes in the state dir (also those of earlier instances) matching ``labels``."""

        def scan() -> list[SandboxInfo]:
            metas = list_metas(self.state_dir, self.name)
            return [self._info(m) for m in metas if matches(m.labels, labels)]

        return await run_sync(scan)

    async def commit(self, sandbox_id: str, repo: str, tag: str = "latest") -> str:
        """Save the sandbox's files as image ``repo:tag`` in the node's store; returns its ref.

        Its upper dir becomes one more layer over its image's layers (the rocklet's mount
        points are left out); the image's config (Env, WorkingDir, User, labels) carries
        over. New sandboxes on this node can use it at once.

        Raises:
            SandboxNotFound: no such sandbox.
            InvalidRequest: a host-root sandbox, or ``repo:tag`` is not a valid reference.
        """
        self._meta(sandbox_id)
        root = self._read_root(sandbox_id)
        store = self.images
        image_id = root.get("image_id")
        parent = store.lookup(str(image_id)) if store is not None and image_id else None
        if store is None or parent is None:
            raise InvalidRequest(f"sandbox {sandbox_id!r} is not made from a stored image")
        upper = os.path.join(self._rw_dir(self._dir(sandbox_id)), "upper")
        skip = frozenset({AGENT_MOUNT.lstrip("/"), PYTHON_MOUNT.lstrip("/")})
        shift = self._meta(sandbox_id).uid_base or 0
        img = await store.commit(upper, parent, f"{repo}:{tag}", skip, shift)
        return img.refs[0]

    async def oom_kills(self, sandbox_id: str) -> int:
        """How many processes of the sandbox the kernel OOM-killed so far."""
        self._meta(sandbox_id)
        return self._cgroup(sandbox_id).oom_kills()

    async def close(self) -> None:
        """Forget the handles; sandboxes keep running until stopped or removed (or we exit).

        The user namespaces are let go of: running sandboxes keep theirs.
        """
        self._handles.clear()
        if self.disks is not None:
            await run_sync(self.disks.close)
        if self.images is not None:
            await self.images.close()
        if self.slots is not None:
            self.namespaces.close()

    def _info(self, meta: SandboxMeta) -> SandboxInfo:
        if alive(meta) or not meta.started or meta.stopped:
            return to_info(meta)
        oom = self._cgroup(meta.id).oom_kills() > 0
        handle = self._handles.get(meta.id)
        proc = handle.process if handle is not None else None
        if proc is not None and proc.returncode is not None:
            # bwrap exits with 128+N when the rocklet died of signal N (OOM kill: 9).
            oom = oom and proc.returncode in (137, -9)
        return to_info(meta, failure=FailureReason.OOM_KILLED if oom else None)

    # ------------------------------------------------------------------ fork, pause (issue 16)
    # See ``_fork``: the parent is frozen, its upper copied once into a frozen layer, thawed;
    # each child mounts that layer under a fresh upper of its own.

    _frozen: FrozenLayers | None = None
    _freezer_v1: str | None = None
    _fork_locks: dict[str, asyncio.Lock] | None = None

    def _fork_lock(self, parent_id: str) -> asyncio.Lock:
        """One fork (or pause) of a sandbox at a time: a second freeze must not thaw the first."""
        if self._fork_locks is None:
            self._fork_locks = {}
        lock = self._fork_locks.get(parent_id)
        if lock is None:
            lock = self._fork_locks[parent_id] = asyncio.Lock()
        return lock

    def _frozen_layers(self) -> FrozenLayers:
        if self._frozen is None:

            def scan() -> dict[str, list[str]]:
                out = {}
                for meta in list_metas(self.state_dir, self.name):
                    lowers = self._read_root(meta.id).get("lowers")
                    if isinstance(lowers, list):
                        out[meta.id] = [str(x) for x in lowers]
                return out

            self._frozen = FrozenLayers(os.path.join(self.state_dir, FROZEN_DIR), scan)
            self._freezer_v1 = freezer_mount()
        return self._frozen

    def _freezer(self, sandbox_id: str, quiet: bool = False) -> Freezer | None:
        self._frozen_layers()
        try:
            return Freezer(self.layout, self._cgroup(sandbox_id), self._freezer_v1)
        except RuntimeUnavailable:
            if quiet:
                return None
            raise

    def _running_meta(self, sandbox_id: str) -> SandboxMeta:
        meta = self._meta(sandbox_id)
        if not alive(meta):
            raise SandboxNotRunning(f"sandbox {sandbox_id!r} is not running")
        return meta

    def _freeze_copy(self, parent_id: str, shift: int) -> str:
        """Freeze the parent, copy its upper into a new frozen layer, thaw; the layer's path."""
        freezer = self._freezer(parent_id)
        assert freezer is not None
        upper = os.path.join(self._rw_dir(self._dir(parent_id)), "upper")
        dest = self._frozen_layers().new_path(parent_id)
        was_paused = freezer.frozen()
        freezer.freeze()
        try:
            copy_layer(upper, dest, shift)
        finally:
            if not was_paused:
                freezer.thaw()
        return dest

    async def fork(
        self,
        parent_id: str,
        child_ids: builtins.list[str],
        make_spec: Callable[[str, SandboxSpec], SandboxSpec],
    ) -> builtins.list[SandboxInfo]:
        """Children over one frozen copy of the parent's layer (see ``_fork``); not started."""
        meta = self._running_meta(parent_id)
        for child_id in child_ids:
            check_id(child_id)
        parent_spec = SandboxSpec.model_validate(meta.spec)
        root = self._read_root(parent_id)
        lowers = root.get("lowers")
        if not isinstance(lowers, list):
            raise SandboxNotRunning(f"sandbox {parent_id!r} has no recorded root")
        state = os.path.realpath(self.state_dir).rstrip("/") + "/"
        if any(state.startswith(os.path.realpath(str(d)).rstrip("/") + "/") for d in lowers):
            # The host-tools root has the host's / as a lower: the frozen layer (in the state
            # dir) would sit inside another layer, which overlayfs refuses (ELOOP).
            raise NotSupported(
                f"sandbox {parent_id!r} runs on the host-tools root; fork needs an image-backed "
                "sandbox"
            )
        specs = {cid: make_spec(cid, parent_spec) for cid in child_ids}
        async with self._fork_lock(parent_id):
            layer = await run_sync(self._freeze_copy, parent_id, meta.uid_base or 0)
        child_root = {**root, "lowers": [layer, *[str(x) for x in lowers]]}
        image_id = root.get("image_id")
        img = self.images.lookup(str(image_id)) if self.images and image_id else None
        layers = self._frozen_layers()
        made: builtins.list[str] = []

        async def child(child_id: str) -> SandboxInfo:
            layers.use(child_id, child_root["lowers"])  # type: ignore[arg-type]
            if img is not None and self.images is not None:
                self.images.acquire(img, child_id)
            made.append(child_id)
            cmeta = await run_sync(self._create_sync, child_id, specs[child_id], child_root)
            return self._info(cmeta)

        try:
            return list(await asyncio.gather(*(child(c) for c in child_ids)))
        except BaseException:
            for child_id in made:
                with contextlib.suppress(Exception):
                    await self.remove(child_id)
            raise
        finally:
            await run_sync(layers.drop_unused, layer)

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (no CPU; its memory stays resident)."""
        self._running_meta(sandbox_id)
        freezer = self._freezer(sandbox_id)
        assert freezer is not None
        async with self._fork_lock(sandbox_id):
            await run_sync(freezer.freeze)

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox (no error when it was not paused)."""
        self._meta(sandbox_id)
        freezer = self._freezer(sandbox_id)
        assert freezer is not None
        async with self._fork_lock(sandbox_id):
            await run_sync(freezer.thaw)

    def paused(self, sandbox_id: str) -> bool:
        """True while the sandbox is frozen."""
        freezer = self._freezer(sandbox_id, quiet=True)
        return freezer is not None and freezer.frozen()

    async def snapshot(self, sandbox_id: str, dest_dir: str) -> tuple[str, str, int]:
        """Pack the sandbox's files at one atomic point into ``dest_dir`` (see ``_snapshot``).

        Returns:
            (archive path, its sha256, its size in bytes).

        Raises:
            SandboxNotRunning: the sandbox is not running.
        """
        meta = self._running_meta(sandbox_id)
        layers = self._frozen_layers()
        recorded = self._read_root(sandbox_id).get("lowers")
        lowers = [str(x) for x in recorded] if isinstance(recorded, list) else []
        # A sandbox made from a snapshot or by a fork has files in frozen lowers too: they are
        # squashed with its upper, so the archive holds every file above the image.
        inherited = [x for x in lowers if layers.owns(x)]
        image = [x for x in lowers if not layers.owns(x)]
        async with self._fork_lock(sandbox_id):
            layer = await run_sync(self._freeze_copy, sandbox_id, meta.uid_base or 0)
        squashed: str | None = None
        try:
            if inherited:
                squashed = layers.new_path(sandbox_id)
                await run_sync(squash_layers, [*reversed(inherited), layer], squashed, image)
            return await run_sync(pack_layer, squashed or layer, dest_dir)
        finally:
            await run_sync(layers.drop_unused, layer)
            if squashed is not None:
                await run_sync(layers.drop_unused, squashed)

    async def restore(
        self, sandbox_id: str, spec: SandboxSpec, archive: str, sha256: str
    ) -> SandboxInfo:
        """Create (not start) a sandbox of ``spec`` whose files are a snapshot's.

        The archive's digest is checked before anything is made; on any error nothing is left.

        Raises:
            SnapshotCorrupt: the archive does not match ``sha256`` or does not unpack.
        """
        check_id(sandbox_id)
        layers = self._frozen_layers()
        layer = layers.new_path(f"snap-{sha256[:16]}")
        await run_sync(unpack_layer, archive, sha256, layer)
        try:
            root = await self._root(sandbox_id, spec)
            lowers = root.get("lowers")
            assert isinstance(lowers, list)
            root = {**root, "lowers": [layer, *[str(x) for x in lowers]], "snapshot": sha256}
            layers.use(sandbox_id, root["lowers"])  # type: ignore[arg-type]
            meta = await run_sync(self._create_sync, sandbox_id, spec, root)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.remove(sandbox_id)
            await run_sync(layers.drop_unused, layer)
            raise
        return self._info(meta)
