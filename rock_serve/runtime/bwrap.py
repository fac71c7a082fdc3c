"""Bubblewrap runtime, the default: namespaces, an overlayfs root and cgroup limits per sandbox.

A sandbox ``<id>`` is:

- ``<state_dir>/<id>/``: ``meta.json``, ``agent.log`` (the rocklet's stderr) and the overlay's
  ``upper/``, ``work/`` and ``merged/``. The lower layer is the configured rootfs (the host's
  ``/`` by default) and stays read-only. Hidden paths (home directories, secrets, the state
  dir itself) are whiteouts and opaque directories in ``upper/``, so the sandbox cannot see
  them even through ``..`` tricks, and they cost no extra mounts.
- ``<hierarchy>/<cgroup_parent>/<id>`` in each cgroup hierarchy it needs, with its limits.
- A ``bwrap`` process with its own mount, pid, ipc, uts, cgroup and (unless the spec asks for
  and the config allows network) net namespace, ``--die-with-parent``, capabilities reduced
  to a Docker-like set, ``merged/`` as ``/``, a fresh ``/proc``, ``/dev`` and tmpfs ``/tmp``.
  It runs the rocklet from ``/.rock`` (agent.py and its .pyc, bind-mounted read-only)
  as the sandbox's first process. A ``/bin/sh`` wrapper writes its own pid into the cgroup's
  ``cgroup.procs`` files and then ``exec``-s bwrap, so bwrap and everything it starts are
  inside the limits from their first instruction (no ``nsenter``, no race).

Removal kills every process in the cgroup, unmounts everything under the sandbox directory,
removes the cgroup (retrying EBUSY) and deletes the directory only after checking that
nothing is mounted under it. Sandboxes of an earlier runtime instance on the same state dir
are listed, inspected and removed the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import json
import logging
import os
import posixpath
import shutil
import stat

from rock_serve.config import BwrapRuntimeConfig
from rock_serve.errors import (
    Conflict,
    ImageNotFound,
    InvalidConfig,
    InvalidRequest,
    RuntimeUnavailable,
    SandboxNotFound,
)
from rock_serve.protocol import FailureReason, Resources, SandboxInfo, SandboxSpec
from rock_serve.rocklet.handle import RockletHandle, agent_argv, install_agent
from rock_serve.runtime._cgroup import Cgroup, CgroupLayout
from rock_serve.runtime._image_python import PYTHON_MOUNT, NodePython, node_python_bundle
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
from rock_serve.runtime.base import Runtime
from rock_serve.runtime.images import ImageStore

__all__ = ["AGENT_MOUNT", "BwrapRuntime", "mounts_under"]

log = logging.getLogger(__name__)

#: Where the rocklet program (and its compiled __pycache__) appears inside a sandbox.
AGENT_MOUNT = "/.rock"
#: Seconds to wait for a fresh rocklet's first reply.
START_TIMEOUT = 30.0
_MNT_DETACH = 2
_OPAQUE = "trusted.overlay.opaque"
#: Longest overlay option string that mount(2) takes (one page) with room to spare.
_MAX_MOUNT_DATA = 4000
#: A sandbox's root: its lower dirs (lowest first) and the image config the start honours.
_ROOT_FILE = "root.json"
#: Runs as the sandbox's host-side first process: joins the cgroups, then becomes bwrap.
_JOIN_AND_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


_LIBC: ctypes.CDLL | None = None


def _sys_mount(source: str, target: str, fstype: str, data: str) -> None:
    global _LIBC
    _LIBC = _LIBC or _libc()
    if _LIBC.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
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


def _overlay_mount(merged: str, lowers: list[str], upper: str, work: str) -> None:
    """Mount an overlay of ``lowers`` (lowest first); many layers go through short fd paths."""
    top_first = list(reversed(lowers))
    opts = f"lowerdir={':'.join(top_first)},upperdir={upper},workdir={work}"
    if len(opts) <= _MAX_MOUNT_DATA:
        _sys_mount("overlay", merged, "overlay", opts)
        return
    fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in top_first]
    try:
        short = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        opts = f"lowerdir={short},upperdir={upper},workdir={work}"
        _sys_mount("overlay", merged, "overlay", opts)
    finally:
        for fd in fds:
            os.close(fd)


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

    def apply(self, upper: str) -> None:
        target = os.path.join(upper, self.rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if self.is_dir:
            os.mkdir(target, self.mode)
            os.chown(target, self.uid, self.gid)
            os.chmod(target, self.mode)
            os.setxattr(target, _OPAQUE, b"y")
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
        self.images = ImageStore(config.images) if config.images is not None else None
        self._node_python: NodePython | None = None
        if self.images is not None:
            self._adopt_images(self.images)
        self._hides: dict[str, list[_Hide]] = {}
        self._handles: dict[str, RockletHandle] = {}

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

    def _lower(self, spec: SandboxSpec) -> str:
        """A host directory as the lower layer (the rootfs, or an absolute path image)."""
        if spec.image is None:
            return self.rootfs
        if not os.path.isabs(spec.image) or not os.path.isdir(spec.image):
            raise ImageNotFound(f"rootfs {spec.image!r} is not an absolute path to a directory")
        lower = os.path.realpath(spec.image)
        _check_path_option(lower, "rootfs")
        return lower

    async def _root(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, object]:
        """Resolve the spec's image (pulling it) into lowers + the config the start honours."""
        ref = spec.image
        if self.images is None or (ref is not None and ref.startswith("/")):
            return {"lowers": [self._lower(spec)], "host": True}
        img = await self.images.get(ref or self.images.config.default_image, spec.registry_auth)
        self.images.acquire(img, sandbox_id)
        return {
            "lowers": self.images.layer_dirs(img),
            "host": False,
            "image_id": img.id,
            "env": img.env_dict(),
            "workdir": img.workdir,
            "python": img.python,
        }

    def _adopt_images(self, store: ImageStore) -> None:
        """Sandboxes of an earlier instance keep their images in use."""
        for meta in list_metas(self.state_dir, self.name):
            root = self._read_root(meta.id)
            img = store.lookup(str(root.get("image_id") or "")) if root.get("image_id") else None
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
            self._node_python = node_python_bundle(os.path.join(self.state_dir, ".python"))
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
        try:
            upper = os.path.join(path, "upper")
            for sub in ("upper", "work", "merged"):
                os.mkdir(os.path.join(path, sub), 0o755)
            lowers = [str(d) for d in root["lowers"]]  # type: ignore[attr-defined]
            if root.get("host"):
                for hide in self._hidden(lowers[0]):
                    hide.apply(upper)
            if not root.get("host") and not root.get("python"):
                self._python_argv(root)  # makes the node's python bundle once, off the loop
            with open(os.path.join(path, _ROOT_FILE), "w") as f:
                json.dump(root, f)
            self._mount(path, lowers)
            self._cgroup(sandbox_id).create(self._resources(spec))
            meta = SandboxMeta(
                id=sandbox_id,
                runtime=self.name,
                image=spec.image,
                labels=labels_for(sandbox_id, spec, self.name),
                spec=spec.model_dump(mode="json"),
            )
            write_meta(path, meta)
        except BaseException:
            with contextlib.suppress(Exception):
                self._remove_sync(sandbox_id)
            raise
        return meta

    def _mount(self, path: str, lowers: list[str]) -> None:
        merged = os.path.join(path, "merged")
        try:
            _overlay_mount(merged, lowers, f"{path}/upper", f"{path}/work")
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot mount the overlay root at {merged} ({exc}); the state dir must be on "
                "a filesystem that can hold an overlay upper layer (not overlayfs itself)"
            ) from None

    def _prepare_start(self, sandbox_id: str, meta: SandboxMeta, spec: SandboxSpec) -> Cgroup:
        """Re-create what a reboot loses (the mount, the cgroup) before a start."""
        path = self._dir(sandbox_id)
        if not os.path.ismount(os.path.join(path, "merged")):
            lowers = self._read_root(sandbox_id).get("lowers") or [self._lower(spec)]
            self._mount(path, [str(d) for d in lowers])  # type: ignore[attr-defined]
        cg = self._cgroup(sandbox_id)
        if not cg.exists():
            cg.create(self._resources(spec))
        return cg

    def _remove_sync(self, sandbox_id: str) -> None:
        path = self._dir(sandbox_id)
        cg = self._cgroup(sandbox_id)
        if cg.exists():
            cg.kill_all()
        if os.path.isdir(path):
            _unmount_all(path)
        if cg.exists():
            cg.remove()
        if os.path.isdir(path):
            if mounts_under(path):  # pragma: no cover - _unmount_all raised already
                raise RuntimeUnavailable(f"refusing to delete {path}: something is mounted in it")
            shutil.rmtree(path)

    # ------------------------------------------------------------------ argv

    def argv(self, sandbox_id: str, spec: SandboxSpec, cg: Cgroup) -> list[str]:
        """The full command that starts the sandbox (cgroup join, bwrap, rocklet)."""
        cfg = self.config
        root = self._read_root(sandbox_id)
        workdir = spec.workdir
        if workdir == "/root" and root.get("workdir"):
            workdir = str(root["workdir"])  # the image's WorkingDir, unless the spec sets one
        workdir = posixpath.normpath(workdir)
        if not workdir.startswith("/"):
            raise InvalidRequest(f"workdir {spec.workdir!r} must be absolute")
        args = [self.bwrap, "--die-with-parent", "--new-session"]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        if spec.network == "none":
            args.append("--unshare-net")
        args += ["--hostname", sandbox_id[:63]]
        args += ["--bind", os.path.join(self._dir(sandbox_id), "merged"), "/"]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/sys"]
        if self.layout.version == 2:
            args += ["--ro-bind", cg.dirs[""], "/sys/fs/cgroup"]
        else:
            for ctrl, d in sorted(cg.dirs.items()):
                args += ["--ro-bind", d, f"/sys/fs/cgroup/{ctrl}"]
        args += ["--ro-bind", self.agent_dir, AGENT_MOUNT]
        py_mounts, python = self._python_argv(root)
        args += py_mounts
        args += ["--dir", workdir, "--chdir", workdir]
        env = {"PATH": cfg.path, "HOME": "/root", "LANG": "C.UTF-8", "HOSTNAME": sandbox_id[:63]}
        image_env = root.get("env")
        if isinstance(image_env, dict):
            env.update({str(k): str(v) for k, v in image_env.items()})
        env.update(spec.env)
        args.append("--clearenv")
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += ["--cap-drop", "ALL"]
        for cap in cfg.capabilities:
            args += ["--cap-add", cap]
        args += ["--", *python, *agent_argv("python3", AGENT_MOUNT, "--root", "/")[1:]]
        return ["/bin/sh", "-c", _JOIN_AND_EXEC, "rock-sandbox", *cg.procs_files, "--", *args]

    # ------------------------------------------------------------------ Runtime API

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Make the overlay root, the cgroup with its limits and the record; nothing runs yet."""
        check_id(sandbox_id)
        if spec.network != "none" and not self.config.allow_network:
            raise InvalidConfig(
                f"network {spec.network!r} is not allowed by this runtime (allow_network=false)"
            )
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
        if not os.path.ismount(os.path.join(self._dir(sandbox_id), "merged")) or not cg.exists():
            cg = await run_sync(self._prepare_start, sandbox_id, meta, spec)
        argv = self.argv(sandbox_id, spec, cg)
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
        parent = store.lookup(str(root.get("image_id"))) if store and root.get("image_id") else None
        if store is None or parent is None:
            raise InvalidRequest(f"sandbox {sandbox_id!r} is not made from a stored image")
        upper = os.path.join(self._dir(sandbox_id), "upper")
        skip = frozenset({AGENT_MOUNT.lstrip("/"), PYTHON_MOUNT.lstrip("/")})
        img = await store.commit(upper, parent, f"{repo}:{tag}", skip)
        return img.refs[0]

    async def oom_kills(self, sandbox_id: str) -> int:
        """How many processes of the sandbox the kernel OOM-killed so far."""
        self._meta(sandbox_id)
        return self._cgroup(sandbox_id).oom_kills()

    async def close(self) -> None:
        """Forget the handles; sandboxes keep running until stopped or removed (or we exit)."""
        self._handles.clear()
        if self.images is not None:
            await self.images.close()

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
