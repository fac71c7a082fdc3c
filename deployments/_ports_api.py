"""Relayed ports on the Admin: reach ``127.0.0.1:PORT`` inside a sandbox from outside.

With ``network: none`` in force the bytes go Admin -> Worker -> rocklet ``port.connect``
(see ``_ports.py`` and the "ports" block of ``rocklet/agent.py``). Routes:

- ``/v1/sandboxes/{id}/ports/{port}/{path}``, any method: an HTTP reverse proxy, one relayed
  connection per request. Bodies stream both ways (flow controlled end to end); hop-by-hop
  headers and our own credential (the ``Authorization``-style header, the ``token`` query
  parameter or the console's cookies, whichever carried it) are not forwarded. The upstream
  sees ``Host: localhost:PORT`` and ``X-Forwarded-{For,Host,Proto,Prefix}``.
- The same URL as a WebSocket: the handshake is repeated to the sandbox's server (path, query,
  subprotocols), then messages are relayed both ways; close codes pass through.
- ``/v1/sandboxes/{id}/ports/{port}/tcp`` (WebSocket): a raw TCP tunnel; binary frames are
  bytes both ways, a text frame ``eof`` half-closes the client's side. Once connected the
  server sends the text frame ``{"type": "open", "port": N}`` first. The sandbox's
  server closing its end closes the WebSocket (1000). (``tcp`` is reserved: a sandbox app's
  own WebSocket at ``/tcp`` cannot be proxied.)

Errors before a response or an accept use the one error body: nothing listening is
``port_closed`` (502). On a WebSocket the error body comes as a text frame, then close code
1008 (refused: auth, not found, limits) or 1014 (bad gateway: port closed, upstream failed).
Auth and namespaces are those of every data-plane call; a viewer token cannot reach ports.
Every connection is audited twice: ``port.open`` and ``port.close`` with its byte counts.
Deleting the sandbox ends its connections (the rocklet's pipe closes).

The routes are left out of the OpenAPI schema: a proxy's methods, bodies and statuses are
the sandbox server's, not ours to describe (``protocol/api.py`` lists them).

Wiring: ``admin.py`` includes :data:`router` (one line); the Admin instance is this replica's
servable object.
"""

# No "from __future__ import annotations": FastAPI reads these annotations at include time.

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import h11
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect, WebSocketState

from rock_serve.auth import Principal
from rock_serve.deployments._audit import AuditEvent
from rock_serve.deployments._auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    check_cookie_request,
    request_token,
    set_caller,
)
from rock_serve.deployments._ports import PortsWorker
from rock_serve.deployments._ray import ActorHandle, call, stream_ahead
from rock_serve.errors import InvalidRequest, PortClosed, RockError, to_body
from rock_serve.protocol.ports import TUNNEL_EOF, PortTunnelOpen

__all__ = ["router"]

router = APIRouter(tags=["ports"])

_PREFIX = "/v1/sandboxes/{sandbox_id}/ports/{port}"
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Headers that describe one hop, never forwarded (RFC 9110 7.6.1, plus proxy ones).
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
#: Headers that may carry our credential (see ``_auth.request_token``).
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-key", "x-api-key", "xrl-authorization"})
#: Bytes per Worker write call (each waits for the rocklet's credit).
_WRITE_CHUNK = 1 << 20
#: Items the Worker's read stream may run ahead of this replica (Ray backpressure).
_READ_AHEAD = 8


#: Background closes in flight (a strong reference each, so none is collected mid-way).
_CLOSING: set[asyncio.Task[None]] = set()


def _admin() -> Any:
    from ray import serve  # here: the helpers below are usable (and tested) without Serve

    return serve.get_replica_context().servable_object


# ----------------------------------------------------------------------------- tunnel


class _Tunnel:
    """One relayed connection seen from the Admin: read/write through the Worker."""

    def __init__(self, worker: ActorHandle, sandbox_id: str, port: int) -> None:
        self.worker = worker
        self.sandbox_id = sandbox_id
        self.port = port
        self.conn_id = uuid.uuid4().hex
        self._items: AsyncIterator[Any] | None = None
        self._eof = False
        self.sent = 0
        self.received = 0
        self.opened = time.perf_counter()

    async def open(self, first: bytes = b"") -> None:
        """Connect; ``first`` is sent right after (saves a round trip for small requests)."""
        self._items = stream_ahead(
            _READ_AHEAD,
            self.worker,
            PortsWorker.port_stream,
            self.sandbox_id,
            self.conn_id,
            self.port,
            first,
        )
        self.sent += len(first)
        try:
            await self._items.__anext__()  # b"": connected
        except StopAsyncIteration:
            raise PortClosed(f"port {self.port} closed at once", port=self.port) from None

    async def read(self) -> bytes:
        """Bytes from the sandbox; ``b""`` once its side closed (or the connection ended)."""
        assert self._items is not None
        while not self._eof:
            try:
                item = await self._items.__anext__()
            except StopAsyncIteration:
                self._eof = True
                break
            if isinstance(item, bytes):
                if item:
                    self.received += len(item)
                    return item
            else:
                self._eof = True
        return b""

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), _WRITE_CHUNK):
            piece = data[i : i + _WRITE_CHUNK]
            await call(self.worker, PortsWorker.port_write, self.conn_id, piece)
            self.sent += len(piece)

    async def write_eof(self) -> None:
        await call(self.worker, PortsWorker.port_write_eof, self.conn_id)

    async def close(self) -> None:
        """Reset what is left of the connection and end the Worker's stream."""
        with contextlib.suppress(Exception):
            await call(self.worker, PortsWorker.port_close, self.conn_id)
        if self._items is not None:
            with contextlib.suppress(Exception):
                await self._items.aclose()  # type: ignore[attr-defined]

    def close_soon(self) -> None:
        """:meth:`close` in the background (off a response's critical path)."""
        task = asyncio.ensure_future(self.close())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)


# ----------------------------------------------------------------------------- auth, audit


def _credential(conn: HTTPConnection) -> tuple[str | None, str]:
    """The caller's token and where it came from: ``header``, ``query``, ``cookie`` or ``-``."""
    token = request_token(conn)
    if token is not None:
        return token, "header"
    token = conn.query_params.get("token") or None
    if token is not None:
        return token, "query"
    token = conn.cookies.get(SESSION_COOKIE)
    if token is not None:
        check_cookie_request(conn)
        return token, "cookie"
    return None, "-"


def _authenticate(admin: Any, conn: HTTPConnection) -> tuple[Principal, str]:
    try:
        token, carrier = _credential(conn)
        principal: Principal = admin.authenticator.authenticate(token)
        principal.require_act("reach a port of a sandbox")
    except RockError as exc:
        admin.auth_failed(conn, exc)
        raise
    set_caller(principal)
    return principal, carrier


def _audit_close(
    admin: Any, conn: HTTPConnection, principal: Principal, tunnel: _Tunnel, kind: str, code: str
) -> None:
    if admin._audit.enabled:
        admin._audit.record(
            AuditEvent(
                action="port.close",
                token_name=principal.name,
                namespace=principal.namespace,
                admin=principal.admin,
                sandbox_id=tunnel.sandbox_id,
                status=200,
                code=code,
                duration_ms=round((time.perf_counter() - tunnel.opened) * 1000, 3),
                client=conn.client.host if conn.client else None,
                detail={
                    "port": tunnel.port,
                    "kind": kind,
                    "sent": tunnel.sent,
                    "received": tunnel.received,
                },
            )
        )


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise InvalidRequest(f"port {port} is not in 1..65535")


async def _open(
    admin: Any,
    conn: HTTPConnection,
    principal: Principal,
    sandbox_id: str,
    port: int,
    kind: str,
    status: int,
    first: bytes = b"",
) -> _Tunnel:
    """Check the port and the caller's namespace, connect (then send ``first``); audited as
    ``port.open``.
    """
    detail = {"port": port, "kind": kind}
    async with admin._audited(conn, principal, "port.open", sandbox_id, status=status) as event:
        event["detail"].update(detail)
        _check_port(port)
        tunnel = _Tunnel(await admin._worker(sandbox_id), sandbox_id, port)
        try:
            await tunnel.open(first)
        except BaseException:
            await tunnel.close()
            raise
    return tunnel


def _upstream_query(conn: HTTPConnection, carrier: str) -> str:
    query = conn.url.query
    if carrier == "query":  # our token must not reach the sandbox's server
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
        query = urlencode(pairs)
    return query


def _upstream_headers(conn: HTTPConnection, carrier: str, port: int) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones and our credential, plus X-Forwarded-*."""
    connection_tokens = {
        t.strip().lower() for t in conn.headers.get("connection", "").split(",") if t.strip()
    }
    out: list[tuple[str, str]] = []
    for name, value in conn.headers.items():
        lower = name.lower()
        if lower in _HOP or lower in connection_tokens or lower.startswith("sec-websocket-"):
            continue
        if carrier == "header" and lower in _CREDENTIAL_HEADERS:
            continue
        if lower == "cookie":
            ours = (SESSION_COOKIE, CSRF_COOKIE)
            kept = [c.strip() for c in value.split(";") if c.split("=", 1)[0].strip() not in ours]
            kept = [c for c in kept if c]
            if kept:
                out.append(("cookie", "; ".join(kept)))
            continue
        out.append((lower, value))
    sandbox_id = conn.path_params.get("sandbox_id", "")
    out += [
        ("host", f"localhost:{port}"),
        ("x-forwarded-for", conn.client.host if conn.client else ""),
        ("x-forwarded-host", conn.headers.get("host", "")),
        ("x-forwarded-proto", "https" if conn.url.scheme in ("https", "wss") else "http"),
        ("x-forwarded-prefix", f"/v1/sandboxes/{sandbox_id}/ports/{port}"),
    ]
    return out


# ----------------------------------------------------------------------------- HTTP


async def _next_event(h: h11.Connection, tunnel: _Tunnel) -> Any:
    """The upstream's next HTTP event, reading from the tunnel as needed."""
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise PortClosed(
                f"the server on port {tunnel.port} sent a malformed response: {exc}",
                port=tunnel.port,
                reason="bad_response",
            ) from None
        if event is h11.NEED_DATA:
            h.receive_data(await tunnel.read())
            continue
        return event


async def _send_body(h: h11.Connection, tunnel: _Tunnel, request: Request) -> None:
    async for chunk in request.stream():
        if chunk:
            await tunnel.write(h.send(h11.Data(data=chunk)))
    await tunnel.write(h.send(h11.EndOfMessage()))


@router.api_route(_PREFIX + "/", methods=_METHODS, include_in_schema=False)
@router.api_route(_PREFIX + "/{path:path}", methods=_METHODS, include_in_schema=False)
async def proxy_http(request: Request, sandbox_id: str, port: int, path: str = "") -> Response:
    """Relay this request to ``http://127.0.0.1:PORT/PATH`` inside the sandbox.

    Token: the usual header, the ``token`` query parameter, or the console's cookie (never
    forwarded). Errors: 502 ``port_closed`` when nothing listens (or the server closed the
    connection without a response), 409 ``resource_exhausted`` at the connection limit.
    """
    admin = _admin()
    principal, carrier = _authenticate(admin, request)
    _check_port(port)
    h = h11.Connection(h11.CLIENT)
    headers = _upstream_headers(request, carrier, port)
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    if has_body and "content-length" not in request.headers:
        headers.append(("transfer-encoding", "chunked"))
    headers.append(("connection", "close"))
    query = _upstream_query(request, carrier)
    target = "/" + path + (f"?{query}" if query else "")
    try:
        head = h11.Request(method=request.method, target=target.encode(), headers=headers)
        first = h.send(head) or b""
        if not has_body:
            first += h.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        raise InvalidRequest(f"cannot relay this request: {exc}") from None
    tunnel = await _open(admin, request, principal, sandbox_id, port, "http", 200, first)
    sender: asyncio.Task[None] | None = None
    code = "ok"
    try:
        if has_body:
            sender = asyncio.ensure_future(_send_body(h, tunnel, request))
        while True:
            event = await _next_event(h, tunnel)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise PortClosed(
                    f"the server on port {port} closed the connection without a response",
                    port=port,
                    reason="no_response",
                )
            # an InformationalResponse (100 Continue): the final one follows
    except BaseException as exc:
        code = exc.code.value if isinstance(exc, RockError) else "error"
        if sender is not None:
            sender.cancel()
        await tunnel.close()
        _audit_close(admin, request, principal, tunnel, "http", code)
        raise

    async def body() -> AsyncIterator[bytes]:
        result = "ok"
        try:
            while True:
                ev = await _next_event(h, tunnel)
                if isinstance(ev, h11.Data):
                    yield bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    return
        except BaseException as exc:
            result = exc.code.value if isinstance(exc, RockError) else "cancelled"
            raise
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            tunnel.close_soon()
            _audit_close(admin, request, principal, tunnel, "http", result)

    response = StreamingResponse(body(), status_code=event.status_code)
    response.raw_headers = [
        (k.lower(), v) for k, v in event.headers if k.lower().decode("latin-1") not in _HOP
    ]
    return response


# ----------------------------------------------------------------------------- WebSocket


async def _ws_refuse(ws: WebSocket, exc: BaseException) -> None:
    """The error body as a text frame, then 1014 (bad gateway) or 1008 (refused)."""
    if isinstance(exc, PortClosed):
        close_code = 1014
    elif isinstance(exc, RockError) and exc.status < 500:
        close_code = 1008
    else:
        close_code = 1011
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps(to_body(exc)))
            await ws.close(code=close_code)


@router.websocket(_PREFIX + "/tcp")
async def tcp_tunnel(ws: WebSocket, sandbox_id: str, port: int) -> None:
    """A raw TCP tunnel to ``127.0.0.1:PORT`` in the sandbox (see the module docstring)."""
    await ws.accept()
    admin = _admin()
    try:
        principal, _ = _authenticate(admin, ws)
        tunnel = await _open(admin, ws, principal, sandbox_id, port, "tcp", 101)
    except RockError as exc:
        await _ws_refuse(ws, exc)
        return
    await ws.send_text(PortTunnelOpen(port=port).model_dump_json())

    async def downstream() -> None:
        while data := await tunnel.read():
            await ws.send_bytes(data)
        await ws.close(code=1000)

    async def upstream() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes"):
                await tunnel.write(message["bytes"])
            elif message.get("text") == TUNNEL_EOF:
                await tunnel.write_eof()

    await _relay(admin, ws, principal, tunnel, "tcp", downstream(), upstream())


async def _relay(
    admin: Any,
    ws: WebSocket,
    principal: Principal,
    tunnel: _Tunnel,
    kind: str,
    down: Any,
    up: Any,
) -> None:
    """Run both directions until one ends; then reset the tunnel and audit the close."""
    tasks = [asyncio.ensure_future(down), asyncio.ensure_future(up)]
    code = "ok"
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, RockError):
                code = exc.code.value
                await _ws_refuse(ws, exc)
            elif exc is not None and not isinstance(exc, WebSocketDisconnect | RuntimeError):
                code = "error"
                await _ws_refuse(ws, exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await tunnel.close()
        if ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=1000)
        _audit_close(admin, ws, principal, tunnel, kind, code)


@router.websocket(_PREFIX + "/{path:path}")
async def proxy_websocket(ws: WebSocket, sandbox_id: str, port: int, path: str = "") -> None:
    """Relay a WebSocket to ``ws://127.0.0.1:PORT/PATH`` inside the sandbox."""
    from websockets.client import ClientProtocol
    from websockets.frames import Frame, Opcode
    from websockets.http11 import Response as WsResponse
    from websockets.uri import parse_uri

    admin = _admin()
    try:
        principal, carrier = _authenticate(admin, ws)
    except RockError as exc:
        await ws.accept()
        await _ws_refuse(ws, exc)
        return
    try:
        tunnel = await _open(admin, ws, principal, sandbox_id, port, "websocket", 101)
    except RockError as exc:
        await ws.accept()
        await _ws_refuse(ws, exc)
        return
    query = _upstream_query(ws, carrier)
    uri = parse_uri(f"ws://localhost:{port}/{path}" + (f"?{query}" if query else ""))
    offered = [
        p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
    ]
    proto = ClientProtocol(uri, subprotocols=offered or None)  # type: ignore[arg-type]
    handshake = proto.connect()
    for name, value in _upstream_headers(ws, carrier, port):
        if name not in ("host", "origin"):
            handshake.headers[name] = value
    proto.send_request(handshake)
    try:
        for data in proto.data_to_send():
            if data:
                await tunnel.write(data)
        response: Any = None
        while response is None:
            data = await tunnel.read()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            for event in proto.events_received():
                if isinstance(event, WsResponse):
                    response = event
            if response is None and not data:
                break
        if response is None or proto.handshake_exc is not None:
            status = getattr(response, "status_code", None)
            raise PortClosed(
                f"the server on port {port} refused the WebSocket handshake"
                + (f" (HTTP {status})" if status else ""),
                port=port,
                reason="handshake",
            )
    except BaseException as exc:
        await tunnel.close()
        await ws.accept()
        await _ws_refuse(ws, exc)
        _audit_close(admin, ws, principal, tunnel, "websocket", "port_closed")
        if not isinstance(exc, Exception):
            raise
        return
    await ws.accept(subprotocol=proto.subprotocol)

    async def flush() -> None:
        for data in proto.data_to_send():
            if data:
                await tunnel.write(data)

    async def downstream() -> None:
        parts: list[bytes] = []
        text = False
        while True:
            data = await tunnel.read()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            for frame in proto.events_received():
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    text, parts = frame.opcode == Opcode.TEXT, [bytes(frame.data)]
                elif frame.opcode == Opcode.CONT:
                    parts.append(bytes(frame.data))
                elif frame.opcode == Opcode.CLOSE:
                    await flush()
                    code = proto.close_rcvd.code if proto.close_rcvd else 1000
                    await ws.close(code=code if code not in (1005, 1006) else 1000)
                    return
                else:
                    continue  # ping/pong: answered by the protocol
                if frame.fin:
                    message = b"".join(parts)
                    if text:
                        await ws.send_text(message.decode("utf-8"))
                    else:
                        await ws.send_bytes(message)
                    parts = []
            await flush()
            if not data:
                await ws.close(code=1000)
                return

    async def upstream() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                with contextlib.suppress(Exception):
                    proto.send_close(message.get("code", 1000))
                    await flush()
                return
            if message.get("bytes") is not None:
                proto.send_binary(message["bytes"])
            elif message.get("text") is not None:
                proto.send_text(message["text"].encode("utf-8"))
            await flush()

    await _relay(admin, ws, principal, tunnel, "websocket", downstream(), upstream())
