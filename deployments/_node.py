"""What one node can give a sandbox, and the check of a create's resources against it.

The protocol bounds :class:`~rock_serve.protocol.Resources` by maxima no node is expected to
pass; a Worker also refuses, with ``invalid_request``, what its own node cannot give (more
CPUs than it has, more memory than it has, a writable layer larger than its sandbox
filesystem, more pids than ``max_pids_per_sandbox``), so a create never answers 201 for a
sandbox whose limits are fiction.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from rock_serve.config import AnyRuntimeConfig, ServerArgs
from rock_serve.errors import OverCapacity
from rock_serve.protocol import Resources

__all__ = ["NodeCapacity", "check_resources", "effective_resources"]


def _memory_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    return None


def _disk_mb(path: str) -> int | None:
    """Size of the filesystem holding ``path`` (or its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while True:
        try:
            st = os.statvfs(path)
        except OSError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
            continue
        return st.f_blocks * st.f_frsize // (1 << 20)


@dataclass(frozen=True)
class NodeCapacity:
    """The node's CPUs, memory and sandbox filesystem size (None = unknown, not checked)."""

    cpus: int
    memory_mb: int | None
    disk_mb: int | None

    @classmethod
    def measure(cls, runtime: AnyRuntimeConfig) -> NodeCapacity:
        """Read this node's capacity; the disk is the one holding the runtime's state dir."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        state_dir = getattr(runtime, "state_dir", None) or tempfile.gettempdir()
        return cls(cpus=cpus, memory_mb=_memory_mb(), disk_mb=_disk_mb(state_dir))


def effective_resources(requested: Resources, runtime: AnyRuntimeConfig) -> Resources:
    """The limits a sandbox gets: the request's, with the runtime's defaults for unset fields."""
    defaults: Resources | None = getattr(runtime, "default_resources", None)
    if defaults is None:
        return requested
    return Resources(
        **{
            name: getattr(requested, name)
            if getattr(requested, name) is not None
            else getattr(defaults, name)
            for name in Resources.model_fields
        }
    )


def check_resources(resources: Resources, node: NodeCapacity, args: ServerArgs) -> None:
    """Refuse limits this node cannot give.

    Raises:
        OverCapacity: a field is over the node's capacity (``details['fields']`` names it).
    """
    problems: list[tuple[str, str]] = []
    if resources.cpus is not None and resources.cpus > node.cpus:
        problems.append(("cpus", f"cpus {resources.cpus:g} is over this node's {node.cpus}"))
    if (
        resources.memory_mb is not None
        and node.memory_mb is not None
        and resources.memory_mb > node.memory_mb
    ):
        problems.append(
            (
                "memory_mb",
                f"memory_mb {resources.memory_mb} is over this node's {node.memory_mb} MiB",
            )
        )
    if resources.pids is not None and resources.pids > args.max_pids_per_sandbox:
        problems.append(
            (
                "pids",
                f"pids {resources.pids} is over the limit of {args.max_pids_per_sandbox} "
                "per sandbox",
            )
        )
    if (
        resources.disk_mb is not None
        and node.disk_mb is not None
        and resources.disk_mb > node.disk_mb
    ):
        problems.append(
            (
                "disk_mb",
                f"disk_mb {resources.disk_mb} is over this node's sandbox filesystem of "
                f"{node.disk_mb} MiB",
            )
        )
    if problems:
        raise OverCapacity(
            "resources: " + "; ".join(text for _, text in problems),
            fields=[name for name, _ in problems],
        )
