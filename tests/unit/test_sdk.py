"""The SDK twins against a small in-test fake of the REST v1 routes (``httpx.MockTransport``).

It speaks only through the protocol models and the error table, like the real Admin; the
transport is the seam (STYLE.md 12), so the SDK under test is the real code end to end.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from rock_serve.errors import (
    FileNotFound,
    InternalError,
    InvalidRequest,
    NotFound,
    RateLimited,
    RockError,
    RockletUnavailable,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxNotRunning,
    SessionExists,
    SessionNotFound,
    Unauthorized,
    to_body,
)
from rock_serve.protocol import (
    CreateSandboxRequest,
    ExecRequest,
    ExecResult,
    FileInfo,
    FileWritten,
    Health,
    ListDirResult,
    MkdirRequest,
    OutputChunk,
    RemoveRequest,
    SandboxList,
    SandboxRecord,
    SandboxState,
    SandboxStats,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionRunBody,
    SessionRunResult,
    SessionStdinBody,
)
from rock_serve.sdk import AsyncClient, AsyncSandbox, Client, RetryPolicy, Sandbox

SB = r"(?P<id>[^/]+)"
SESSION = r"(?P<session>[^/]+)"


@dataclass
class FakeSandbox:
    record: SandboxRecord
    sessions: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {"/", "/root"})


def _json(model, status=200) -> httpx.Response:
    return httpx.Response(status, content=model.model_dump_json(), headers=_JSON)


_JSON = {"Content-Type": "application/json"}


def _ndjson(*items) -> httpx.Response:
    body = "".join(item.model_dump_json() + "\n" for item in items)
    return httpx.Response(200, content=body, headers={"Content-Type": "application/x-ndjson"})


class FakePlatform:
    """The REST v1 routes over a dict of sandboxes; records every request it sees."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.requests: list[httpx.Request] = []
        #: Replies sent before any route runs (one per request), to inject failures.
        self.injected: list[httpx.Response | Exception] = []
        self._n = 0
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., httpx.Response]]] = [
            ("GET", re.compile(r"/v1/health"), self.health),
            ("POST", re.compile(r"/v1/sandboxes"), self.create),
            ("GET", re.compile(r"/v1/sandboxes"), self.list),
            ("GET", re.compile(rf"/v1/sandboxes/{SB}"), self.get),
            ("DELETE", re.compile(rf"/v1/sandboxes/{SB}"), self.delete),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/exec"), self.exec),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/sessions"), self.create_session),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/sessions/{SESSION}/run"), self.run),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/sessions/{SESSION}/stdin"), self.stdin),
            (
                "POST",
                re.compile(rf"/v1/sandboxes/{SB}/sessions/{SESSION}/interrupt"),
                self.interrupt,
            ),
            ("DELETE", re.compile(rf"/v1/sandboxes/{SB}/sessions/{SESSION}"), self.close_session),
            ("GET", re.compile(rf"/v1/sandboxes/{SB}/files"), self.read_file),
            ("PUT", re.compile(rf"/v1/sandboxes/{SB}/files"), self.write_file),
            ("GET", re.compile(rf"/v1/sandboxes/{SB}/files/stat"), self.stat),
            ("GET", re.compile(rf"/v1/sandboxes/{SB}/files/list"), self.list_dir),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/files/mkdir"), self.mkdir),
            ("POST", re.compile(rf"/v1/sandboxes/{SB}/files/remove"), self.remove),
            ("GET", re.compile(rf"/v1/sandboxes/{SB}/stats"), self.stats),
        ]

    # The transport's handler ---------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.injected:
            reply = self.injected.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply
        try:
            for method, pattern, handler in self._routes:
                match = pattern.fullmatch(request.url.path)
                if match and request.method == method:
                    return handler(request, **match.groupdict())
            raise NotFound(f"no route {request.method} {request.url.path}")
        except RockError as exc:
            return httpx.Response(exc.status, json=to_body(exc))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    # Helpers --------------------------------------------------------------------------------

    def _sb(self, sandbox_id: str) -> FakeSandbox:
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise SandboxNotFound(f"no sandbox {sandbox_id}") from None

    def _session(self, sandbox_id: str, session: str) -> list[str]:
        sb = self._sb(sandbox_id)
        if session not in sb.sessions:
            raise SessionNotFound(f"no session {session}")
        return sb.sessions[session]

    @staticmethod
    def _path(request: httpx.Request) -> str:
        path = request.url.params.get("path")
        if not path:
            raise InvalidRequest("path is required")
        return str(path)

    # Routes ---------------------------------------------------------------------------------

    def health(self, request):
        return _json(Health(status="ok", version="0.1.0"))

    def create(self, request):
        spec = CreateSandboxRequest.model_validate_json(request.content)
        self._n += 1
        record = SandboxRecord(
            id=f"sb-w0-{self._n:08d}",
            state=SandboxState.RUNNING,
            owner=spec.owner,
            labels=spec.labels,
            image=spec.image,
            resources=spec.resources,
            network=spec.network,
            worker="w0",
            node_id="node0",
            created_at=time.time(),
            expires_at=time.time() + spec.ttl_seconds if spec.ttl_seconds else None,
        )
        self.sandboxes[record.id] = FakeSandbox(record)
        return _json(record, 201)

    def list(self, request):
        params = request.url.params
        items = [sb.record for sb in reversed(self.sandboxes.values())]
        if "owner" in params:
            items = [r for r in items if r.owner == params["owner"]]
        if "state" in params:
            items = [r for r in items if r.state.value == params["state"]]
        for label in params.get_list("label"):
            key, _, value = label.partition("=")
            items = [r for r in items if r.labels.get(key) == value]
        return _json(SandboxList(items=items))

    def get(self, request, id):
        return _json(self._sb(id).record)

    def delete(self, request, id):
        self._sb(id)
        del self.sandboxes[id]
        return httpx.Response(204)

    def exec(self, request, id):
        self._sb(id)
        req = ExecRequest.model_validate_json(request.content)
        text = req.command if isinstance(req.command, str) else " ".join(req.command)
        result = ExecResult(exit_code=0, stdout=f"ran {text}\n", stderr="", duration=0.01)
        if request.url.params.get("stream") == "true":
            return _ndjson(
                OutputChunk(stream="stdout", data="ran "),
                OutputChunk(stream="stdout", data=f"{text}\n"),
                result,
            )
        return _json(result)

    def create_session(self, request, id):
        sb = self._sb(id)
        req = SessionCreateRequest.model_validate_json(request.content)
        if req.session in sb.sessions:
            raise SessionExists(f"session {req.session} exists")
        sb.sessions[req.session] = []
        return _json(SessionCreateResponse(session=req.session))

    def run(self, request, id, session):
        history = self._session(id, session)
        body = SessionRunBody.model_validate_json(request.content)
        history.append(body.command)
        result = SessionRunResult(
            session=session,
            output=f"{body.command}\n",
            exit_code=0,
            duration=0.01,
            session_ended=body.command == "exit",
        )
        if body.command == "exit":
            del self._sb(id).sessions[session]
        if request.url.params.get("stream") == "true":
            return _ndjson(OutputChunk(stream="output", data=result.output), result)
        return _json(result)

    def stdin(self, request, id, session):
        self._session(id, session).append(
            "stdin:" + SessionStdinBody.model_validate_json(request.content).data
        )
        return httpx.Response(204)

    def interrupt(self, request, id, session):
        self._session(id, session).append("^C")
        return httpx.Response(204)

    def close_session(self, request, id, session):
        self._session(id, session)
        del self._sb(id).sessions[session]
        return httpx.Response(204)

    def read_file(self, request, id):
        sb, path = self._sb(id), self._path(request)
        if path not in sb.files:
            raise FileNotFound(f"no such file: {path}")
        return httpx.Response(
            200, content=sb.files[path], headers={"Content-Type": "application/octet-stream"}
        )

    def write_file(self, request, id):
        sb, path = self._sb(id), self._path(request)
        sb.files[path] = request.content
        return _json(FileWritten(path=path, size=len(request.content)))

    def _info(self, sb: FakeSandbox, path: str) -> FileInfo:
        if path in sb.files:
            kind, size = "file", len(sb.files[path])
        elif path in sb.dirs:
            kind, size = "dir", 0
        else:
            raise FileNotFound(f"no such file: {path}")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return FileInfo(path=path, name=name, type=kind, size=size, mode=0o644, mtime=0.0)

    def stat(self, request, id):
        sb = self._sb(id)
        return _json(self._info(sb, self._path(request)))

    def list_dir(self, request, id):
        sb, path = self._sb(id), self._path(request).rstrip("/")
        children = sorted(
            p for p in [*sb.files, *sb.dirs] if p != path and p.rsplit("/", 1)[0] == path
        )
        entries = [self._info(sb, p) for p in children]
        return _json(ListDirResult(path=path, entries=entries))

    def mkdir(self, request, id):
        req = MkdirRequest.model_validate(json.loads(request.content))
        self._sb(id).dirs.add(req.path)
        return httpx.Response(204)

    def remove(self, request, id):
        sb = self._sb(id)
        req = RemoveRequest.model_validate(json.loads(request.content))
        if req.path in sb.files:
            del sb.files[req.path]
        elif req.path in sb.dirs:
            sb.dirs.discard(req.path)
        elif not req.missing_ok:
            raise FileNotFound(f"no such file: {req.path}")
        return httpx.Response(204)

    def stats(self, request, id):
        self._sb(id)
        return _json(SandboxStats(cpu_count=2, pids_current=3))


# ---------------------------------------------------------------------------------------------
# The tests: every one runs against both twins.

TOKEN = "s3cret"
FAST = RetryPolicy(max_attempts=3, base=0.001, max_backoff=0.002, max_total=5.0)


@pytest.fixture
def platform():
    return FakePlatform()


@pytest.fixture(params=["sync", "async"])
async def client(request, platform):
    kwargs = dict(base_url="http://rock.test", token=TOKEN, retry=FAST, transport=None)
    if request.param == "sync":
        c = Client(**{**kwargs, "transport": platform.transport()})
        yield c
        c.close()
    else:
        c = AsyncClient(**{**kwargs, "transport": platform.transport()})
        yield c
        await c.aclose()


async def call(value):
    """Await the async twin's coroutines; pass the sync twin's results through."""
    return await value if inspect.isawaitable(value) else value


async def collect(iterator):
    if hasattr(iterator, "__aiter__"):
        return [item async for item in iterator]
    return list(iterator)


async def in_sandbox(client, body, **spec):
    """Run ``body(sb)`` inside the twin's sandbox context manager."""
    sb = client.sandbox(**spec)
    if isinstance(sb, AsyncSandbox):
        async with sb:
            await body(sb)
    else:
        assert isinstance(sb, Sandbox)
        with sb:
            await body(sb)
    return sb


def _body(request: httpx.Request):
    return json.loads(request.content)


async def test_health_and_auth_header(client, platform):
    health = await call(client.health())
    assert health == Health(status="ok", version="0.1.0")
    (request,) = platform.requests
    assert request.method == "GET"
    assert str(request.url) == "http://rock.test/v1/health"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["User-Agent"].startswith("rock-serve-sdk/")


async def test_no_auth_header_without_a_token(platform, monkeypatch):
    monkeypatch.delenv("ROCK_TOKEN", raising=False)
    with Client("http://rock.test", transport=platform.transport()) as c:
        c.health()
    assert "Authorization" not in platform.requests[0].headers


async def test_sandbox_lifecycle(client, platform):
    record = await call(
        client.create_sandbox(image="alpine", ttl_seconds=60, owner="me", labels={"job": "a"})
    )
    assert isinstance(record, SandboxRecord)
    assert record.id in platform.sandboxes
    request = platform.requests[-1]
    assert (request.method, request.url.path) == ("POST", "/v1/sandboxes")
    # Only what was set goes on the wire (plus a fresh client_token, so a resend is safe).
    sent = _body(request)
    assert re.fullmatch(r"[0-9a-f]{32}", sent.pop("client_token"))
    assert sent == {
        "image": "alpine",
        "ttl_seconds": 60,
        "owner": "me",
        "labels": {"job": "a"},
    }
    other = await call(client.create_sandbox(CreateSandboxRequest(owner="you")))

    assert await call(client.get_sandbox(record.id)) == record
    listed = await call(client.list_sandboxes(owner="me", state="running", labels={"job": "a"}))
    assert [r.id for r in listed] == [record.id]
    params = platform.requests[-1].url.params
    assert (params["owner"], params["state"], params.get_list("label")) == (
        "me",
        "running",
        ["job=a"],
    )
    assert {r.id for r in await call(client.list_sandboxes())} == {record.id, other.id}

    assert await call(client.delete_sandbox(record.id)) is None
    assert platform.requests[-1].method == "DELETE"
    assert record.id not in platform.sandboxes
    with pytest.raises(SandboxNotFound) as info:
        await call(client.get_sandbox(record.id))
    assert isinstance(info.value, LookupError)


async def test_ids_are_quoted_into_one_path_segment(client, platform):
    with pytest.raises(NotFound):
        await call(client.get_sandbox("../health"))
    assert platform.requests[-1].url.raw_path == b"/v1/sandboxes/..%2Fhealth"


async def test_exec_request_and_result(client, platform):
    sb = await call(client.create_sandbox())
    result = await call(client.exec(sb.id, ["ls", "-l"], cwd="/tmp", env={"A": "1"}, timeout=5))
    assert isinstance(result, ExecResult)
    assert result.stdout == "ran ls -l\n"
    request = platform.requests[-1]
    assert request.url.path == f"/v1/sandboxes/{sb.id}/exec"
    assert "stream" not in request.url.params
    body = _body(request)
    assert body["command"] == ["ls", "-l"] and body["cwd"] == "/tmp" and body["timeout"] == 5
    assert body["env"] == {"A": "1"}


async def test_stream_exec_yields_chunks_then_the_result(client, platform):
    sb = await call(client.create_sandbox())
    items = await collect(client.stream_exec(sb.id, "echo hi"))
    assert [type(i) for i in items] == [OutputChunk, OutputChunk, ExecResult]
    assert "".join(i.data for i in items[:-1]) == "ran echo hi\n"
    assert platform.requests[-1].url.params["stream"] == "true"


async def test_stream_raises_an_error_line_as_a_typed_error(client, platform):
    sb = await call(client.create_sandbox())
    chunk = OutputChunk(stream="stdout", data="partial")
    body = (
        chunk.model_dump_json() + "\n" + json.dumps(to_body(SandboxNotRunning("it stopped"))) + "\n"
    )
    platform.injected.append(httpx.Response(200, content=body))
    seen = []
    with pytest.raises(SandboxNotRunning, match="it stopped"):
        iterator = client.stream_exec(sb.id, "sleep 100")
        if hasattr(iterator, "__aiter__"):
            async for item in iterator:
                seen.append(item)
        else:
            seen.extend(iterator)
    assert seen == [chunk]


async def test_stream_that_ends_early_is_an_error(client, platform):
    sb = await call(client.create_sandbox())
    chunk = OutputChunk(stream="stdout", data="partial")
    platform.injected.append(httpx.Response(200, content=chunk.model_dump_json() + "\n"))
    with pytest.raises(InternalError, match="ended before"):
        await collect(client.stream_exec(sb.id, "true"))


async def test_sessions(client, platform):
    sb = await call(client.create_sandbox())
    created = await call(client.create_session(sb.id, "dev", cwd="/src", startup_commands=["x=1"]))
    assert created.session == "dev"
    assert _body(platform.requests[-1]) == {
        "session": "dev",
        "env": None,
        "cwd": "/src",
        "startup_commands": ["x=1"],
    }
    with pytest.raises(SessionExists):
        await call(client.create_session(sb.id, "dev"))

    result = await call(client.run(sb.id, "echo $x", session="dev", timeout=7))
    assert isinstance(result, SessionRunResult) and result.output == "echo $x\n"
    request = platform.requests[-1]
    assert request.url.path == f"/v1/sandboxes/{sb.id}/sessions/dev/run"
    assert _body(request)["timeout"] == 7 and "session" not in _body(request)
    assert request.extensions["timeout"]["read"] == 7 + 30.0

    items = await collect(client.stream_run(sb.id, "pwd", session="dev"))
    assert [type(i) for i in items] == [OutputChunk, SessionRunResult]

    await call(client.session_stdin(sb.id, "y\n", session="dev", eof=True))
    assert _body(platform.requests[-1]) == {"data": "y\n", "eof": True}
    await call(client.interrupt(sb.id, session="dev"))
    assert platform.sandboxes[sb.id].sessions["dev"][-2:] == ["stdin:y\n", "^C"]
    await call(client.close_session(sb.id, session="dev"))
    with pytest.raises(SessionNotFound):
        await call(client.run(sb.id, "true", session="dev"))


async def test_files(client, platform):
    sb = await call(client.create_sandbox())
    data = bytes(range(256))
    written = await call(client.write_file(sb.id, "/root/a.bin", data, mode=0o600))
    assert written.size == 256
    request = platform.requests[-1]
    assert request.method == "PUT" and request.content == data
    assert dict(request.url.params) == {"path": "/root/a.bin", "mode": "600"}
    assert await call(client.read_file(sb.id, "/root/a.bin")) == data
    info = await call(client.stat(sb.id, "/root/a.bin"))
    assert (info.type, info.size) == ("file", 256)
    await call(client.mkdir(sb.id, "/root/d"))
    assert _body(platform.requests[-1]) == {"path": "/root/d", "parents": True, "exist_ok": True}
    listing = await call(client.list_dir(sb.id, "/root"))
    assert [e.name for e in listing.entries] == ["a.bin", "d"]
    await call(client.remove(sb.id, "/root/a.bin"))
    with pytest.raises(FileNotFound) as info:
        await call(client.read_file(sb.id, "/root/a.bin"))
    assert isinstance(info.value, FileNotFoundError)
    await call(client.remove(sb.id, "/root/a.bin", missing_ok=True))
    stats = await call(client.stats(sb.id))
    assert stats.cpu_count == 2


# Errors and retries ---------------------------------------------------------------------------


def _error(exc, **headers):
    return httpx.Response(exc.status, json=to_body(exc), headers=headers)


async def test_429_with_retry_after_is_retried_then_succeeds(client, platform):
    platform.injected += [
        _error(RateLimited("slow down"), **{"Retry-After": "0"}),
        _error(RuntimeUnavailable("busy", retry_after=0.001)),
    ]
    assert (await call(client.health())).status == "ok"
    assert len(platform.requests) == 3


async def test_retries_exhausted_raise_rate_limited(client, platform):
    platform.injected += [_error(RateLimited("slow down"), **{"Retry-After": "0"})] * 5
    with pytest.raises(RateLimited) as info:
        await call(client.create_sandbox())
    assert info.value.retry_after == 0
    assert len(platform.requests) == FAST.max_attempts


async def test_a_retry_after_beyond_the_time_budget_is_not_waited_for(client, platform):
    platform.injected.append(_error(RateLimited("later", retry_after=3600)))
    with pytest.raises(RateLimited) as info:
        await call(client.health())
    assert info.value.retry_after == 3600
    assert len(platform.requests) == 1


async def test_500_is_not_retried(client, platform):
    platform.injected.append(_error(InternalError("boom")))
    with pytest.raises(InternalError, match="boom"):
        await call(client.health())
    assert len(platform.requests) == 1


@pytest.mark.parametrize(
    ("status", "expected"), [(404, NotFound), (401, Unauthorized), (502, InternalError)]
)
async def test_non_json_error_body_maps_by_status(client, platform, status, expected):
    platform.injected.append(httpx.Response(status, text="<html>Bad Gateway</html>"))
    with pytest.raises(expected) as info:
        await call(client.session_stdin("sb-a-00000000", "x") if status == 502 else client.health())
    assert isinstance(info.value, RockError)
    assert str(status) in str(info.value)


async def test_a_proxy_500_is_resent_only_when_safe(client, platform):
    """A bare 500 is the Serve proxy's (its Admin replica died mid-call): resend safe calls."""
    platform.injected.append(httpx.Response(500, text="Internal Server Error"))
    assert (await call(client.health())).status == "ok"
    platform.injected.append(httpx.Response(500, text="Internal Server Error"))
    record = await call(client.create_sandbox())
    creates = [r for r in platform.requests if r.url.path == "/v1/sandboxes" and r.method == "POST"]
    assert len(creates) == 2
    assert creates[0].headers["Idempotency-Key"] == creates[1].headers["Idempotency-Key"]
    assert _body(creates[0])["client_token"] == _body(creates[1])["client_token"]
    platform.injected.append(httpx.Response(500, text="Internal Server Error"))
    with pytest.raises(InternalError):  # stdin cannot be resent safely
        await call(client.session_stdin(record.id, "hello"))


async def test_non_json_503_is_retried(client, platform):
    platform.injected.append(httpx.Response(503, text="upstream overloaded"))
    assert (await call(client.health())).status == "ok"


async def test_connection_errors_retry_safe_calls_only(client, platform):
    platform.injected.append(httpx.ConnectError("refused"))
    assert (await call(client.health())).status == "ok"
    assert len(platform.requests) == 2

    platform.injected.append(httpx.ConnectError("refused"))
    record = await call(client.create_sandbox())  # carries a client_token: safe
    assert len(platform.requests) == 4

    platform.injected.append(httpx.ConnectError("refused"))
    with pytest.raises(httpx.ConnectError):
        await call(client.session_stdin(record.id, "x"))


async def test_a_reply_that_does_not_fit_the_model_is_an_internal_error(client, platform):
    platform.injected.append(httpx.Response(200, json={"surprise": True}))
    with pytest.raises(InternalError, match="Health"):
        await call(client.health())


# Sandbox objects -----------------------------------------------------------------------------


async def test_sandbox_context_manager(client, platform):
    async def body(sb):
        assert sb.id in platform.sandboxes
        assert sb.record.image == "alpine"
        result = await call(sb.run("echo 1"))
        assert result.output == "echo 1\n"
        await call(sb.run("echo 2"))
        # The default session was created once, lazily, on the first run.
        creates = [r for r in platform.requests if r.url.path.endswith("/sessions")]
        assert len(creates) == 1
        assert (await call(sb.exec(["true"]))).exit_code == 0
        assert len(await collect(sb.stream_exec("x"))) == 3
        assert (await collect(sb.stream_run("y")))[-1].output == "y\n"
        await call(sb.files.write("/root/t.txt", "héllo"))
        assert await call(sb.files.read_text("/root/t.txt")) == "héllo"
        assert (await call(sb.files.stat("/root/t.txt"))).size == len("héllo".encode())
        await call(sb.files.mkdir("/root/d"))
        assert [e.name for e in (await call(sb.files.list("/root"))).entries] == ["d", "t.txt"]
        await call(sb.files.remove("/root/d"))
        assert (await call(sb.stats())).pids_current == 3
        assert (await call(sb.refresh())).id == sb.id

    sb = await in_sandbox(client, body, image="alpine", ttl_seconds=30)
    assert platform.sandboxes == {}
    assert platform.requests[-1].method == "DELETE"
    with pytest.raises(RuntimeError, match="not created"):
        type(sb)(client).id  # noqa: B018


async def test_sandbox_is_deleted_when_the_block_raises(client, platform):
    async def body(sb):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await in_sandbox(client, body)
    assert platform.sandboxes == {}


async def test_sandbox_already_gone_is_fine(client, platform):
    async def body(sb):
        await call(client.delete_sandbox(sb.id))

    await in_sandbox(client, body)
    assert platform.requests[-1].method == "DELETE"


async def test_a_failing_delete_does_not_hide_the_block_error(client, platform, caplog):
    async def body(sb):
        platform.injected.append(_error(InternalError("delete broke")))
        raise ValueError("the real problem")

    with pytest.raises(ValueError, match="the real problem"):
        await in_sandbox(client, body)
    assert "could not delete sandbox" in caplog.text


async def test_session_recreated_after_exit_and_existing_session_adopted(client, platform):
    async def body(sb):
        await call(client.create_session(sb.id))  # made behind the object's back
        await call(sb.run("exit"))  # adopts it (SessionExists), then the shell ends
        assert platform.sandboxes[sb.id].sessions == {}
        assert (await call(sb.run("echo again"))).output == "echo again\n"
        await call(sb.session_stdin("z", eof=True))
        await call(sb.interrupt())
        await call(sb.close_session())
        assert platform.sandboxes[sb.id].sessions == {}

    await in_sandbox(client, body)


async def test_wrapping_an_existing_sandbox(client, platform):
    record = await call(client.create_sandbox())
    cls = AsyncSandbox if isinstance(client, AsyncClient) else Sandbox
    sb = cls(client, record, delete_on_exit=False)
    if isinstance(sb, AsyncSandbox):
        async with sb:
            pass
    else:
        with sb:
            pass
    assert record.id in platform.sandboxes
    await call(sb.delete())
    assert platform.sandboxes == {}


async def test_leaving_a_stream_early(client, platform):
    sb = await call(client.create_sandbox())
    iterator = client.stream_exec(sb.id, "yes")
    if hasattr(iterator, "__aiter__"):
        async with contextlib.aclosing(iterator) as items:
            async for _ in items:
                break
    else:
        with contextlib.closing(iterator) as items:
            for _ in items:
                break
    assert (await call(client.health())).status == "ok"


async def test_a_dead_rocklet_is_not_retried(client, platform):
    body = {"error": {"code": "rocklet_unavailable", "message": "rocklet exited"}}
    platform.injected.append(httpx.Response(503, json=body))
    with pytest.raises(RockletUnavailable):
        await call(client.health())
    assert len(platform.requests) == 1
