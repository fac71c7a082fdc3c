"""The rocklet's ``port.connect`` on every runtime: a TCP server started inside the sandbox is
reached through the frame channel (no network needed), with flow control, half-close,
concurrent connections, a connection cap and a typed ``port_closed``.

One sandbox per runtime runs every check (sandbox start is the expensive part).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import pytest

from rock_serve.errors import PortClosed, ResourceExhausted
from rock_serve.protocol import ExecRequest, SessionCreateRequest, SessionRunRequest
from rock_serve.rocklet._ports import PortConnection
from rock_serve.rocklet.agent import CHUNK
from tests._wait import async_wait_until

pytestmark = pytest.mark.timeout(120)

#: A server for the tests: the first byte picks the mode. ``E``: echo every byte until EOF,
#: then close. ``S``: send the decimal count that follows (up to a newline) of bytes, close.
SERVER = r"""
import asyncio, os, sys

async def handle(reader, writer):
    mode = await reader.read(1)
    if mode == b"E":
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    elif mode == b"S":
        n = int(await reader.readline())
        block = bytes(range(256)) * 256
        while n > 0:
            writer.write(block[:n])
            n -= min(n, len(block))
            await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    await server.serve_forever()

asyncio.run(main())
"""


async def _start_server(h) -> int:
    """Start SERVER in the sandbox (in the background); returns the port it listens on."""
    tag = uuid.uuid4().hex
    script, port_file = f"rock-port-srv-{tag}.py", f"rock-port-srv-{tag}.port"
    await h.write_file(script, SERVER.encode())
    await h.create_session(SessionCreateRequest(session="srv"))
    await h.run_in_session(
        SessionRunRequest(session="srv", command=f"python3 {script} {port_file} >/dev/null 2>&1 &")
    )

    async def port() -> int | None:
        result = await h.exec(ExecRequest(command=f"cat {port_file} 2>/dev/null"))
        return int(result.stdout) if result.exit_code == 0 and result.stdout else None

    return int(await async_wait_until(port, what="the test server to listen"))


async def _read_all(conn: PortConnection) -> bytes:
    out = bytearray()
    while data := await conn.read():
        out += data
    return bytes(out)


async def _unused_port(h) -> int:
    """A port nobody listens on inside the sandbox (a fresh bind's, released again)."""
    code = "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    result = await h.exec(ExecRequest(command=f'python3 -c "{code}"'))
    return int(result.stdout)


async def test_port_relay(sandbox):
    _, _, h = sandbox
    port = await _start_server(h)

    # A port nobody listens on: typed, at once, and the connection slot is freed.
    closed = await _unused_port(h)
    with pytest.raises(PortClosed) as info:
        await PortConnection(h, closed).open()
    assert info.value.details["port"] == closed

    # Echo of more than a few windows, written and read at once; half-close ends it.
    window = 2 * CHUNK
    blob = os.urandom(8 * window + 12345)
    async with PortConnection(h, port, window=window) as conn:
        await conn.write(b"E")

        async def send() -> None:
            await conn.write(blob)
            await conn.write_eof()

        _, echoed = await asyncio.gather(send(), _read_all(conn))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
        result = await conn.wait_closed()
        assert result == {"sent": len(blob) + 1, "received": len(blob)}
        assert conn.peak_buffered <= window + CHUNK

    # A reader that does not read: the sandbox side fills one window and waits for credit.
    size = 16 * window
    async with PortConnection(h, port, window=window) as conn:
        await conn.write(f"S{size}\n".encode())
        await async_wait_until(lambda: conn.buffered >= window, what="a full window")
        got = await _read_all(conn)
        assert len(got) == size
        assert got[:512] == bytes(range(256)) * 2
        assert conn.peak_buffered <= window + CHUNK, "the window bounds what is held here"

    # Many connections at once, each its own stream.
    async def one(i: int) -> bytes:
        async with PortConnection(h, port) as c:
            await c.write(b"E" + f"conn-{i}".encode() * 100)
            await c.write_eof()
            return await _read_all(c)

    replies = await asyncio.gather(*(one(i) for i in range(16)))
    assert replies == [f"conn-{i}".encode() * 100 for i in range(16)]

    # The cap on open connections is typed; closing one frees its slot (a reset reaches the
    # rocklet a moment after aclose: wait until the ones above are all gone).
    await async_wait_until(lambda: _opens(h, port, 1), what="the connections above to end")
    first = await PortConnection(h, port, max_connections=2).open()
    second = await PortConnection(h, port, max_connections=2).open()
    with pytest.raises(ResourceExhausted) as capped:
        await PortConnection(h, port, max_connections=2).open()
    assert capped.value.details["resource"] == "port_connections"
    await first.aclose()
    await async_wait_until(lambda: _opens(h, port, 2), what="a slot to free after close")
    await second.aclose()


async def _opens(h, port: int, cap: int) -> bool:
    """True when one more connection fits under ``cap`` (it is closed again)."""
    try:
        conn = await PortConnection(h, port, max_connections=cap).open()
    except ResourceExhausted:
        return False
    await conn.aclose()
    return True
