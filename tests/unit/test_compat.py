"""Compatibility layer pieces without Ray: credential carriers, route groups, anonymous
access, ROCK size strings, GEM's make_vec keywords and the SandboxFusion language table."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from rock_serve.auth import Authenticator, Principal, generate_token, hash_token
from rock_serve.config import AuthConfig, TokenEntry, parse_server_args
from rock_serve.deployments._auth import request_token, route_group
from rock_serve.deployments._rock_api import parse_size_mb
from rock_serve.envs.integrations import LANGUAGES, GemEnvClient
from rock_serve.errors import InvalidConfig, InvalidRequest, Unauthorized


class _Route:
    def __init__(self, path: str) -> None:
        self.path = path


def _request(headers: dict[str, str], query: str = "", route: str | None = None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    if route is not None:
        scope["route"] = _Route(route)
    return Request(scope)


def _basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Authorization": "Bearer tok"}, False, "tok"),
        ({"Authorization": _basic("user:tok")}, False, "tok"),
        ({"Authorization": _basic("tok:")}, False, "tok"),
        ({"Authorization": "Basic !!!not-base64"}, False, None),
        ({"X-Key": "tok"}, False, "tok"),
        ({"X-API-Key": "tok"}, False, "tok"),
        ({"XRL-Authorization": "Bearer tok"}, False, "tok"),
        ({"XRL-Authorization": "tok"}, False, "tok"),
        ({}, False, None),
        ({"Authorization": "Bearer first", "X-Key": "second"}, False, "first"),
    ],
)
def test_every_carrier(headers: dict[str, str], query: bool, expected: str | None) -> None:
    assert request_token(_request(headers), query=query) == expected


def test_query_token_only_when_asked() -> None:
    assert request_token(_request({}, "token=q")) is None
    assert request_token(_request({}, "token=q"), query=True) == "q"
    assert request_token(_request({"X-Key": "h"}, "token=q"), query=True) == "h"


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/apis/v1/envs/gem/make", "gem"),
        ("/apis/envs/sandbox/v1/start_async", "rock"),
        ("/run_code", "run_code"),
        ("/v1/sandboxes/{sandbox_id}/swerex/{operation}", "swerex"),
        ("/v1/sandboxes/{sandbox_id}/exec", None),
        ("/v1/sandboxes", None),
    ],
)
def test_route_groups(path: str, group: str | None) -> None:
    assert route_group(_request({}, route=path)) == group


def test_anonymous_groups_open_only_what_is_listed() -> None:
    token = generate_token()
    config = AuthConfig(
        tokens=[TokenEntry(name="alice", namespace="team-a", sha256=hash_token(token))],
        anonymous={"public": ["gem"]},
    )
    authenticator = Authenticator(config)
    assert authenticator.authenticate(None, "gem") == Principal("anonymous", "public")
    assert authenticator.authenticate(token, "gem") == Principal("alice", "team-a")
    with pytest.raises(Unauthorized):
        authenticator.authenticate("rk_wrong", "gem")  # a token present is still checked
    for group in ("rock", "run_code", None):
        with pytest.raises(Unauthorized):
            authenticator.authenticate(None, group)


def test_anonymous_config_is_validated() -> None:
    with pytest.raises(InvalidConfig, match="two namespaces"):
        parse_server_args({"auth": {"anonymous": {"a": ["gem"], "b": ["gem"]}}})
    with pytest.raises(InvalidConfig):
        parse_server_args({"auth": {"anonymous": {"a": ["everything"]}}})
    with pytest.raises(InvalidConfig, match="namespace name"):
        parse_server_args({"auth": {"anonymous": {"no spaces": ["gem"]}}})
    assert AuthConfig().anonymous == {}


@pytest.mark.parametrize(
    ("text", "mb"),
    [("8g", 8192), ("512m", 512), ("50G", 51200), ("1.5Gi", 1536), ("2048k", 2), ("1t", 1 << 20)],
)
def test_rock_sizes(text: str, mb: int) -> None:
    assert parse_size_mb(text) == mb


def test_rock_size_edge_cases() -> None:
    assert parse_size_mb(None) is None and parse_size_mb(" ") is None
    assert parse_size_mb("1048576") == 1  # bare numbers are bytes, as docker --memory
    with pytest.raises(InvalidRequest):
        parse_size_mb("lots")


def test_gem_client_takes_make_vec_seed_and_kwargs() -> None:
    """gem.make_vec calls the entry point with seed=seed+i and its own kwargs."""
    sent: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        route = request.url.path.rsplit("/", 1)[-1]
        body = json.loads(request.content)
        sent.append((route, body))
        if route == "make":
            return httpx.Response(200, json={"sandbox_id": "env-1"})
        return httpx.Response(200, json={"observation": "o", "info": {}})

    http = httpx.Client(base_url="http://platform", transport=httpx.MockTransport(handler))
    env = GemEnvClient("rock/GuessNumber-v0", http=http, seed=5, max_turns=3)
    env.reset()
    env.reset()
    env.reset(seed=9)
    assert sent[0] == ("make", {"env_id": "rock/GuessNumber-v0", "kwargs": {"max_turns": 3}})
    assert [body.get("seed") for route, body in sent if route == "reset"] == [5, None, 9]


def test_language_table() -> None:
    assert {"python", "bash", "cpp", "c", "go", "java", "nodejs", "rust"} <= set(LANGUAGES)
    for name, language in LANGUAGES.items():
        assert "{src}" in " ".join((*language.run, *(language.compile or ()))), name
    assert LANGUAGES["java"].source == "Main.java"
