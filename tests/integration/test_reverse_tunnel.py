"""The reverse tunnel at the rocklet level: a real agent process, a real TCP target on loopback.

The agent runs on this host here (the tunnel's sandbox end is its 127.0.0.1:port); the e2e
tests prove the same through a bwrap sandbox with network none.
"""

import asyncio
import sys

import pytest

from rock_serve import errors
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from rock_serve.rocklet._reverse import ReverseTunnel, tcp_connector
from tests._wait import async_wait_until


@pytest.fixture
async def handle(tmp_path):
    h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    yield h
    await h.close()


@pytest.fixture
async def echo():
    """A node-side target: upper-cases what it gets, half-closes after the client does."""
    seen: list[bytes] = []

    async def serve(reader, writer):
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
            writer.write(chunk.upper())
            await writer.drain()
        seen.append(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


async def test_connections_reach_the_target_both_ways(handle, echo):
    target, seen = echo
    tunnel = ReverseTunnel(handle, 0, tcp_connector("127.0.0.1", target))
    port = await tunnel.start()
    assert port > 0
    big = bytes(range(256)) * 4096  # 1 MiB: several frames each way
    results = await asyncio.gather(
        _roundtrip(port, b"hello"), _roundtrip(port, b"world"), _roundtrip(port, big)
    )
    assert results[:2] == [b"HELLO", b"WORLD"]
    assert results[2] == big.upper()
    assert sorted(seen, key=len)[:2] in ([b"hello", b"world"], [b"world", b"hello"])
    assert tunnel.accepted == 3
    await async_wait_until(lambda: tunnel.active == 0)
    await tunnel.close()


async def test_unreachable_target_closes_the_sandbox_side(handle):
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    tunnel = ReverseTunnel(handle, 0, tcp_connector("127.0.0.1", dead))
    port = await tunnel.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, not hanging
    writer.close()
    await tunnel.close()


async def test_port_in_use_is_a_conflict(handle, echo):
    target, _ = echo
    first = ReverseTunnel(handle, 0, tcp_connector("127.0.0.1", target))
    port = await first.start()
    with pytest.raises(errors.Conflict):
        await ReverseTunnel(handle, port, tcp_connector("127.0.0.1", target)).start()
    await first.close()


async def test_close_stops_listening_and_ends_connections(handle):
    hold = asyncio.Event()

    async def serve(reader, writer):
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    tunnel = ReverseTunnel(handle, 0, tcp_connector("127.0.0.1", target))
    port = await tunnel.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    await writer.drain()
    await async_wait_until(lambda: tunnel.active == 1)
    await tunnel.close()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the open connection ended
    writer.close()

    async def refused() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        w.close()
        return False

    await async_wait_until(refused, what="the sandbox port to close")
    hold.set()
    server.close()


async def test_agent_death_ends_the_tunnel(tmp_path, echo):
    target, _ = echo
    h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    tunnel = ReverseTunnel(h, 0, tcp_connector("127.0.0.1", target))
    await tunnel.start()
    assert h.process is not None
    h.process.kill()
    await h.wait_closed()
    await async_wait_until(lambda: tunnel._task is not None and tunnel._task.done())
    await tunnel.close()
    await h.close()
