"""The one async interface every sandbox backend implements."""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING

from rock_serve.protocol import SandboxInfo, SandboxSpec

if TYPE_CHECKING:
    from rock_serve.rocklet.handle import RockletHandle

#: Label keys every runtime sets on every sandbox, so an owner can find its own again.
LABEL_ID = "rock.sandbox-id"
LABEL_OWNER = "rock.owner"
LABEL_RUNTIME = "rock.runtime"


class Runtime(abc.ABC):
    """A sandbox backend: bwrap, docker, local or fake.

    Life of a sandbox: :meth:`create` allocates it (rootfs, cgroup, container) without running
    anything; :meth:`start` runs the rocklet as the sandbox's first process and returns a
    connected :class:`~rock_serve.rocklet.handle.RockletHandle`; :meth:`stop` kills every
    process; :meth:`remove` frees everything (idempotent). :meth:`list` finds sandboxes by label,
    including ones made by an earlier owner, so a restarted owner can adopt or remove them.
    """

    #: Short name, e.g. ``"bwrap"``.
    name: str = ""

    @abc.abstractmethod
    async def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxInfo:
        """Allocate a sandbox; labels from ``spec`` plus the ``rock.*`` labels are attached.

        Raises:
            InvalidConfig: the spec asks for something this runtime cannot do.
            ImageNotFound: the image/rootfs does not exist.
            Conflict: a sandbox with this id exists already.
        """

    @abc.abstractmethod
    async def start(self, sandbox_id: str) -> RockletHandle:
        """Start the rocklet as the sandbox's first process and return a handle to it."""

    @abc.abstractmethod
    async def stop(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox; its files remain until :meth:`remove`."""

    @abc.abstractmethod
    async def remove(self, sandbox_id: str) -> None:
        """Remove processes, mounts, cgroups and files. Idempotent: a missing id is no error."""

    @abc.abstractmethod
    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        """Current state of one sandbox (``failed`` with a reason such as ``oom_killed``).

        Raises:
            SandboxNotFound: no such sandbox.
        """

    @abc.abstractmethod
    async def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        """Every sandbox of this runtime whose labels include all of ``labels``."""

    async def attach(self, sandbox_id: str) -> RockletHandle:
        """Reconnect to a sandbox still running from an earlier owner (a restarted Worker).

        Runtimes whose sandboxes die with their owner (bwrap, local: the rocklet is a child
        of the Worker) cannot; the Worker then removes the leftover instead.

        Raises:
            SandboxNotRunning: the sandbox cannot be reattached (this default, or it stopped).
            SandboxNotFound: no such sandbox.
        """
        from rock_serve.errors import SandboxNotRunning

        raise SandboxNotRunning(f"the {self.name} runtime cannot reattach {sandbox_id!r}")

    # -------------------------------------------------------------- fork, pause (issue 16)

    async def fork(
        self,
        parent_id: str,
        child_ids: builtins.list[str],
        make_spec: Callable[[str, SandboxSpec], SandboxSpec],
    ) -> builtins.list[SandboxInfo]:
        """Make ``child_ids`` from the files of the running ``parent_id`` at one atomic point.

        ``make_spec(child_id, parent_spec)`` gives each child's spec. Children are created,
        not started (as :meth:`create`). All or nothing: on an error no child is left.

        Raises:
            NotSupported: this runtime cannot fork (this default).
            SandboxNotRunning: the parent is not running.
        """
        from rock_serve.errors import NotSupported

        raise NotSupported(f"the {self.name} runtime cannot fork sandboxes")

    async def pause(self, sandbox_id: str) -> None:
        """Stop scheduling the sandbox's processes (they keep their memory); files stay.

        Raises:
            NotSupported: this runtime cannot pause (this default).
        """
        from rock_serve.errors import NotSupported

        raise NotSupported(f"the {self.name} runtime cannot pause sandboxes")

    async def resume(self, sandbox_id: str) -> None:
        """Undo :meth:`pause`.

        Raises:
            NotSupported: this runtime cannot pause (this default).
        """
        from rock_serve.errors import NotSupported

        raise NotSupported(f"the {self.name} runtime cannot pause sandboxes")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources held by the runtime itself (not the sandboxes)."""
