"""A Worker's warm pools: sandboxes made and started ahead of the creates that take them.

Each pool is a spec (the default one, then each of ``warm_pools``) and a target size, held to
the room the node has left. One fill loop keeps each pool at its target, one sandbox at a time
so it never crowds creates, and shrinks pools that are over it. :meth:`WarmPool.shutdown`
cancels the loop and the refill in flight, awaits both (a cancelled refill removes what it
had made), then removes every pooled sandbox: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable

from rock_serve.config import ServerArgs
from rock_serve.deployments._trace import untraced_task
from rock_serve.deployments._worker_table import LABEL_WORKER, Box
from rock_serve.protocol import SandboxRecord, SandboxSpec, SandboxState
from rock_serve.runtime.base import Runtime

__all__ = ["LABEL_WARM", "PoolTarget", "WarmPool", "pool_key", "pool_targets"]

log = logging.getLogger(__name__)

#: Label of sandboxes made for the warm pool (a restarted Worker removes them).
LABEL_WARM = "rock.warm"

#: (key, spec, target) of one pool.
PoolTarget = tuple[str, SandboxSpec, int]


def pool_key(spec: SandboxSpec) -> str:
    """Which warm pool can serve ``spec`` (equal keys: interchangeable sandboxes)."""
    return json.dumps(spec.model_dump(mode="json", exclude={"labels", "owner"}), sort_keys=True)


def pool_targets(args: ServerArgs, runtime: Runtime | None, room: int) -> list[PoolTarget]:
    """Each pool's target: the default one, then ``warm_pools``, within ``room`` places.

    Runtimes that can reattach (docker, gvisor) keep no pool.
    """
    if runtime is None or runtime.name in ("docker", "gvisor"):
        return []
    out = []
    pools = [(SandboxSpec(), args.warm_pool_size)] + [
        (SandboxSpec(image=p.image, resources=p.resources), p.size) for p in args.warm_pools
    ]
    for spec, size in pools:
        target = max(0, min(size, room))
        room -= target
        out.append((pool_key(spec), spec, target))
    return out


class WarmPool:
    """The started sandboxes waiting for a create, and the loop that keeps them coming.

    Args:
        worker: the Worker's short name (in ids and labels).
        node_id: the node's id (in records).
        clock: the time.
        runtime: the runtime new sandboxes are made with (None while it is unusable).
        targets: each pool's (key, spec, target) now.
        changed: called after the loop changed the pools (metrics).
    """

    def __init__(
        self,
        worker: str,
        node_id: str,
        clock: Callable[[], float],
        runtime: Callable[[], Runtime | None],
        targets: Callable[[], list[PoolTarget]],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.worker = worker
        self.node_id = node_id
        self.clock = clock
        self.runtime = runtime
        self.targets = targets
        self.changed = changed
        self.boxes: list[Box] = []
        self.wanted = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._discarding: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self.boxes)

    def start(self) -> None:
        """Start the fill loop (idempotent)."""
        if self._loop is None and not self._closed:
            self._loop = untraced_task(self._run())
        self.wanted.set()

    def want(self) -> None:
        """Ask the loop to look again (room or targets changed)."""
        self.wanted.set()

    async def _run(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted.clear()
            if self._closed:
                return
            targets = self.targets()
            for key, spec, target in targets:
                while sum(b.pool == key for b in self.boxes) < target and not self._closed:
                    if self.runtime() is None:
                        break
                    try:
                        box = await self.make(spec, key)
                    except Exception as exc:
                        log.warning("worker %s: warm pool refill failed: %r", self.worker, exc)
                        break
                    self.boxes.append(box)
            wanted = {key: target for key, _, target in targets}
            for box in list(reversed(self.boxes)):
                if sum(b.pool == box.pool for b in self.boxes) > wanted.get(box.pool, 0):
                    self.boxes.remove(box)
                    await self._discard_soon(box)
            self.changed()

    async def make(self, spec: SandboxSpec | None = None, key: str = "") -> Box:
        """Make and start one pooled sandbox of ``spec``; on any failure (or cancellation)
        nothing is left behind.
        """
        runtime = self.runtime()
        assert runtime is not None
        sandbox_id = f"sb-{self.worker}-{secrets.token_hex(8)}"
        record = SandboxRecord(
            id=sandbox_id,
            state=SandboxState.RUNNING,
            worker=self.worker,
            node_id=self.node_id,
            created_at=self.clock(),
        )
        spec = (spec or SandboxSpec()).model_copy(
            update={"labels": {LABEL_WORKER: self.worker, LABEL_WARM: "1"}}
        )
        record.image, record.resources = spec.image, spec.resources
        try:
            await runtime.create(sandbox_id, spec)
            handle = await runtime.start(sandbox_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(runtime.remove(sandbox_id))
            raise
        return Box(record, handle, runtime, pool=key or pool_key(spec))

    def take(self, spec: SandboxSpec) -> Box | None:
        """A started sandbox from the pool whose spec is ``spec``, if any (made by the
        current runtime and with its rocklet alive; others are discarded).
        """
        if not self.boxes:
            return None
        key = pool_key(spec)
        while True:
            box = next((b for b in self.boxes if b.pool == key), None)
            if box is None:
                break
            self.boxes.remove(box)
            if box.handle.alive and box.runtime is self.runtime():
                self.wanted.set()
                box.pool = ""
                return box
            self._discard_later(box)
        self.wanted.set()
        return None

    @staticmethod
    async def discard(box: Box) -> None:
        """Close a pooled sandbox's rocklet and remove it (errors are ignored)."""
        with contextlib.suppress(Exception):
            await box.handle.close()
        with contextlib.suppress(Exception):
            await box.runtime.remove(box.record.id)

    def _discard_later(self, box: Box) -> asyncio.Task[None]:
        task = untraced_task(self.discard(box))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)
        return task

    async def _discard_soon(self, box: Box) -> None:
        # A task of its own: cancelling the loop does not cut a removal short.
        await asyncio.shield(self._discard_later(box))

    async def drain(self) -> None:
        """Remove every pooled sandbox (e.g. the runtime changed)."""
        while self.boxes:
            await self.discard(self.boxes.pop())

    async def shutdown(self) -> None:
        """Stop for good: cancel the loop and its refill in flight, await them, then remove
        every pooled sandbox (those the refill made included).
        """
        self._closed = True
        if self._loop is not None:
            self._loop.cancel()
            self.wanted.set()  # a refill that swallowed the cancel still ends the loop
            await asyncio.gather(self._loop, return_exceptions=True)
        await asyncio.gather(*self._discarding, return_exceptions=True)
        await self.drain()
