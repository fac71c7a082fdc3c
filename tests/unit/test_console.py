"""Roles, the console's cookie/CSRF rules, samples and request ids (no Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.requests import Request
from typer.testing import CliRunner

from rock_serve.auth import Principal, TokenTable, hash_token
from rock_serve.config import TokenEntry, parse_server_args
from rock_serve.deployments._auth import NamespaceGuard, check_cookie_request
from rock_serve.deployments._console import Samples, _new_trace, _static
from rock_serve.errors import NotFound, PermissionDenied, SandboxNotFound
from rock_serve.protocol import ConsoleRow, SandboxRecord, SandboxState


def _record(namespace: str = "team-a", **extra: object) -> SandboxRecord:
    return SandboxRecord(
        id="sb-abcdefabcdef-0123456789abcdef",
        state=SandboxState.RUNNING,
        worker="abcdefabcdef",
        node_id="n",
        created_at=1.0,
        namespace=namespace,
        **extra,  # type: ignore[arg-type]
    )


# Roles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "all_namespaces", "may_act", "admin"),
    [
        ("tenant", False, True, False),
        ("viewer", True, False, False),
        ("operator", True, True, False),
        ("admin", True, True, True),
    ],
)
def test_roles_decide_what_a_caller_sees_and_does(role, all_namespaces, may_act, admin):
    entry = TokenEntry(name="u", namespace="team-a", sha256=hash_token("t"), role=role)
    principal = TokenTable([entry]).verify("t")
    assert principal is not None
    assert (principal.role, principal.all_namespaces, principal.may_act, principal.admin) == (
        role,
        all_namespaces,
        may_act,
        admin,
    )
    assert principal.may_see("team-a")
    assert principal.may_see("team-b") is all_namespaces
    if may_act:
        principal.require_act()
    else:
        with pytest.raises(PermissionDenied, match="read-only"):
            principal.require_act("delete")


def test_admin_flag_and_role_agree():
    assert Principal("a", "ns", admin=True).role == "admin"
    assert Principal("a", "ns", role="admin").admin is True
    entry = TokenEntry(name="old", sha256=hash_token("x"), admin=True)
    principal = TokenTable([entry]).verify("x")
    assert principal is not None and principal.role == "admin"
    with pytest.raises(ValidationError, match="contradicts"):
        TokenEntry(name="bad", sha256=hash_token("y"), admin=True, role="viewer")
    with pytest.raises(ValidationError):
        TokenEntry(name="bad", sha256=hash_token("y"), role="superuser")  # type: ignore[arg-type]


async def test_operators_and_viewers_pass_the_namespace_guard_without_a_lookup():
    async def lookup(sandbox_id: str) -> SandboxRecord:
        raise AssertionError("no lookup expected")

    guard = NamespaceGuard(lookup)
    for role in ("viewer", "operator"):
        principal = Principal("u", "ops", role=role)  # type: ignore[arg-type]
        await guard.check(principal, "sb-abcdefabcdef-0123456789abcdef")
        assert NamespaceGuard.check_namespace_filter(principal, None) is None
        assert NamespaceGuard.check_namespace_filter(principal, "team-b") == "team-b"

    async def team_b(sandbox_id: str) -> SandboxRecord:
        return _record("team-b")

    with pytest.raises(SandboxNotFound):
        await NamespaceGuard(team_b).check(Principal("t", "team-a"), "sb-x")


def test_token_cli_takes_a_role(tmp_path):
    from rock_serve.auth import load_token_file
    from rock_serve.sdk.cli import app

    file = tmp_path / "tokens.yaml"
    runner = CliRunner()
    result = runner.invoke(
        app, ["token", "create", "--name", "v", "--role", "viewer", "--file", str(file)]
    )
    assert result.exit_code == 0, result.output
    assert [(e.name, e.role) for e in load_token_file(file)] == [("v", "viewer")]
    bad = runner.invoke(app, ["token", "create", "--name", "w", "--role", "boss"])
    assert bad.exit_code == 2


def test_console_settings_parse_and_refuse_unknown_fields():
    args = parse_server_args({"console": {"sample_interval_seconds": 2}})
    assert args.console.sample_interval_seconds == 2
    assert args.console.events_interval_seconds == 1.0
    with pytest.raises(Exception, match="console"):
        parse_server_args({"console": {"colour": "blue"}})


# Cookie and CSRF -----------------------------------------------------------------------------


def _request(method: str, headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": method,
        "path": "/v1/sandboxes",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }
    return Request(scope)


def test_cookie_calls_must_be_same_origin_and_repeat_the_csrf_cookie():
    base = {"host": "console.local:8000", "cookie": "rock_session=t; rock_csrf=abc"}
    check_cookie_request(_request("GET", base))  # reads: fine
    check_cookie_request(_request("GET", {**base, "origin": "http://console.local:8000"}))
    check_cookie_request(_request("POST", {**base, "x-csrf-token": "abc"}))
    refused = [
        _request("POST", base),
        _request("POST", {**base, "x-csrf-token": "abd"}),
        _request("DELETE", {**base, "x-csrf-token": ""}),
        _request("GET", {**base, "origin": "http://evil.example"}),
        _request("POST", {**base, "x-csrf-token": "abc", "origin": "https://evil.example"}),
        _request("POST", {"host": "h", "cookie": "rock_session=t", "x-csrf-token": ""}),
    ]
    for request in refused:
        with pytest.raises(PermissionDenied):
            check_cookie_request(request)


# Samples, request ids, static files -----------------------------------------------------------


def test_samples_keep_an_hour_of_intervals():
    now = [1000.0]
    samples = Samples(interval=600, clock=lambda: now[0])
    samples.request("/v1/sandboxes", "POST", 201, 0.5)
    samples.request("/v1/sandboxes", "POST", 201, 1.5)
    samples.request("/v1/sandboxes", "POST", 429, 0.01)
    samples.request("/x/v1/sandboxes/sb-1/exec", "POST", 200, 0.02)
    samples.request("/v1/sandboxes/sb-1", "GET", 404, 0.001)
    now[0] += 600
    first = samples.take({"running": 3})
    assert first.interval == 600
    assert first.requests == 5
    assert first.errors == {"429": 1, "404": 1}
    assert first.rate_limited == 1
    assert (first.create_p50, first.create_p99) == (1.5, 1.5)
    assert first.op_p50 == 0.02
    assert first.sandboxes == {"running": 3}
    now[0] += 600
    second = samples.take({})
    assert (second.requests, second.create_p50, second.errors) == (0, None, {})
    for _ in range(10):
        now[0] += 600
        samples.take({})
    series = samples.series()
    assert len(series.samples) == 6  # one hour of 10-minute samples
    assert series.samples[-1].t == now[0]


def test_request_and_trace_ids_are_kept_when_valid():
    request_id, trace_id = _new_trace(
        {"x-request-id": "call-1", "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    )
    assert (request_id, trace_id) == ("call-1", "ab" * 16)
    for headers in (
        {},
        {"x-request-id": "bad id with spaces", "traceparent": "garbage"},
        {"traceparent": "00-" + "0" * 32 + "-" + "cd" * 8 + "-01"},
    ):
        request_id, trace_id = _new_trace(headers)
        assert request_id != headers.get("x-request-id")
        assert len(trace_id) == 32 and trace_id != "0" * 32
        int(trace_id, 16)


def test_static_files_are_only_the_bundled_ones():
    index = _static("index.html")
    assert b"static/app.js" in index.body
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert _static("vendor/xterm.js").headers["content-type"].startswith("text/javascript")
    assert b"MIT" in _static("vendor/LICENSE.xterm").body
    for name in ("../auth.py", "__init__.py", "vendor/../../config.py", "nope.js", ".hidden.js"):
        with pytest.raises(NotFound):
            _static(name)


def test_a_row_is_a_slim_record():
    row = ConsoleRow.of(_record(owner="me", labels={"k": "v"}, lease_expires_at=5.0))
    assert (row.state, row.owner, row.labels, row.lease_expires_at) == (
        "running",
        "me",
        {"k": "v"},
        5.0,
    )


def test_namespace_labels_are_bounded():
    from rock_serve.deployments._metrics import MAX_NAMESPACES, Metrics

    recorder = Metrics("worker", "w1", "local")
    labels = [recorder.namespace(f"ns-{i}") for i in range(MAX_NAMESPACES + 10)]
    assert labels[:MAX_NAMESPACES] == [f"ns-{i}" for i in range(MAX_NAMESPACES)]
    assert set(labels[MAX_NAMESPACES:]) == {"other"}
    assert recorder.namespace("ns-0") == "ns-0"  # known ones keep their label
    assert recorder.namespace("") == "-"


def test_the_sdk_sends_one_trace_id_per_call_across_retries():
    import httpx

    from rock_serve.sdk import Client

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["traceparent"])
        if len(seen) == 1:
            body = {"error": {"code": "rate_limited", "message": "full", "retry_after": 0}}
            return httpx.Response(429, json=body, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"items": []})

    with Client("http://rock.test", transport=httpx.MockTransport(handler)) as client:
        client.list_sandboxes()
        client.list_sandboxes()
    parts = [value.split("-") for value in seen]
    assert len(parts) == 3
    assert all(p[0] == "00" and len(p[1]) == 32 and len(p[2]) == 16 for p in parts)
    assert parts[0][1] == parts[1][1]  # a retry continues the trace
    assert parts[2][1] != parts[0][1]  # the next call starts its own
    assert parts[0][2] != parts[1][2]  # each send is its own span


def _exported_names() -> set[str]:
    """Metric names our code registers (``rock_*``), as Prometheus shows them (``ray_`` prefix)."""
    import re
    from pathlib import Path

    deployments = Path(__file__).resolve().parents[2] / "deployments"
    source = "".join((deployments / f).read_text() for f in ("_metrics.py", "_images.py"))
    names = set(re.findall(r'rm\.\w+\(\s*"(rock_\w+)"', source))
    assert len(names) >= 10
    return {f"ray_{n}" for n in names}


def _metric_refs(expr: str) -> set[str]:
    import re

    refs = set(re.findall(r"\bray_rock_\w+", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", r) for r in refs}


def test_alert_rules_and_dashboard_use_metrics_we_export():
    import json
    from pathlib import Path

    import yaml

    configs = Path(__file__).resolve().parents[2] / "configs"
    exported = _exported_names()
    rules = yaml.safe_load((configs / "alerts.yaml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    for wanted in ("RockWorkerDown", "RockReaperLag", "RockHigh5xxRate", "RockHigh429Rate"):
        assert wanted in names
    for rule in rules:
        assert _metric_refs(rule["expr"]) <= exported, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    dashboard = json.loads((configs / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= _metric_refs(target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
    assert used <= exported
    assert {"ray_rock_sandboxes", "ray_rock_create_seconds", "ray_rock_errors_total"} <= used


def test_spans_are_exported_over_otlp_when_configured():
    import http.server
    import threading

    import httpx
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from rock_serve.deployments import _console

    bodies: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = _console.RequestContext(Starlette(routes=[Route("/v1/hello", hello)]))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    try:
        _console._TRACER.configure(endpoint, "rock-test")
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get(
                    "/v1/hello", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
                )

        import asyncio

        response = asyncio.run(send())
        assert response.headers["x-trace-id"] == trace_id
        assert len(response.headers["x-request-id"]) == 32  # none came in: one was made
        _console._TRACER.flush()
    finally:
        _console._TRACER.configure(None, "rock-test")
        server.shutdown()
        server.server_close()
    spans = [
        span
        for body in bodies
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [(span.name, span.trace_id.hex()) for span in spans] == [("GET /v1/hello", trace_id)]
    attributes = {a.key: a.value for a in spans[0].attributes}
    assert attributes["http.status_code"].int_value == 200
