"""Chunked uploads into sandboxes: a file or a tar body arriving in pieces.

``open`` starts the rocklet's write with a body fed from a small queue (so a sender that is
ahead of the rocklet waits: backpressure), ``chunk`` queues a piece, ``close`` ends the body and
returns what was written, ``abort`` cancels the write (nothing partial is kept for a file).
Bodies are capped at the size the caller gives; an upload idle for longer than its idle
limit is aborted by :meth:`Uploads.reap`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from rock_serve.errors import InvalidRequest, NotFound, TooLarge
from rock_serve.rocklet.handle import RockletHandle

__all__ = ["QUEUE", "Uploads"]

log = logging.getLogger(__name__)

#: Chunks an upload may queue ahead of the rocklet (backpressure on the sender).
QUEUE = 4


@dataclass
class _Upload:
    sandbox_id: str
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    size: int = 0
    task: asyncio.Task[int] | None = None
    last: float = 0.0


async def _size_of(done: Awaitable[None]) -> int:
    await done
    return 0


async def _drain_queue(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


class Uploads:
    """The uploads in progress on one Worker, by id.

    Args:
        clock: the time, for idle reaping.
        max_bytes: the size cap of a body (read at each chunk: a redeploy applies at once).
        idle_seconds: how long an upload may go without a call (read at each reap).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        max_bytes: Callable[[], int],
        idle_seconds: Callable[[], float],
    ) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._uploads: dict[str, _Upload] = {}

    def __len__(self) -> int:
        return len(self._uploads)

    def __contains__(self, upload_id: object) -> bool:
        return upload_id in self._uploads

    def open(
        self, sandbox_id: str, handle: RockletHandle, kind: str, path: str, mode: int | None
    ) -> str:
        """Start writing a file (``kind="file"``) or extracting a tar (``"archive"``) at
        ``path``; returns the upload's id.

        Raises:
            InvalidRequest: an unknown ``kind``.
        """
        upload = _Upload(sandbox_id, last=self.clock())
        body = _drain_queue(upload.queue)
        if kind == "file":
            upload.task = asyncio.ensure_future(handle.write_file(path, body, mode=mode))
        elif kind == "archive":
            upload.task = asyncio.ensure_future(_size_of(handle.upload_tar(path, body)))
        else:
            raise InvalidRequest(f"unknown upload kind {kind!r}")
        upload_id = uuid.uuid4().hex
        self._uploads[upload_id] = upload
        return upload_id

    def _get(self, upload_id: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise NotFound(f"no upload {upload_id!r} (finished, aborted or timed out)")
        upload.last = self.clock()
        return upload

    async def chunk(
        self, upload_id: str, data: bytes, renew: Callable[[str], object] | None = None
    ) -> None:
        """Queue one chunk; waits while the rocklet is behind (backpressure).

        ``renew`` is called with the upload's sandbox id before queueing (the Worker renews
        the lease there, and fails the chunk if the sandbox is gone).

        Raises:
            NotFound: no such upload.
            TooLarge: the body passed the cap (the upload is aborted).
        """
        upload = self._get(upload_id)
        assert upload.task is not None
        upload.size += len(data)
        cap = self.max_bytes()
        if upload.size > cap:
            await self.abort(upload_id)
            raise TooLarge(f"body is over the {cap}-byte limit")
        if renew is not None:
            renew(upload.sandbox_id)
        put = asyncio.ensure_future(upload.queue.put(data))
        await asyncio.wait({put, upload.task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the write failed while we waited: report its error
            put.cancel()
            self._uploads.pop(upload_id, None)
            upload.task.result()
            raise InvalidRequest("the upload ended early")

    async def close(self, upload_id: str) -> int:
        """Finish an upload; returns the bytes written (file) or received (archive)."""
        upload = self._get(upload_id)
        assert upload.task is not None
        try:
            put = asyncio.ensure_future(upload.queue.put(None))
            await asyncio.wait({put, upload.task}, return_when=asyncio.FIRST_COMPLETED)
            written = await upload.task
        finally:
            self._uploads.pop(upload_id, None)
        return written if written else upload.size

    async def abort(self, upload_id: str) -> None:
        """Abandon an upload (a no-op if it is gone)."""
        upload = self._uploads.pop(upload_id, None)
        if upload is not None and upload.task is not None:
            upload.task.cancel()
            await asyncio.gather(upload.task, return_exceptions=True)

    async def reap(self, now: float) -> list[str]:
        """Abort every upload idle for longer than the idle limit; returns their ids."""
        limit = self.idle_seconds()
        idle = [uid for uid, up in self._uploads.items() if now - up.last > limit]
        for uid in idle:
            log.warning("aborting idle upload %s", uid)
            await self.abort(uid)
        return idle

    async def close_all(self) -> None:
        """Abort every upload (the Worker is shutting down)."""
        for uid in list(self._uploads):
            await self.abort(uid)
