"""Node side of the reverse tunnel: a port in the sandbox whose connections reach the node.

:class:`ReverseTunnel` asks the rocklet to listen on ``127.0.0.1:port`` inside the sandbox
(``reverse.listen``; its network namespace, so ``network: none`` still holds) and, for every
connection the sandbox makes, opens one to the target given by ``connect`` on the node and
relays bytes both ways over the rocklet's frame channel (``reverse.attach``). Half-closes pass
through; a reset on either side ends both. At most ``max_connections`` run at once (more are
closed at once); per connection and direction at most ``REVERSE_WINDOW`` bytes are in flight
(sent, not yet written by the other side): the receiver acknowledges what it wrote.
Closing the tunnel (or the rocklet dying with its sandbox) ends every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from rock_serve.errors import RockletUnavailable
from rock_serve.rocklet.agent import CHUNK, REVERSE_WINDOW
from rock_serve.rocklet.handle import RockletHandle, _Call, _error

__all__ = ["Connector", "ReverseTunnel", "tcp_connector"]

log = logging.getLogger(__name__)

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def tcp_connector(host: str, port: int) -> Connector:
    """A connector that opens a TCP connection to ``host:port`` (on the node)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port)

    return connect


class ReverseTunnel:
    """One listening port in a sandbox relayed to ``connect()`` on the node."""

    def __init__(
        self,
        handle: RockletHandle,
        port: int,
        connect: Connector,
        *,
        max_connections: int = 256,
    ) -> None:
        self._handle = handle
        self.port = port
        self._connect = connect
        self._max = max_connections
        self._rid: int | None = None
        self._call = _Call()
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        #: Connections relayed so far.
        self.accepted = 0

    @property
    def active(self) -> int:
        """Connections being relayed now."""
        return len(self._conns)

    async def start(self) -> int:
        """Start listening in the sandbox; returns the bound port (``port`` 0 picks one)."""
        h = self._handle
        if h._error is not None:
            raise h._error
        rid = next(h._ids)
        h._calls[rid] = self._call
        self._rid = rid
        h._send({"id": rid, "op": "reverse.listen", "args": {"port": self.port}})
        await h._drain()
        while True:
            item = await self._call.queue.get()
            if isinstance(item, BaseException):
                h._calls.pop(rid, None)
                raise item
            header, data = item
            if header.get("type") == "error":
                h._calls.pop(rid, None)
                raise _error(header)
            if header.get("stream") == "listening":
                self.port = int(data)
                break
        self._task = asyncio.ensure_future(self._accept_loop())
        return self.port

    async def _accept_loop(self) -> None:
        while True:
            item = await self._call.queue.get()
            if isinstance(item, BaseException):
                return
            header, data = item
            if header.get("type") in ("error", "result"):
                return
            if header.get("stream") != "accept":
                continue
            cid = data.decode("ascii", "replace")
            task = asyncio.ensure_future(self._relay(cid))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _relay(self, cid: str) -> None:
        h = self._handle
        if len(self._conns) > self._max:
            # Over the limit: claim it and end it at once (the rocklet closes the socket).
            with contextlib.suppress(Exception):
                await h.request("reverse.attach", {"conn": cid, "reject": True})
            return
        self.accepted += 1
        try:
            reader, writer = await self._connect()
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("reverse tunnel %s:%d: target refused: %s", h.name, self.port, exc)
            with contextlib.suppress(Exception):
                await h.request("reverse.attach", {"conn": cid, "reject": True})
            return
        rid = next(h._ids)
        call = _Call()
        h._calls[rid] = call
        finished = False
        credit = [REVERSE_WINDOW]
        more = asyncio.Event()
        unacked = 0

        async def to_sandbox() -> None:
            while True:
                while credit[0] <= 0:
                    more.clear()
                    await more.wait()
                data = await reader.read(CHUNK)
                if not data:
                    h._send({"id": rid, "type": "end"})
                    await h._drain()
                    return
                credit[0] -= len(data)
                h._send({"id": rid, "type": "chunk"}, data)
                await h._drain()

        pump = asyncio.ensure_future(to_sandbox())
        try:
            h._send({"id": rid, "op": "reverse.attach", "args": {"conn": cid}, "more": True})
            await h._drain()
            while True:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    return
                header, data = item
                kind = header.get("type")
                if kind in ("result", "error"):
                    finished = True
                    return
                stream = header.get("stream")
                if stream == "eof":
                    if writer.can_write_eof():
                        writer.write_eof()
                    continue
                if stream == "ack":
                    credit[0] += int(data)
                    more.set()
                    continue
                writer.write(data)
                await writer.drain()
                unacked += len(data)
                if unacked >= REVERSE_WINDOW // 4:
                    ack = {"attach": rid, "bytes": unacked}
                    h._send({"id": next(h._ids), "op": "reverse.ack", "args": ack})
                    await h._drain()
                    unacked = 0
        except (ConnectionError, OSError, RockletUnavailable):
            pass
        finally:
            h._calls.pop(rid, None)
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if not finished and h._error is None:
                with contextlib.suppress(Exception):
                    h._send({"id": rid, "type": "cancel"})
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening and end every connection (idempotent)."""
        h = self._handle
        if self._rid is not None:
            h._calls.pop(self._rid, None)
            if h._error is None:
                with contextlib.suppress(Exception):
                    h._send({"id": self._rid, "type": "cancel"})
            self._rid = None
        tasks = [t for t in (self._task, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
