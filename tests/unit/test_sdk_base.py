"""The SDK's sans-IO core, its public surface, and the generated sync twin."""

import email.utils
import random
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import rock_serve.sdk
from rock_serve.errors import (
    InternalError,
    NotFound,
    RateLimited,
    RockletUnavailable,
    RuntimeUnavailable,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecResult,
    OutputChunk,
)
from rock_serve.protocol.ops import (
    ExecOp,
    FileReadOp,
    FileWriteOp,
    SessionCloseOp,
    SessionInterruptOp,
    SessionRunOp,
    SessionStdinOp,
    StatsOp,
)
from rock_serve.sdk import Client, ClientSettings, RetryPolicy, _base

ROOT = Path(__file__).resolve().parents[2]


def test_exported_members():
    assert set(rock_serve.sdk.__all__) == {
        "AsyncClient",
        "AsyncProcess",
        "AsyncProcessOutput",
        "AsyncSandbox",
        "AsyncSandboxFiles",
        "AsyncLLMCallHandle",
        "AsyncLLMRelay",
        "AsyncSandboxLLM",
        "LLMCallHandle",
        "LLMRelay",
        "SandboxLLM",
        "AsyncSandboxProcesses",
        "Client",
        "ClientSettings",
        "Process",
        "ProcessOutput",
        "RetryPolicy",
        "Sandbox",
        "SandboxFiles",
        "SandboxProcesses",
    }
    for name in rock_serve.sdk.__all__:
        assert hasattr(rock_serve.sdk, name)


def test_the_sync_twin_is_generated_from_the_async_one():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_twins_have_the_same_methods():
    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")} - {"aclose", "close"}

    assert public(rock_serve.sdk.AsyncClient) == public(rock_serve.sdk.Client)
    assert public(rock_serve.sdk.AsyncSandbox) == public(rock_serve.sdk.Sandbox)
    assert public(rock_serve.sdk.AsyncSandboxFiles) == public(rock_serve.sdk.SandboxFiles)
    for name in ("Process", "ProcessOutput", "SandboxProcesses"):
        assert public(getattr(rock_serve.sdk, "Async" + name)) == public(
            getattr(rock_serve.sdk, name)
        )
    assert hasattr(rock_serve.sdk.AsyncClient, "aclose") and hasattr(Client, "close")


def test_the_sync_client_starts_no_thread():
    before = threading.active_count()
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"status": "ok", "version": "x"})
    )
    with Client("http://rock.test", transport=transport) as client:
        client.health()
        assert threading.active_count() == before


# Settings -------------------------------------------------------------------------------------


def test_settings_from_env():
    env = {"ROCK_BASE_URL": "http://h:1", "ROCK_TOKEN": "t", "ROCK_TIMEOUT": "2.5"}
    assert ClientSettings.from_env(env) == ClientSettings(
        base_url="http://h:1", token="t", timeout=2.5
    )
    assert ClientSettings.from_env({}) == ClientSettings(
        base_url="http://127.0.0.1:8000", token=None, timeout=60.0
    )
    explicit = ClientSettings.from_env(env, base_url="http://x", token="", timeout=1)
    assert explicit == ClientSettings(base_url="http://x", token=None, timeout=1.0)


def test_client_reads_the_environment(monkeypatch):
    monkeypatch.setenv("ROCK_BASE_URL", "http://env.test:9")
    monkeypatch.setenv("ROCK_TOKEN", "from-env")
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"status": "ok", "version": "x"})

    with Client(transport=httpx.MockTransport(handler)) as client:
        client.health()
    assert str(seen[0].url) == "http://env.test:9/v1/health"
    assert seen[0].headers["Authorization"] == "Bearer from-env"


# Retry policy ---------------------------------------------------------------------------------


def test_backoff_is_exponential_with_jitter_and_capped():
    policy = RetryPolicy(base=0.5, max_backoff=8.0, rng=random.Random(0))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        for _ in range(20):
            assert ceiling / 2 <= policy.backoff(attempt) <= ceiling
    assert policy.backoff(3, retry_after=7.0) == 7.0


def test_retry_state_bounds_attempts_and_time():
    now = [0.0]
    policy = RetryPolicy(max_attempts=3, base=1.0, max_backoff=1.0, max_total=10.0)
    state = _base.RetryState(policy, clock=lambda: now[0])
    error = RateLimited("x")
    assert state.after_error(500, InternalError("x")) is None
    assert state.after_error(429, error) is not None
    assert state.after_error(503, RockletUnavailable("x")) is None  # its sandbox is gone
    assert state.after_error(503, RuntimeUnavailable("x")) is not None
    assert state.after_error(429, error) is None  # third send was the last

    state = _base.RetryState(policy, clock=lambda: now[0])
    now[0] = 9.9
    assert state.after_error(429, RateLimited("x", retry_after=0.05)) == 0.05
    assert state.after_error(429, RateLimited("x", retry_after=0.5)) is None  # past max_total


def test_only_safe_calls_are_resent_after_connection_errors():
    state = _base.RetryState(RetryPolicy())
    get, create = _base.health(), _base.create_sandbox(CreateSandboxRequest())
    assert create.idempotency_key == create.json["client_token"]  # a resend is the same create
    run_op = SessionRunOp(session="s", command="true", idempotency_key=_base.new_key())
    run = _base.op_call("sb-a-00000000", run_op)
    assert run.idempotency_key == run_op.idempotency_key  # the model's key is the header's
    streamed = _base.op_call("sb-a-00000000", run_op, stream=True)
    stdin = _base.op_call("sb-a-00000000", SessionStdinOp(session="s", data="x"))
    assert state.after_transport_error(get, httpx.ConnectError("x")) is not None
    assert state.after_transport_error(create, httpx.ConnectError("x")) is not None
    assert state.after_transport_error(run, httpx.ConnectError("x")) is not None
    assert state.after_transport_error(streamed, httpx.ConnectError("x")) is None
    assert state.after_transport_error(stdin, httpx.ConnectError("x")) is None
    assert state.after_transport_error(get, httpx.ReadTimeout("x")) is None


def test_parse_retry_after():
    assert _base.parse_retry_after("3") == 3.0
    assert _base.parse_retry_after(" 1.5 ") == 1.5
    assert _base.parse_retry_after("-4") == 0.0
    assert _base.parse_retry_after(None) is None
    assert _base.parse_retry_after("soon") is None
    assert _base.parse_retry_after("nan") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert _base.parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)


# Requests and responses -----------------------------------------------------------------------


def test_every_route_of_the_table():
    sid = "sb-w0-abcdefgh"
    calls = {
        ("GET", "/v1/health"): _base.health(),
        ("POST", "/v1/sandboxes"): _base.create_sandbox(CreateSandboxRequest()),
        ("GET", "/v1/sandboxes"): _base.list_sandboxes(),
        ("GET", f"/v1/sandboxes/{sid}"): _base.get_sandbox(sid),
        ("DELETE", f"/v1/sandboxes/{sid}"): _base.delete_sandbox(sid),
        ("POST", f"/v1/sandboxes/{sid}/exec"): _base.op_call(sid, ExecOp(command="x")),
        ("GET", f"/v1/sandboxes/{sid}/files"): _base.op_call(sid, FileReadOp(path="/a")),
        ("PUT", f"/v1/sandboxes/{sid}/files"): _base.op_call(sid, FileWriteOp(path="/a", data=b"")),
        ("GET", f"/v1/sandboxes/{sid}/stats"): _base.op_call(sid, StatsOp()),
        ("POST", f"/v1/sandboxes/{sid}/sessions/s/interrupt"): _base.op_call(
            sid, SessionInterruptOp(session="s")
        ),
        ("DELETE", f"/v1/sandboxes/{sid}/sessions/s"): _base.op_call(
            sid, SessionCloseOp(session="s")
        ),
    }
    for (method, path), call in calls.items():
        assert (call.method, call.path) == (method, path)


def test_command_calls_wait_for_the_command():
    settings = ClientSettings(timeout=5.0)
    no_limit = _base.op_call("sb-a-b", ExecOp(command="x", timeout=None))
    kwargs = _base.request_kwargs(no_limit, settings)
    assert kwargs["timeout"] == httpx.Timeout(5.0, read=None)
    assert "timeout" not in _base.request_kwargs(_base.health(), settings)


def test_error_from_response():
    request = httpx.Request("GET", "http://x/v1/health")
    reply = httpx.Response(429, text="busy", headers={"Retry-After": "12"}, request=request)
    error = _base.error_from_response(reply)
    assert isinstance(error, RateLimited) and error.retry_after == 12.0
    body = {"error": {"code": "sandbox_not_found", "message": "gone", "retry_after": "2"}}
    error = _base.error_from_response(httpx.Response(404, json=body, request=request))
    assert isinstance(error, NotFound) and error.retry_after == 2.0
    empty = _base.error_from_response(httpx.Response(404, request=request))
    assert isinstance(empty, NotFound)


def test_parse_stream_line():
    assert _base.parse_stream_line("  ", ExecResult) is None
    chunk = _base.parse_stream_line('{"type":"output","stream":"stderr","data":"x"}', ExecResult)
    assert chunk == OutputChunk(stream="stderr", data="x")
    for bad in ("not json", "[1]", '{"exit_code": "x"}'):
        with pytest.raises(InternalError, match="malformed"):
            _base.parse_stream_line(bad, ExecResult)
