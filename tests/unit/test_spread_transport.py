"""The SDK's HTTP transport spreads requests in flight over small connection pools.

httpcore's pool costs each request a walk over its connections per idle connection; the SDK
keeps each pool to a few requests in flight (``AsyncSpreadTransport``). Checked against a real
uvicorn server on loopback that holds requests until the test lets them go.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from rock_serve.sdk._async_transport import (
    LIMITS,
    AsyncAdminTransport,
    AsyncDirectTransport,
    AsyncSpreadTransport,
)
from rock_serve.sdk._base import ClientSettings
from rock_serve.sdk._sync_transport import SpreadTransport

WAIT = 30.0


@dataclass
class Server:
    """A loopback server: ``/ok`` answers, ``/hold`` waits for :meth:`release`."""

    url: str = ""
    held: int = 0
    ports: set[int] = field(default_factory=set)
    cond: threading.Condition = field(default_factory=threading.Condition)
    loop: asyncio.AbstractEventLoop | None = None
    gate: asyncio.Event | None = None

    def wait_held(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.held >= n, WAIT), f"{self.held} held, not {n}"

    def release(self) -> None:
        assert self.loop is not None and self.gate is not None
        self.loop.call_soon_threadsafe(self.gate.set)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    def seen(request: Request) -> None:
        assert request.client is not None
        with state.cond:
            state.ports.add(request.client.port)

    async def ok(request: Request) -> PlainTextResponse:
        seen(request)
        return PlainTextResponse("ok")

    async def hold(request: Request) -> PlainTextResponse:
        seen(request)
        if state.gate is None:
            state.loop, state.gate = asyncio.get_running_loop(), asyncio.Event()
        with state.cond:
            state.held += 1
            state.cond.notify_all()
        await state.gate.wait()
        return PlainTextResponse("held")

    async def lines(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(1000):
                yield f"{i}\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/ok", ok), Route("/hold", hold), Route("/lines", lines)])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = threading.Event()
        while not srv.started:
            assert thread.is_alive(), "uvicorn did not start"
            deadline.wait(0.01)
        port = srv.servers[0].sockets[0].getsockname()[1]
        state.url = f"http://127.0.0.1:{port}"
        yield state
    finally:
        if state.gate is not None:
            state.release()
        srv.should_exit = True
        thread.join(WAIT)


async def test_one_request_at_a_time_keeps_one_pool_and_one_connection(server: Server) -> None:
    spread = AsyncSpreadTransport(limits=LIMITS)
    async with httpx.AsyncClient(base_url=server.url, transport=spread) as client:
        for _ in range(20):
            assert (await client.get("/ok")).text == "ok"
        assert spread.pools == 1
        assert spread.in_flight == (0,)
    assert len(server.ports) == 1  # the keep-alive connection served all 20


async def test_requests_in_flight_open_a_pool_per_four_and_reuse_them(server: Server) -> None:
    spread = AsyncSpreadTransport(limits=LIMITS, per_pool=4)
    async with httpx.AsyncClient(base_url=server.url, transport=spread, timeout=WAIT) as client:
        held = [asyncio.create_task(client.get("/hold")) for _ in range(10)]
        await asyncio.to_thread(server.wait_held, 10)
        assert spread.pools == 3
        assert sorted(spread.in_flight) == [2, 4, 4]
        server.release()
        assert [r.text for r in await asyncio.gather(*held)] == ["held"] * 10
        assert spread.in_flight == (0, 0, 0)
        assert (await client.get("/ok")).text == "ok"  # back to an open pool
        assert spread.pools == 3
    assert len(server.ports) == 10


async def test_past_max_pools_the_least_busy_pool_takes_the_request(server: Server) -> None:
    spread = AsyncSpreadTransport(limits=LIMITS, per_pool=1, max_pools=2)
    async with httpx.AsyncClient(base_url=server.url, transport=spread, timeout=WAIT) as client:
        held = [asyncio.create_task(client.get("/hold")) for _ in range(5)]
        await asyncio.to_thread(server.wait_held, 5)
        assert spread.pools == 2
        assert sorted(spread.in_flight) == [2, 3]
        server.release()
        await asyncio.gather(*held)
        assert spread.in_flight == (0, 0)


async def test_a_body_closed_early_and_a_failed_request_release_their_pool(
    server: Server,
) -> None:
    spread = AsyncSpreadTransport(limits=LIMITS)
    async with httpx.AsyncClient(transport=spread, timeout=WAIT) as client:
        async with client.stream("GET", f"{server.url}/lines") as response:
            assert spread.in_flight == (1,)
            async for line in response.aiter_lines():
                assert line == "0"
                break
        assert spread.in_flight == (0,)
        with pytest.raises(httpx.ConnectError):
            await client.get(_nothing_listens())
        assert spread.in_flight == (0,)


def test_the_sync_twin_counts_right_from_many_threads(server: Server) -> None:
    spread = SpreadTransport(limits=LIMITS, per_pool=4)
    with httpx.Client(base_url=server.url, transport=spread, timeout=WAIT) as client:
        with ThreadPoolExecutor(12) as pool:
            held = [pool.submit(client.get, "/hold") for _ in range(12)]
            server.wait_held(12)
            assert spread.pools == 3
            assert spread.in_flight == (4, 4, 4)
            server.release()
            assert [f.result(WAIT).text for f in held] == ["held"] * 12
            oks = [pool.submit(client.get, "/ok") for _ in range(200)]
            assert all(f.result(WAIT).text == "ok" for f in oks)
        assert spread.in_flight == (0, 0, 0)


def _nothing_listens() -> str:
    """A loopback URL nothing listens on (a port bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


async def test_the_sdk_transports_send_through_spread_pools_unless_given_one() -> None:
    settings = ClientSettings(base_url="http://127.0.0.1:8000")
    admin = AsyncAdminTransport(settings)
    direct = AsyncDirectTransport(admin)
    mock = httpx.MockTransport(lambda request: httpx.Response(204))
    given = AsyncAdminTransport(settings, transport=mock)
    try:
        assert isinstance(admin.http._transport, AsyncSpreadTransport)
        assert isinstance(direct.http._transport, AsyncSpreadTransport)
        assert given.http._transport is mock
    finally:
        await direct.aclose()
        await given.aclose()
