"""The Admin's relays: what it streams between a client and a Worker without holding it whole.

- NDJSON streams of models (``exec``/``session run`` with ``stream=true``) and raw byte streams
  (file and archive downloads): an error before the first item is a normal error response,
  after it an error line (NDJSON) or a cut stream;
- uploads: the request body is sent to the Worker in one call when small, else in chunks of
  :data:`UPLOAD_CHUNK` bytes with backpressure (so no body is ever held whole in a replica);
- the pty WebSocket's two directions (output to the client, keystrokes and resizes to the
  Worker) and its error frames.

Moved out of ``admin.py`` unchanged (issue 13 item 5); the routes that use them stay there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocketState

from rock_serve.deployments._ops import worker_op
from rock_serve.deployments._ray import ActorHandle, call, worker_class
from rock_serve.errors import InvalidRequest, NotFound, RockError, TooLarge, to_body
from rock_serve.protocol import PtyResize
from rock_serve.protocol.ops import OPS, Op
from rock_serve.rocklet.handle import read_result

__all__ = [
    "NDJSON",
    "UPLOAD_CHUNK",
    "ndjson",
    "pty_dimension",
    "pty_input",
    "pty_output",
    "relay",
    "upload",
    "ws_error",
]

NDJSON = "application/x-ndjson"
#: Bytes per chunk of an upload sent to a Worker (one actor call each).
UPLOAD_CHUNK = 1 << 20


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


async def ndjson(items: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Stream models as NDJSON; an error before the first item is a normal error response.

    The Admin's and the data plane's streamed operations and the processes routes answer here.
    """
    first = await anext(items)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first.model_dump_json().encode() + b"\n"
            async for item in items:
                yield item.model_dump_json().encode() + b"\n"
        except RockError as exc:
            yield json.dumps(to_body(exc)).encode() + b"\n"
        finally:
            await _aclose(items)

    return StreamingResponse(body(), media_type=NDJSON)


async def relay(chunks: AsyncIterator[bytes], media_type: str) -> Response:
    """Relay a byte stream; an error before the first chunk is a normal error response."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return Response(content=b"", media_type=media_type)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await _aclose(chunks)

    return StreamingResponse(body(), media_type=media_type)


def pty_dimension(value: str, name: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise InvalidRequest(f"query {name}={value!r} must be an integer in 1..65535")
    return int(value)


async def ws_error(ws: WebSocket, exc: BaseException, code: int) -> None:
    """Send the one error body as a text frame, then close with ``code``."""
    if isinstance(exc, StopAsyncIteration):
        exc = InvalidRequest("the pty ended before it started")
    if ws.application_state == WebSocketState.CONNECTED:
        await ws.send_text(json.dumps(to_body(exc)))
        await ws.close(code=code)


async def pty_output(ws: WebSocket, items: AsyncIterator[Any]) -> int:
    """Forward output to the client; returns the exit code."""
    async for item in items:
        if isinstance(item, bytes):
            if item:
                await ws.send_bytes(item)
        else:
            return int(item)
    raise InvalidRequest("the pty ended without an exit code")


async def pty_input(ws: WebSocket, worker: ActorHandle, pty_id: str) -> None:
    """Forward keystrokes and control messages until the client goes away."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                await call(worker, worker_class().pty_input, pty_id, message["bytes"])
            elif message.get("text") is not None:
                try:
                    resize = PtyResize.model_validate_json(message["text"])
                except ValidationError as exc:
                    problem = InvalidRequest(f"bad control message: {exc.errors()[0]['msg']}")
                    await ws.send_text(json.dumps(to_body(problem)))
                    continue
                await call(worker, worker_class().pty_resize, pty_id, resize.cols, resize.rows)
        except NotFound:
            pass  # the pty just ended: the output side sends the exit code


async def upload(
    worker_of: Callable[[str], Awaitable[ActorHandle]],
    limit: int,
    sandbox_id: str,
    request: Request,
    operation: Op[Any],
) -> tuple[Any, int]:
    """Send the request body to the Worker (``worker_of(sandbox_id)``, which checks the
    caller) as the payload of ``operation`` (an upload, see ``Op.upload``): one call when
    small, else chunk by chunk; over ``limit`` bytes is ``too_large``. Returns the operation's
    result and the bytes received.
    """
    kind = type(operation)
    assert kind.payload is not None and kind.upload is not None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes is over the {limit}-byte limit", limit=limit)
    worker = await worker_of(sandbox_id)
    body = request.stream()
    buffer = bytearray()
    async for chunk in body:
        buffer += chunk
        if len(buffer) > UPLOAD_CHUNK:
            break
    else:  # the whole body fits one chunk: one call
        data = bytes(buffer)
        whole = operation.model_copy(update={kind.payload: data})
        return await worker_op(worker, sandbox_id, whole), len(data)
    path, mode = getattr(operation, "path", ""), getattr(operation, "mode", None)
    upload_id: str = await call(
        worker, worker_class().upload_open, sandbox_id, kind.upload, path, mode
    )
    try:
        async for chunk in body:
            buffer += chunk
            while len(buffer) >= UPLOAD_CHUNK:
                await call(
                    worker, worker_class().upload_chunk, upload_id, bytes(buffer[:UPLOAD_CHUNK])
                )
                del buffer[:UPLOAD_CHUNK]
        if buffer:
            await call(worker, worker_class().upload_chunk, upload_id, bytes(buffer))
        written: int = await call(worker, worker_class().upload_close, upload_id)
        spec = OPS[str(getattr(operation, "op", ""))]
        return read_result(spec.result, operation, {"size": written}, b""), written
    except BaseException:
        with contextlib.suppress(Exception):
            await call(worker, worker_class().upload_abort, upload_id)
        raise
