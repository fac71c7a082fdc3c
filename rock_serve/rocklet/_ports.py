"""Host side of the rocklet's ``port.connect``: one TCP connection to a port in the sandbox.

:class:`PortConnection` rides one request id of a :class:`~rock_serve.rocklet.handle.RockletHandle`
(see the "ports" block of ``agent.py`` for the frames). Both directions are flow controlled
with a window of unacknowledged bytes, so a slow reader on either side holds at most one
window per connection in memory, and a stalled connection never blocks the sandbox's other
requests on the same pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from rock_serve.errors import RockletUnavailable
from rock_serve.rocklet.agent import CHUNK, PORT_WINDOW
from rock_serve.rocklet.handle import RockletHandle, _Call, _error

__all__ = ["PortConnection"]


class PortConnection:
    """A byte stream to ``127.0.0.1:port`` inside a sandbox (``async with`` opens and closes it).

    :meth:`read` returns ``b""`` once the sandbox side closed its end; :meth:`write_eof`
    half-closes ours. :meth:`aclose` resets what is still open. ``sent``/``received`` count
    the bytes that went into and came out of the sandbox's socket.

    Raises (from :meth:`open`):
        PortClosed: nothing listens on the port.
        ResourceExhausted: the sandbox holds its limit of port connections.
    """

    def __init__(
        self,
        handle: RockletHandle,
        port: int,
        *,
        window: int = PORT_WINDOW,
        max_connections: int | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self._handle = handle
        self.port = port
        self._args: dict[str, Any] = {"port": port, "window": window}
        if max_connections is not None:
            self._args["max_connections"] = max_connections
        if connect_timeout is not None:
            self._args["connect_timeout"] = connect_timeout
        self._window = window
        self._rid: int | None = None
        self._call = _Call()
        self._pump: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None
        self._data: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._credit.set()
        self._unacked_out = 0  # bytes we sent that the rocklet has not acked
        self._consumed = 0  # bytes we read and have not acked yet
        self._eof = False  # the sandbox side closed its end
        self._eof_sent = False
        self._error: BaseException | None = None
        self._finished = False
        #: The rocklet's final counts, once both directions are done.
        self.result: dict[str, Any] | None = None
        #: Bytes written into / read from the connection on this side.
        self.sent = 0
        self.received = 0
        #: Bytes held here unread now, and the most ever held (the window bounds both).
        self.buffered = 0
        self.peak_buffered = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> PortConnection:
        """Connect; returns once the rocklet holds the connection."""
        h = self._handle
        if self._rid is not None:
            raise RuntimeError("this port connection is open already")
        if h._error is not None:
            raise h._error
        rid = next(h._ids)
        h._calls[rid] = self._call
        self._rid = rid
        self._opened = asyncio.get_running_loop().create_future()
        h._send({"id": rid, "op": "port.connect", "args": self._args, "more": True})
        await h._drain()
        self._pump = asyncio.ensure_future(self._run())
        try:
            await asyncio.shield(self._opened)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aenter__(self) -> PortConnection:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Reset the connection (unless both sides finished) and forget it; waits (up to
        ``timeout`` seconds) for the rocklet to confirm, so its slot is free on return.
        """
        if self._rid is None:
            return
        try:
            if not self._finished and self._handle._error is None:
                with contextlib.suppress(Exception):
                    self._handle._send({"id": self._rid, "type": "cancel"})
                    await self._handle._drain()
                if self._pump is not None and not self._pump.done():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self._pump), timeout)
        finally:
            self._finish(RockletUnavailable("the port connection is closed"))
            if self._pump is not None and not self._pump.done():
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)

    @property
    def closed(self) -> bool:
        """True once the connection ended (both sides done, reset, or closed here)."""
        return self._finished

    async def wait_closed(self) -> dict[str, Any] | None:
        """Wait until the rocklet reports both directions done; returns its counts."""
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)
        return self.result

    def _finish(self, error: BaseException | None) -> None:
        if not self._finished:
            self._finished = True
            if error is not None and self._error is None:
                self._error = error
        if self._rid is not None:
            self._handle._calls.pop(self._rid, None)
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(self._error or RockletUnavailable("connection ended"))
            self._opened.exception()  # retrieved: open() may have given up already
        self._readable.set()
        self._credit.set()

    async def _run(self) -> None:
        """Sort the rocklet's frames: data to the read buffer, acks to our credit."""
        try:
            while True:
                item = await self._call.queue.get()
                if isinstance(item, BaseException):
                    self._finish(item)
                    return
                header, data = item
                kind = header.get("type")
                if kind == "error":
                    self._finish(_error(header))
                    return
                if kind == "result":
                    self.result = header.get("data") or {}
                    self._eof = True
                    self._finish(None)
                    return
                stream = header.get("stream")
                if stream == "data":
                    self._data.append(data)
                    self.buffered += len(data)
                    self.peak_buffered = max(self.peak_buffered, self.buffered)
                    self._readable.set()
                elif stream == "ack":
                    n = header.get("n")
                    if isinstance(n, int):
                        self._unacked_out = max(self._unacked_out - n, 0)
                        if self._unacked_out < self._window:
                            self._credit.set()
                elif stream == "eof":
                    self._eof = True
                    self._readable.set()
                elif stream == "open" and self._opened is not None and not self._opened.done():
                    self._opened.set_result(None)
        except asyncio.CancelledError:
            self._finish(None)
            raise

    # ------------------------------------------------------------------ bytes

    def _id(self) -> int:
        if self._rid is None:
            raise RuntimeError("this port connection is not open")
        return self._rid

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (-1: what has come); ``b""`` once the sandbox side closed its end.

        Raises:
            RockletUnavailable (or the rocklet's error): the connection failed or was reset
                before its end was read.
        """
        self._id()
        while not self._data:
            if self._eof:
                return b""
            if self._finished:
                if self._error is not None:
                    raise self._error
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._data.popleft()
        if 0 <= n < len(chunk):
            self._data.appendleft(chunk[n:])
            chunk = chunk[:n]
        self.received += len(chunk)
        self.buffered -= len(chunk)
        self._consumed += len(chunk)
        if self._consumed >= self._window // 2 and not self._finished:
            # Credit back to the rocklet in batches of half a window (see agent.py).
            with contextlib.suppress(Exception):
                self._handle._send({"id": self._rid, "type": "ack", "n": self._consumed})
                await self._handle._drain()
            self._consumed = 0
        return chunk

    async def write(self, data: bytes) -> None:
        """Send bytes into the sandbox's socket; waits while a window of them is in flight.

        Raises:
            RockletUnavailable (or the rocklet's error): the connection has ended.
        """
        rid = self._id()
        if self._eof_sent:
            raise RuntimeError("write after write_eof")
        view = memoryview(data)
        while view:
            while self._unacked_out >= self._window and not self._finished:
                self._credit.clear()
                await self._credit.wait()
            if self._finished:
                raise self._error or RockletUnavailable("the port connection has ended")
            piece = bytes(view[:CHUNK])
            view = view[len(piece) :]
            self._unacked_out += len(piece)
            self._handle._send({"id": rid, "type": "chunk"}, piece)
            await self._handle._drain()
            self.sent += len(piece)

    async def write_eof(self) -> None:
        """Half-close: the sandbox's server reads EOF; its replies still come."""
        rid = self._id()
        if self._eof_sent or self._finished:
            return
        self._eof_sent = True
        self._handle._send({"id": rid, "type": "end"})
        await self._handle._drain()
