"""Per-sandbox cgroups on cgroup v1 and v2: paths, limits, OOM counts, kill and removal.

The path and limit computations are pure functions of a :class:`CgroupLayout` (parsed from
``/proc/self/mountinfo``), so both versions are unit-tested against a fake tree.
All operations are a few small file writes (well under a millisecond) and run inline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass

from rock_serve.errors import InvalidConfig, RuntimeUnavailable
from rock_serve.protocol import Resources

__all__ = ["CPU_PERIOD_US", "V1_CONTROLLERS", "Cgroup", "CgroupLayout", "limit_writes"]

#: CFS period used for CPU quotas (100 ms, the kernel default).
CPU_PERIOD_US = 100_000
#: v1 controllers a sandbox joins; memory and pids are required.
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_V1_REQUIRED = ("memory", "pids")
#: v2 controllers enabled for sandboxes.
V2_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class CgroupLayout:
    """Where the cgroup hierarchies are mounted.

    Attributes:
        version: 1 or 2.
        mounts: v1: controller name -> mount point of its hierarchy; v2: ``{"": mount point}``.
    """

    version: int
    mounts: dict[str, str]

    @classmethod
    def parse(cls, mountinfo: str) -> CgroupLayout | None:
        """Parse ``/proc/self/mountinfo`` text; None when no usable hierarchy is mounted.

        v1 wins when its memory and pids controllers are mounted (hybrid systems mount an
        empty cgroup2 tree next to them); otherwise a cgroup2 mount is used.
        """
        v1: dict[str, str] = {}
        v2: list[str] = []
        for line in mountinfo.splitlines():
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            if len(fields) < sep + 4 or sep < 5:
                continue
            mount_point = _unescape(fields[4])
            fstype, super_opts = fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup":
                for opt in super_opts.split(","):
                    if opt in V1_CONTROLLERS:
                        v1.setdefault(opt, mount_point)
            elif fstype == "cgroup2":
                v2.append(mount_point)
        if all(c in v1 for c in _V1_REQUIRED):
            return cls(1, v1)
        if v2:
            # Prefer the conventional location when several cgroup2 mounts exist.
            v2.sort(key=lambda p: (p != "/sys/fs/cgroup", len(p)))
            return cls(2, {"": v2[0]})
        return None

    @classmethod
    def detect(cls, mountinfo_path: str = "/proc/self/mountinfo") -> CgroupLayout | None:
        """Parse this process's mount table."""
        try:
            with open(mountinfo_path) as f:
                return cls.parse(f.read())
        except OSError:
            return None


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _clean_parent(parent: str) -> str:
    parts = [p for p in parent.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidConfig(f"bad cgroup_parent {parent!r}: use a relative path like 'rock-serve'")
    return "/".join(parts)


def limit_writes(
    layout: CgroupLayout, dirs: dict[str, str], resources: Resources
) -> list[tuple[str, str]]:
    """Compute the ``(file, value)`` writes that apply ``resources``, in order.

    Memory limits forbid swap (v1 ``memsw`` equal to the limit where the kernel accounts swap;
    v2 ``memory.swap.max=0``). CPU is a CFS quota of ``cpus * 100 ms`` per 100 ms.
    """
    writes: list[tuple[str, str]] = []
    if layout.version == 2:
        d = dirs[""]
        if resources.memory_mb is not None:
            writes.append((f"{d}/memory.max", str(resources.memory_mb << 20)))
            writes.append((f"{d}/memory.swap.max", "0"))
        if resources.pids is not None:
            writes.append((f"{d}/pids.max", str(resources.pids)))
        if resources.cpus is not None:
            quota = max(1000, int(resources.cpus * CPU_PERIOD_US))
            writes.append((f"{d}/cpu.max", f"{quota} {CPU_PERIOD_US}"))
        return writes
    if resources.memory_mb is not None:
        mem = str(resources.memory_mb << 20)
        writes.append((f"{dirs['memory']}/memory.limit_in_bytes", mem))
        writes.append((f"{dirs['memory']}/memory.memsw.limit_in_bytes", mem))
    if resources.pids is not None:
        writes.append((f"{dirs['pids']}/pids.max", str(resources.pids)))
    if resources.cpus is not None:
        if "cpu" not in dirs:
            raise InvalidConfig("a CPU limit needs the cgroup v1 cpu controller, not mounted here")
        quota = max(1000, int(resources.cpus * CPU_PERIOD_US))
        writes.append((f"{dirs['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US)))
        writes.append((f"{dirs['cpu']}/cpu.cfs_quota_us", str(quota)))
    return writes


_OPTIONAL_FILES = ("memory.memsw.limit_in_bytes", "memory.swap.max")


class Cgroup:
    """The cgroup(s) of one sandbox: ``<hierarchy>/<parent>/<name>`` for each controller."""

    def __init__(self, layout: CgroupLayout, parent: str, name: str) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise InvalidConfig(f"bad cgroup name {name!r}")
        self.layout = layout
        self.parent = _clean_parent(parent)
        self.name = name
        self.dirs: dict[str, str] = {
            ctrl: f"{mount}/{self.parent}/{name}" for ctrl, mount in layout.mounts.items()
        }

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process must be written to, one per hierarchy."""
        return [f"{d}/cgroup.procs" for d in sorted(set(self.dirs.values()))]

    def exists(self) -> bool:
        """True if any of the sandbox's cgroup directories exists."""
        return any(os.path.isdir(d) for d in self.dirs.values())

    def create(self, resources: Resources) -> None:
        """Create the directories and apply ``resources``.

        Raises:
            RuntimeUnavailable: the hierarchy is not writable or a controller cannot be enabled.
            InvalidConfig: a limit cannot be expressed on this system.
        """
        try:
            if self.layout.version == 2:
                self._enable_v2_controllers()
            for d in sorted(set(self.dirs.values())):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot create cgroup {self.parent}/{self.name}: {exc}"
            ) from None
        for path, value in limit_writes(self.layout, self.dirs, resources):
            try:
                _write(path, value)
            except FileNotFoundError:
                if os.path.basename(path) in _OPTIONAL_FILES:
                    continue  # the kernel does not account swap: nothing to forbid
                raise RuntimeUnavailable(f"cgroup file {path} is missing") from None
            except OSError as exc:
                raise InvalidConfig(f"cannot set {path} to {value}: {exc}") from None

    def _enable_v2_controllers(self) -> None:
        mount = self.layout.mounts[""]
        try:
            with open(f"{mount}/cgroup.controllers") as f:
                available = set(f.read().split())
        except OSError as exc:
            raise RuntimeUnavailable(f"cgroup v2 at {mount} is not usable: {exc}") from None
        wanted = [c for c in V2_CONTROLLERS if c in available]
        missing = {"memory", "pids"} - set(wanted)
        if missing:
            raise RuntimeUnavailable(f"cgroup v2 controllers missing at {mount}: {sorted(missing)}")
        node = mount
        for part in self.parent.split("/"):
            _enable(node, wanted)
            node = f"{node}/{part}"
            os.makedirs(node, exist_ok=True)
        _enable(node, wanted)

    def pids(self) -> list[int]:
        """Pids of every process in the sandbox's cgroup (empty when it does not exist)."""
        out: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                with open(procs) as f:
                    out.update(int(x) for x in f.read().split())
        return sorted(out)

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process until the cgroup is empty; True when it emptied in time."""
        kill_file = f"{self.dirs.get('', '')}/cgroup.kill"
        if self.layout.version == 2 and os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def remove(self, timeout: float = 2.0) -> None:
        """Kill what is left and remove the directories (EBUSY right after exit is retried)."""
        self.kill_all()
        deadline = time.monotonic() + timeout
        for d in sorted(set(self.dirs.values())):
            delay = 0.0005
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise RuntimeUnavailable(f"cannot remove cgroup {d}: {exc}") from None
                    self.kill_all(timeout=0.1)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        if self.layout.version == 2:
            path, key = f"{self.dirs['']}/memory.events", "oom_kill"
        else:
            path, key = f"{self.dirs['memory']}/memory.oom_control", "oom_kill"
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == key:
                        return int(parts[1])
        except (OSError, ValueError):
            pass
        return 0


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable(node: str, controllers: list[str]) -> None:
    try:
        with open(f"{node}/cgroup.subtree_control") as f:
            enabled = set(f.read().split())
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot read {node}/cgroup.subtree_control: {exc}") from None
    for ctrl in controllers:
        if ctrl in enabled:
            continue
        try:
            _write(f"{node}/cgroup.subtree_control", f"+{ctrl}")
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot enable the {ctrl} controller in {node} ({exc}); on cgroup v2 the parent "
                "must not hold processes itself (move them into a leaf cgroup)"
            ) from None
