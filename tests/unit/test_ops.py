"""The one operation model (``rock_serve.protocol.ops``): every operation in the union has its
places (agent handler, Worker dispatch row, REST route in the Admin's OpenAPI schema and on the
direct data plane, SDK method on every client) and runs through ``Worker.op`` /
``Worker.op_stream`` against a real rocklet (local runtime).

Adding an operation without one of its places fails here (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import functools
import io
import tarfile
import warnings
from pathlib import Path
from typing import Any, Literal, cast, get_args

import httpx
import pytest
from pydantic import Field, ValidationError

from rock_serve.config import ServerArgs
from rock_serve.deployments._dataplane import make_app
from rock_serve.deployments._ops import LIMITS
from rock_serve.deployments.client import AsyncRayClient, RayClient
from rock_serve.deployments.worker import Worker
from rock_serve.errors import Conflict, InvalidRequest
from rock_serve.protocol import CreateSandboxRequest, ExecRequest, OutputChunk
from rock_serve.protocol._base import WireModel
from rock_serve.protocol.ops import (
    OPS,
    ExecOp,
    FileListOp,
    FileReadOp,
    FileStatOp,
    FileWriteOp,
    MkdirOp,
    Op,
    Operation,
    OpSpec,
    RemoveOp,
    SessionCloseOp,
    SessionCreateOp,
    SessionInterruptOp,
    SessionRunOp,
    SessionStdinOp,
    StatsOp,
    Streams,
    TarDownloadOp,
    TarUploadOp,
    parse_operation,
)
from rock_serve.rocklet.agent import OPS as AGENT_OPS
from rock_serve.rocklet.handle import RockletHandle
from rock_serve.runtime.fake import FakeRuntime
from rock_serve.sdk import AsyncClient, Client
from tests._wait import async_wait_until

with warnings.catch_warnings():  # Ray Serve's own models warn on import (pydantic 2.x)
    warnings.simplefilter("ignore", DeprecationWarning)
    from rock_serve.deployments.admin import app

UNION: list[type[Op[Any]]] = list(get_args(get_args(Operation)[0]))


_MISSING = object()


@functools.cache
def _direct_routes() -> list[Any]:
    return list(make_app(cast(Any, None)).routes)  # the routes only; no Worker is called


@functools.cache
def _schema() -> dict[str, Any]:
    with warnings.catch_warnings():  # the swerex route's two methods share an operation id
        warnings.simplefilter("ignore", UserWarning)
        return app.openapi()


def _generic_arg(model: type, origin: type) -> Any:
    """The type argument ``model`` gave ``origin`` (``ExecOp`` -> ``Op[ExecResult]`` ->
    ExecResult), or ``_MISSING`` when it does not derive from it.
    """
    for base in model.__mro__:
        meta = getattr(base, "__pydantic_generic_metadata__", None)
        if meta and meta["origin"] is origin:
            return meta["args"][0]
    return _MISSING


def _same_type(a: Any, b: Any) -> bool:
    def members(t: Any) -> set[Any]:
        return {type(None) if m is None else m for m in (get_args(t) or (t,))}

    return members(a) == members(b)


def test_the_registry_is_the_union():
    tags = [model.model_fields["op"].default for model in UNION]
    assert len(tags) == len(set(tags)), "two operations share a tag"
    assert sorted(tags) == sorted(OPS), "OPS and the Operation union disagree"
    for tag, spec in OPS.items():
        assert spec.model.model_fields["op"].default == tag
        result = _generic_arg(spec.model, Op)
        assert result is not _MISSING and _same_type(result, spec.result), f"{tag}: result"
        item = _generic_arg(spec.model, Streams)
        if spec.item is None:
            assert item is _MISSING, f"{tag}: streams but OPS says it does not"
        else:
            assert _same_type(item, spec.item), f"{tag}: stream item"


@pytest.mark.parametrize("tag", sorted(OPS))
def test_every_operation_has_its_four_places(tag):
    spec = OPS[tag]
    # 1. the agent's handler (the tag is the rocklet's own operation name)
    assert tag in AGENT_OPS, f"{tag}: no handler in rock_serve/rocklet/agent.py"
    # 2. no Worker code: its policies come from the model's traits, which must be known
    model = spec.model
    assert set(model.limits) <= set(LIMITS), f"{tag}: a limit the Worker does not know"
    assert model.payload is None or model.payload in model.model_fields, f"{tag}: payload"
    assert not model.upload or model.payload is not None, f"{tag}: upload without payload"
    assert not model.idempotent or "idempotency_key" in model.model_fields, f"{tag}: key"
    assert not model.output_capped or "max_output_bytes" in model.model_fields, f"{tag}: cap"
    # 3. the REST route, in the Admin's OpenAPI schema
    method, path = spec.route
    paths = _schema()["paths"]
    assert method.lower() in paths.get(path, {}), f"{tag}: no {method} {path} in the schema"
    # ... and on the node's direct data plane (same path and method)
    direct = {(r.path, m) for r in _direct_routes() for m in (r.methods or ())}
    assert (path, method) in direct, f"{tag}: no {method} {path} on the direct data plane"
    # 4. the SDK method, on both clients and both Ray clients (which must not override it
    # with a string-named actor call)
    for client in (AsyncClient, Client, AsyncRayClient, RayClient):
        assert callable(getattr(client, spec.sdk, None)), f"{tag}: no {client.__name__}.{spec.sdk}"


def test_operations_parse_by_tag():
    op = parse_operation({"op": "session.run", "command": "echo hi", "idempotency_key": "k"})
    assert isinstance(op, SessionRunOp)
    assert (op.command, op.session, op.idempotency_key) == ("echo hi", "default", "k")
    assert isinstance(parse_operation(b'{"op": "stats"}'), StatsOp)
    with pytest.raises(ValidationError):
        parse_operation({"op": "file.chmod", "path": "/x"})
    with pytest.raises(ValidationError):  # the request's own rules hold
        parse_operation({"op": "session.run", "session": "a b", "command": "true"})
    # From a validated request, no second validation and the same fields set.
    req = ExecRequest(command=["echo", "x"], timeout=5)
    op = ExecOp.of(req, "key-1")
    assert op.request(ExecRequest) == req
    assert op.request(ExecRequest).model_fields_set == req.model_fields_set
    assert op.idempotency_key == "key-1"


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


#: The command a session runs while these operations are sent to it.
_WHILE_RUNNING = {
    "session.stdin": "read x; echo got $x",
    "session.interrupt": "sh -c 'touch started; exec sleep 30'",
}


async def _while_running(w: Worker, sid: str, command: str, op: Op[Any]) -> tuple[Any, Any]:
    """Send ``op`` once ``command`` runs in session s1; returns (op's result, the command's
    result).
    """
    run = asyncio.ensure_future(w.op(sid, SessionRunOp(session="s1", command=command)))

    async def stdin_taken() -> bool:
        try:
            await w.op(sid, op)
        except Conflict:  # the command does not run yet
            return False
        return True

    async def started() -> bool:
        return (await w.op(sid, ExecOp(command="test -e started"))).exit_code == 0

    if isinstance(op, SessionStdinOp):
        await async_wait_until(stdin_taken, what="the command to take stdin")
        return None, await run
    await async_wait_until(started, what="the command to start")
    result = await w.op(sid, op)
    return result, await run


@pytest.fixture
async def worker(tmp_path):
    args = ServerArgs.model_validate({"runtime": {"type": "local"}, "warm_pool_size": 0})
    w = Worker(args, "w1", "node-1")
    await w.ready()
    sid = "sb-w1-0123456789abcdef"
    await w.create(sid, CreateSandboxRequest(), ttl=600)
    yield w, sid
    await w.shutdown()


async def test_every_operation_runs_through_the_one_entry_point(worker):
    w, sid = worker
    root = Path("ops")  # relative: inside the sandbox's directory
    steps: list[Op[Any]] = [
        MkdirOp(path=str(root)),
        FileWriteOp(path=str(root / "a.txt"), data=b"hello\n", mode=0o600),
        FileReadOp(path=str(root / "a.txt")),
        FileStatOp(path=str(root / "a.txt")),
        FileListOp(path=str(root)),
        TarUploadOp(path=str(root / "t"), data=_tar("b.txt", b"from tar")),
        TarDownloadOp(path=str(root / "t")),
        ExecOp(command=f"cat {root}/t/b.txt", idempotency_key="once"),
        SessionCreateOp(session="s1"),
        SessionRunOp(session="s1", command="export X=1; echo $X"),
        SessionStdinOp(session="s1", data="typed\n"),
        SessionInterruptOp(session="s1"),
        SessionCloseOp(session="s1"),
        RemoveOp(path=str(root), recursive=True),
        StatsOp(),
    ]
    assert {type(op) for op in steps} == set(UNION), "a new operation needs a step here"
    results: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for op in steps:
        tag = type(op).model_fields["op"].default
        # What crosses Ray or the wire: the model survives a round trip by its tag.
        assert parse_operation(op.model_dump()) == op
        if tag in _WHILE_RUNNING:  # needs a command running in the session
            result, runs[tag] = await _while_running(w, sid, _WHILE_RUNNING[tag], op)
        else:
            result = await w.op(sid, op)
        expected = OPS[tag].result
        allowed = tuple(t for t in (get_args(expected) or (expected,)))
        assert isinstance(result, allowed), f"{tag}: {type(result).__name__}"
        results[tag] = result
    assert results["file.read"] == b"hello\n"
    assert results["file.stat"].size == 6 and results["file.stat"].mode & 0o777 == 0o600
    assert [e.name for e in results["file.list"].entries] == ["a.txt"]
    assert results["file.write"].size == 6
    with tarfile.open(fileobj=io.BytesIO(results["tar.download"])) as tar:
        assert "b.txt" in {Path(m.name).name for m in tar.getmembers()}
    assert results["exec"].stdout == "from tar"
    assert results["session.run"].output == "1\n"
    assert runs["session.stdin"].output == "got typed\n"
    assert runs["session.interrupt"].exit_code == 130
    assert (await w.op(sid, ExecOp(command="test -e ops"))).exit_code == 1  # removed
    assert results["stats"].pids_current >= 1


async def test_streaming_operations_stream(worker):
    w, sid = worker
    await w.op(sid, FileWriteOp(path="f", data=b"x" * 100_000))
    items = [i async for i in w.op_stream(sid, ExecOp(command="echo one; echo two"))]
    assert all(isinstance(i, OutputChunk) for i in items[:-1])
    assert "".join(i.data for i in items[:-1]) == "one\ntwo\n" and items[-1].exit_code == 0
    await w.op(sid, SessionCreateOp())
    items = [i async for i in w.op_stream(sid, SessionRunOp(command="echo s"))]
    assert "".join(i.data for i in items[:-1]) == "s\n" and items[-1].exit_code == 0
    chunks = [c async for c in w.op_stream(sid, FileReadOp(path="f"))]
    assert b"".join(chunks) == b"x" * 100_000
    tar = b"".join([c async for c in w.op_stream(sid, TarDownloadOp(path="f"))])
    assert tarfile.open(fileobj=io.BytesIO(tar)).getmembers()[0].size == 100_000
    with pytest.raises(InvalidRequest):  # does not stream
        async for _ in w.op_stream(sid, StatsOp()):  # type: ignore[arg-type]
            pass
    with pytest.raises(InvalidRequest):  # not an operation
        await w.op(sid, ExecRequest(command="true"))  # type: ignore[arg-type]


def _calls(sid: str) -> dict[str, Any]:
    """The SDK's own call for each operation (as ``AsyncClient`` builds it)."""
    from rock_serve.protocol import MkdirRequest, RemoveRequest, SessionRunBody, SessionStdinBody
    from rock_serve.protocol.commands import SessionCreateRequest
    from rock_serve.sdk import _base

    return {
        "exec": _base.exec_(sid, ExecRequest(command="echo hi", env={"A": "1"})),
        "session.create": _base.create_session(sid, SessionCreateRequest(session="s.1")),
        "session.run": _base.run(sid, "s.1", SessionRunBody(command="pwd")),
        "session.stdin": _base.session_stdin(sid, "s.1", SessionStdinBody(data="y\n", eof=True)),
        "session.interrupt": _base.interrupt(sid, "s.1"),
        "session.close": _base.close_session(sid, "s.1"),
        "file.read": _base.read_file(sid, "/a b?c"),
        "file.write": _base.write_file(sid, "/a", b"\x00\xff", 0o640),
        "file.stat": _base.stat(sid, "/a"),
        "file.list": _base.list_dir(sid, "/"),
        "file.mkdir": _base.mkdir(sid, MkdirRequest(path="/d", parents=False)),
        "file.remove": _base.remove(sid, RemoveRequest(path="/d", recursive=True)),
        "tar.download": _base.download_archive(sid, "/d"),
        "tar.upload": _base.upload_archive(sid, "/d", b"tar"),
        "stats": _base.stats(sid),
    }


def test_the_ray_transport_maps_each_sdk_call_to_its_operation():
    """Over Ray the SDK's own calls become operations (no Ray-client method per operation)."""
    from rock_serve.deployments._ray_ops import operation_of, reply
    from rock_serve.protocol import FileWritten
    from rock_serve.sdk import _base

    sid = "sb-w1-0123456789abcdef"
    calls = _calls(sid)
    assert sorted(calls) == sorted(OPS), "a new operation needs its SDK call here"
    ops = {}
    for tag, call in calls.items():
        mapped = operation_of(call)
        assert mapped is not None, tag
        assert mapped[0] == sid and type(mapped[1]) is OPS[tag].model and not mapped[2]
        ops[tag] = mapped[1]
    assert ops["exec"].env == {"A": "1"} and ops["exec"].idempotency_key is None
    assert ops["session.run"].session == "s.1" and ops["session.run"].command == "pwd"
    assert (ops["session.stdin"].data, ops["session.stdin"].eof) == ("y\n", True)
    assert ops["file.read"].path == "/a b?c"
    assert (ops["file.write"].data, ops["file.write"].mode) == (b"\x00\xff", 0o640)
    assert (ops["file.mkdir"].parents, ops["file.remove"].recursive) == (False, True)
    assert ops["tar.upload"].data == b"tar"
    streamed = operation_of(_base.exec_(sid, ExecRequest(command="x"), stream=True))
    assert streamed is not None and streamed[2] and streamed[1].idempotency_key is None
    # Not data-plane operations: left to the other paths.
    assert operation_of(_base.get_sandbox(sid)) is None
    assert operation_of(_base.renew(sid)) is None
    # The reply parses as the Admin's would.
    written = FileWritten(path="/a", size=2)
    assert _base.parse(reply(calls["file.write"], written), FileWritten) == written
    assert reply(calls["file.read"], b"\x00").content == b"\x00"
    assert reply(calls["file.mkdir"], None).status_code == 204


# ---------------------------------------------------------------------------- four places

#: Where an operation may be named (by its model class, or its dotted tag as a string): its
#: four homes, then the generic machinery that may name some with the reason. Anything else
#: naming one is a fifth layer a new operation would need.
_HOMES = {
    "rock_serve/protocol/ops.py": "1. the model and its OPS row (whose route is its 3. route)",
    "rock_serve/rocklet/agent.py": "2. the agent's handler",
    "sdk/": "4. the SDK method",
}
_ALLOWED = {
    "rock_serve/rocklet/handle.py": "typed conveniences over RockletHandle.op for code that "
    "holds a handle (the rocklet's HTTP mode, runtimes' tests, fork); a new op needs none",
    "deployments/_dataplane.py": "the batch route (one session.run on N sandboxes)",
}
_SOURCES = ("rock_serve", "deployments", "sdk", "envs")


def _names_in(path: Path, classes: set[str], tags: set[str]) -> set[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in classes:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in classes:
            found.add(node.attr)
        elif isinstance(node, ast.alias) and node.name in classes:
            found.add(node.name)
        elif isinstance(node, ast.Constant) and node.value in tags:
            found.add(str(node.value))
    return found


def test_an_operation_is_named_only_in_its_four_places():
    """No module besides the four homes (and the listed generic machinery) names an
    operation's model or tag: the Worker, the Admin, the data plane, the Ray transport and
    the rocklet handle's ``op`` take any operation from ``OPS`` and its model's traits.
    (Tags without a dot, ``exec`` and ``stats``, are also SDK method names: classes only.)
    """
    repo = Path(__file__).resolve().parents[2]
    classes = {spec.model.__name__ for spec in OPS.values()}
    tags = {tag for tag in OPS if "." in tag}
    fifth: dict[str, set[str]] = {}
    for source in _SOURCES:
        for path in sorted((repo / source).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            if any(rel.startswith(home) for home in (*_HOMES, *_ALLOWED)):
                continue
            names = _names_in(path, classes, tags)
            if names:
                fifth[rel] = names
    assert not fifth, f"operations named outside their four places: {fifth}"
    # The allow-list is not a hiding place: each entry still names something.
    for rel in _ALLOWED:
        assert _names_in(repo / rel, classes, tags), f"{rel} names no operation: drop it"


class _Echoed(WireModel):
    """What the throwaway operation answers."""

    text: str = Field(description="The text, repeated.")
    times: int = Field(description="How many times.")


class _EchoOp(Op[_Echoed]):
    """A throwaway operation: its model, one OPS row, one agent handler; nothing else."""

    op: Literal["test.echo"] = "test.echo"
    text: str = Field(max_length=64, description="Text to repeat.")
    times: int = Field(default=1, ge=1, le=8, description="How many times.")


async def _op_test_echo(agent: Any, rid: int, args: dict[str, Any], payload: bytes) -> Any:
    times = args.get("times", 1)  # a field at its default is not sent
    return {"text": args["text"] * times, "times": times}


class _RealAgentRuntime(FakeRuntime):
    """The fake runtime at the seam, but each sandbox runs the real agent in-process (so a
    handler registered in a test serves it).
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def start(self, sandbox_id: str) -> RockletHandle:
        import socket

        from rock_serve.protocol import SandboxState
        from rock_serve.rocklet.agent import Agent

        box = self._box(sandbox_id)
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        a_reader, a_writer = await asyncio.open_connection(sock=theirs, limit=1 << 27)
        agent = Agent(a_reader, a_writer, str(self.root))
        box.agent_writer, box.task = a_writer, asyncio.ensure_future(agent.serve())
        box.host_writer = writer
        box.handle = RockletHandle(reader, writer, name=sandbox_id)
        self._set(box, SandboxState.RUNNING)
        return box.handle


@pytest.fixture
def echo_op(monkeypatch):
    route = ("POST", "/v1/sandboxes/{sandbox_id}/test-echo")
    spec = OpSpec(_EchoOp, _Echoed, None, "test.echo", route, "test_echo")
    monkeypatch.setitem(OPS, "test.echo", spec)
    monkeypatch.setitem(AGENT_OPS, "test.echo", _op_test_echo)
    return spec


async def test_a_new_operation_needs_only_its_model_handler_and_route(
    echo_op, tmp_path, monkeypatch
):
    """A throwaway operation (model + OPS row + agent handler, all in this test) is reachable
    through ``Worker.op``, the direct data plane and the Admin's route machinery, with no
    Worker, handle, route or audit code of its own.
    """
    from typing import Annotated

    from fastapi import Depends, FastAPI

    from rock_serve import dataplane_token
    from rock_serve.deployments import _op_routes

    args = ServerArgs.model_validate({"runtime": {"type": "fake"}, "warm_pool_size": 0})
    w = Worker(args, "w1", "node-1", runtime=_RealAgentRuntime(tmp_path))
    await w.ready()
    sid = "sb-w1-00000000000000e0"
    try:
        await w.create(sid, CreateSandboxRequest(), ttl=600)
        # 1. Worker.op: the model is the frame's arguments, the reply read by its type
        assert await w.op(sid, _EchoOp(text="ab", times=2)) == _Echoed(text="abab", times=2)
        # 2. the direct data plane: the route comes from the OPS row; bad input is typed
        monkeypatch.setenv(args.dataplane.secret_env, "s3cret")
        token, _ = dataplane_token.sign(b"s3cret", sid, namespace="default", token_name="t", ttl=60)
        transport = httpx.ASGITransport(app=make_app(w))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            auth = {"Authorization": f"Bearer {token}"}
            url = f"/v1/sandboxes/{sid}/test-echo"
            ok = await client.post(url, json={"text": "x", "times": 3}, headers=auth)
            assert ok.status_code == 200, ok.text
            assert ok.json() == {"text": "xxx", "times": 3}
            bad = await client.post(url, json={"text": "x", "times": 99}, headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        # 3. the Admin's routes: the same declaration on a FastAPI app (the Admin's sends to
        # the Worker actor; here straight to the Worker), described in its OpenAPI schema
        admin = FastAPI()

        async def serve(route, request, principal, sandbox_id, operation, streamed):
            return await _op_routes.serve_op(route, w, sandbox_id, operation, streamed)

        anyone = Annotated[None, Depends(lambda: None)]  # the Admin's Auth needs its replica
        _op_routes.mount_fastapi(admin, anyone, {}, serve)
        path = _schema_of(admin)["paths"]["/v1/sandboxes/{sandbox_id}/test-echo"]["post"]
        assert "requestBody" in path and "200" in path["responses"]
        transport = httpx.ASGITransport(app=admin)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            ok = await client.post(f"/v1/sandboxes/{sid}/test-echo", json={"text": "y"})
            assert ok.status_code == 200, ok.text
            assert ok.json() == {"text": "y", "times": 1}
    finally:
        await w.shutdown()


def _schema_of(app: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        schema: dict[str, Any] = app.openapi()
    return schema


def test_audit_fields_come_from_the_model_and_carry_no_values():
    from rock_serve.deployments._op_routes import audit_fields

    fields = audit_fields(ExecOp(command="x", env={"K": "secret"}, stdin="pw", cwd="/w"), True)
    assert (fields["command"], fields["env_keys"]) == ("x", ["K"])
    assert fields["detail"] == {"stream": True, "cwd": "/w", "stdin_bytes": 2}
    assert "secret" not in repr(fields) and "pw" not in repr(fields)
    created = audit_fields(SessionCreateOp(session="s", startup_commands=["cd /", "ls"]))
    assert (created["session"], created["command"]) == ("s", "cd /\nls")
    written = audit_fields(FileWriteOp(path="p", data=b"abc", mode=0o600))
    assert written["path"] == "p" and written["detail"] == {"mode": 0o600, "bytes": 3}
    removed = audit_fields(RemoveOp(path="d", recursive=True))
    assert removed["detail"] == {"recursive": True, "missing_ok": False}
