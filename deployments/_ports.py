"""The Worker side of relayed ports: one rocklet ``port.connect`` per relayed connection.

The Admin (``_ports_api.py``) opens a connection with the streaming call :meth:`port_stream`
(read side, with Ray backpressure), and writes with :meth:`port_write` calls awaited one at a
time (each waits for the rocklet's credit), so neither direction buffers more than a window
plus a few chunks per connection. A connection ends when both sides are done, when the Admin
calls :meth:`port_close`, or when the sandbox goes (its rocklet handle closes: every
connection's read fails at once).

Wiring: the Worker class inherits :class:`PortsWorker`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rock_serve.config import ServerArgs
from rock_serve.errors import Conflict, InvalidRequest, NotFound
from rock_serve.rocklet._ports import PortConnection

__all__ = ["PortsWorker"]


class PortsWorker:
    """Mixin of the Worker: relayed connections by id (the Admin names them)."""

    args: ServerArgs
    _port_conn_table: dict[str, PortConnection]

    def _box(self, sandbox_id: str) -> Any: ...  # the Worker's (renews the lease)

    @property
    def _port_conns(self) -> dict[str, PortConnection]:
        conns: dict[str, PortConnection] | None = getattr(self, "_port_conn_table", None)
        if conns is None:
            conns = {}
            self._port_conn_table = conns
        return conns

    async def port_stream(
        self, sandbox_id: str, conn_id: str, port: int, first: bytes = b""
    ) -> AsyncIterator[bytes | str | dict[str, Any]]:
        """Connect to ``127.0.0.1:port`` in the sandbox, send ``first``, stream what comes back.

        Yields ``b""`` once connected (from then on :meth:`port_write` reaches it), then data
        chunks, ``"eof"`` when the sandbox side closed its end, and last the rocklet's counts
        ``{"sent", "received"}`` once both directions are done. Stopping the iteration resets
        the connection.

        Raises:
            PortClosed: nothing listens on ``port``.
            ResourceExhausted: the sandbox holds ``ports.max_connections`` already.
        """
        if not 0 < port < 65536:
            raise InvalidRequest(f"port {port} is not in 1..65535")
        if conn_id in self._port_conns:
            raise Conflict(f"port connection {conn_id!r} exists already")
        handle = self._box(sandbox_id).handle
        cfg = self.args.ports
        conn = PortConnection(
            handle,
            port,
            window=cfg.window_bytes,
            max_connections=cfg.max_connections,
            connect_timeout=cfg.connect_timeout_seconds,
        )
        await conn.open()
        self._port_conns[conn_id] = conn
        try:
            if first:
                await conn.write(first)
            yield b""
            while data := await conn.read():
                yield data
            yield "eof"
            yield await conn.wait_closed() or {"sent": conn.sent, "received": conn.received}
        finally:
            self._port_conns.pop(conn_id, None)
            await conn.aclose()

    def _port_conn(self, conn_id: str) -> PortConnection:
        conn = self._port_conns.get(conn_id)
        if conn is None:
            raise NotFound(f"no port connection {conn_id!r} (it has ended)")
        return conn

    async def port_write(self, conn_id: str, data: bytes) -> None:
        """Send bytes into the connection opened by :meth:`port_stream` (waits for credit)."""
        await self._port_conn(conn_id).write(data)

    async def port_write_eof(self, conn_id: str) -> None:
        """Half-close the connection: the sandbox's server reads EOF."""
        await self._port_conn(conn_id).write_eof()

    async def port_close(self, conn_id: str) -> None:
        """Reset the connection (a no-op once it has ended)."""
        conn = self._port_conns.pop(conn_id, None)
        if conn is not None:
            await conn.aclose()
