"""Relayed ports without Ray: what the proxy forwards, the CLI's mapping, the error's status,
and the rocklet's port.connect refusals through a real rocklet process on the local machine.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
import typer
from starlette.requests import Request

from rock_serve.deployments._ports_api import _upstream_headers, _upstream_query
from rock_serve.errors import ErrorCode, InvalidRequest, PortClosed, http_status
from rock_serve.rocklet._ports import PortConnection
from rock_serve.rocklet.handle import AGENT_PATH, RockletHandle
from rock_serve.sdk.cli._ports import parse_mapping


def _request(headers: list[tuple[str, str]], query: str = "") -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/sandboxes/sb-x/ports/8000/a",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("10.0.0.9", 5555),
        "server": ("127.0.0.1", 8000),
        "path_params": {"sandbox_id": "sb-x", "port": "8000"},
    }
    return Request(scope)


def test_upstream_headers_drop_hop_by_hop_and_our_credential() -> None:
    req = _request(
        [
            ("Host", "platform:8000"),
            ("Authorization", "Bearer ours"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Cookie", "app=1; rock_session=s; rock_csrf=c; other=2"),
            ("Accept", "text/html"),
        ]
    )
    headers = dict(_upstream_headers(req, "header", 8000))
    assert "authorization" not in headers
    assert "x-hop" not in headers and "keep-alive" not in headers and "connection" not in headers
    assert headers["cookie"] == "app=1; other=2"
    assert headers["accept"] == "text/html"
    assert headers["host"] == "localhost:8000"
    assert headers["x-forwarded-host"] == "platform:8000"
    assert headers["x-forwarded-for"] == "10.0.0.9"
    assert headers["x-forwarded-prefix"] == "/v1/sandboxes/sb-x/ports/8000"
    # A token that came in the query leaves an app's own Authorization header alone.
    req = _request([("Authorization", "Basic YXBwOmFwcA==")], "token=t&a=1&a=2")
    assert dict(_upstream_headers(req, "query", 8000))["authorization"] == "Basic YXBwOmFwcA=="
    assert _upstream_query(req, "query") == "a=1&a=2"
    assert _upstream_query(req, "header") == "token=t&a=1&a=2"


def test_port_forward_mapping() -> None:
    assert parse_mapping("8080:80") == (8080, 80)
    assert parse_mapping("3000") == (3000, 3000)
    assert parse_mapping("0:22") == (0, 22)
    for bad in ("a:80", "80:0", "1:70000", ""):
        with pytest.raises(typer.BadParameter):
            parse_mapping(bad)


def test_port_closed_is_a_bad_gateway() -> None:
    assert http_status(ErrorCode.PORT_CLOSED.value) == 502
    assert issubclass(PortClosed, ConnectionRefusedError)


async def test_rocklet_refusals(tmp_path) -> None:
    handle = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    try:
        with socket.socket() as s:  # bound, not listening: refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            with pytest.raises(PortClosed) as info:
                await asyncio.wait_for(PortConnection(handle, port).open(), 30)
        assert info.value.details == {"port": port}
        with pytest.raises(InvalidRequest):
            await PortConnection(handle, 0).open()
        with pytest.raises(InvalidRequest):
            await PortConnection(handle, 80, window=1024).open()
        assert (await handle.ping())["version"]  # the channel is fine after the refusals
    finally:
        await handle.close()
