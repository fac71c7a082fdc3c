"""Ports of a sandbox (``sandbox.ports``): URLs of its HTTP servers and raw TCP streams.

A server listening on ``127.0.0.1:PORT`` inside a sandbox is reachable from outside even with
``network: none``: the platform relays the bytes through the sandbox's rocklet.

- :meth:`AsyncSandboxPorts.url` is the HTTP (and WebSocket) proxy URL of a port; send the
  client's token with it as usual (or ``?token=`` for a browser).
- :meth:`AsyncSandboxPorts.connect` opens a raw TCP stream (a WebSocket tunnel):
  ``async with sb.ports.connect(8000) as stream: await stream.write(b"..."); await stream.read()``.

The sync module is generated from this one (``scripts/unasync.py``). Needs the ``websockets``
package (the ``cli`` extra) for :meth:`connect`.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rock_serve.errors import InvalidRequest, RockletUnavailable, from_body
from rock_serve.protocol.ports import TUNNEL_EOF, PortTunnelOpen

if TYPE_CHECKING:
    from rock_serve.sdk._async_sandbox import AsyncSandbox

__all__ = ["AsyncPortStream", "AsyncSandboxPorts"]


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequest(f"port {port!r} is not in 1..65535")
    return port


class AsyncSandboxPorts:
    """The ports of one sandbox (``sandbox.ports``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        """Bind to ``sandbox``.

        Args:
            sandbox: The sandbox whose ports these are.
        """
        self._sandbox = sandbox

    def url(self, port: int, path: str = "") -> str:
        """The HTTP proxy URL of ``path`` on ``port`` inside the sandbox.

        Args:
            port: The port a server listens on (127.0.0.1 or 0.0.0.0 inside the sandbox).
            path: Path (and query) on that server.

        Returns:
            ``<base>/v1/sandboxes/<id>/ports/<port>/<path>``; ``ws://`` for the same path with a
            WebSocket client is :meth:`ws_url`.
        """
        base = self._sandbox.client.settings.base_url.rstrip("/")
        return f"{base}/v1/sandboxes/{self._sandbox.id}/ports/{_check_port(port)}/" + path.lstrip(
            "/"
        )

    def ws_url(self, port: int, path: str = "") -> str:
        """The WebSocket proxy URL of ``path`` on ``port`` (``ws://`` or ``wss://``)."""
        url = self.url(port, path)
        return "ws" + url[4:] if url.startswith("http") else url

    def connect(self, port: int) -> AsyncPortStream:
        """A raw TCP stream to ``127.0.0.1:port`` inside the sandbox (use ``async with``).

        Raises (on entry):
            PortClosed: nothing listens on the port.
            SandboxNotFound: no such sandbox (or not in the caller's namespace).
            ResourceExhausted: the sandbox holds its limit of relayed connections.
        """
        url = self.ws_url(port, "tcp")
        token = self._sandbox.client.settings.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return AsyncPortStream(url, headers)


class AsyncPortStream:
    """A byte stream to a port in a sandbox: :meth:`read`, :meth:`write`, :meth:`write_eof`."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        """Prepare a stream to the tunnel ``url`` (opened by ``async with`` or :meth:`open`)."""
        self.url = url
        self._headers = headers
        self._ws: Any = None
        self._pending = b""
        self._eof = False

    async def open(self) -> AsyncPortStream:
        """Connect the tunnel; returns once the port in the sandbox accepted the connection."""
        try:
            from websockets.asyncio.client import connect
        except ImportError:  # pragma: no cover - the cli extra brings it
            raise RuntimeError("sandbox.ports.connect needs the websockets package") from None
        opener = connect(self.url, additional_headers=self._headers, max_size=None, open_timeout=60)
        self._ws = await opener.__aenter__()
        try:
            first = await self._ws.recv()  # PortTunnelOpen once connected, else an error
            body = json.loads(first) if isinstance(first, str) else {}
            if body.get("type") != "open":
                raise from_body(body)
            PortTunnelOpen.model_validate(body)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aenter__(self) -> AsyncPortStream:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def read(self) -> bytes:
        """The next bytes from the sandbox's side; ``b""`` once it closed its end.

        Raises:
            RockError: the platform ended the stream with an error (its typed class).
        """
        from websockets.exceptions import ConnectionClosed

        if self._eof or self._ws is None:
            return b""
        try:
            message = await self._ws.recv()
        except ConnectionClosed as exc:
            self._eof = True
            if exc.rcvd is not None and exc.rcvd.code not in (1000, 1001):
                raise RockletUnavailable(f"the tunnel closed with code {exc.rcvd.code}") from None
            return b""
        if isinstance(message, str):
            self._eof = True
            raise from_body(json.loads(message))
        return bytes(message)

    async def write(self, data: bytes) -> None:
        """Send bytes to the sandbox's side."""
        if self._ws is None:
            raise RuntimeError("the stream is not open")
        await self._ws.send(bytes(data))

    async def write_eof(self) -> None:
        """Half-close: the server in the sandbox reads EOF; its replies still come."""
        if self._ws is not None:
            await self._ws.send(TUNNEL_EOF)

    async def aclose(self) -> None:
        """Close the stream (the connection in the sandbox is reset if still open)."""
        if self._ws is not None:
            ws, self._ws = self._ws, None
            await ws.close()
