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
from rock_serve.deployments.worker import Worker
from rock_serve.errors import Conflict, InvalidRequest
from rock_serve.protocol import DEFAULT_TIMEOUT, CreateSandboxRequest, ExecRequest, OutputChunk
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
from rock_serve.sdk._async_transport import AsyncTransport
from rock_serve.sdk._sync_transport import Transport
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
    # 4. the SDK method, on both clients (the Ray transport plugs in beneath them)
    for client in (AsyncClient, Client):
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


SID = "sb-w1-0123456789abcdef"

#: Per operation: how its SDK method is called (args after the sandbox id, keywords).
SDK_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "exec": (("echo hi",), {"env": {"A": "1"}}),
    "session.create": ((), {"session": "s.1"}),
    "session.run": (("pwd",), {"session": "s.1"}),
    "session.stdin": (("y\n",), {"session": "s.1", "eof": True}),
    "session.interrupt": ((), {"session": "s.1"}),
    "session.close": ((), {"session": "s.1"}),
    "file.read": (("/a b?c",), {}),
    "file.write": (("/a", b"\x00\xff"), {"mode": 0o640}),
    "file.stat": (("/a",), {}),
    "file.list": (("/",), {}),
    "file.mkdir": (("/d",), {"parents": False}),
    "file.remove": (("/d",), {"recursive": True}),
    "tar.download": (("/d",), {}),
    "tar.upload": (("/d", b"tar"), {}),
    "stats": ((), {}),
}


class _Recorder(AsyncTransport):
    """Records the call, then refuses it (so no reply needs making up)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def send(self, call: Any, *, stream: bool = False) -> Any:
        self.calls.append(call)
        raise InvalidRequest("recorded")


class _SyncRecorder(Transport):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def send(self, call: Any, *, stream: bool = False) -> Any:
        self.calls.append(call)
        raise InvalidRequest("recorded")


def _sdk_calls() -> dict[str, Any]:
    """The call each operation's SDK method hands its transport (async and sync alike)."""
    assert sorted(SDK_CALLS) == sorted(OPS), "a new operation needs its SDK call here"
    recorder, sync_recorder = _Recorder(), _SyncRecorder()
    client = AsyncClient("http://127.0.0.1:9", transport=recorder)
    sync = Client("http://127.0.0.1:9", transport=sync_recorder)
    calls = {}
    for tag, (args, kwargs) in SDK_CALLS.items():
        with pytest.raises(InvalidRequest, match="recorded"):
            asyncio.run(getattr(client, OPS[tag].sdk)(SID, *args, **kwargs))
        with pytest.raises(InvalidRequest, match="recorded"):
            getattr(sync, OPS[tag].sdk)(SID, *args, **kwargs)
        (call,), (twin,) = recorder.calls, sync_recorder.calls
        recorder.calls.clear()
        sync_recorder.calls.clear()
        assert type(call.op) is OPS[tag].model, f"{tag}: the SDK method sends no {tag} model"
        keyless = {"idempotency_key": None}
        assert twin.op.model_copy(update=keyless) == call.op.model_copy(update=keyless), tag
        calls[tag] = call
    return calls


def test_every_sdk_method_hands_its_operation_model_to_the_transport():
    calls = _sdk_calls()
    ops = {tag: call.op for tag, call in calls.items()}
    assert all(call.sandbox == SID for call in calls.values())
    assert ops["exec"].env == {"A": "1"} and ops["exec"].idempotency_key is not None
    assert ops["session.run"].session == "s.1" and ops["session.run"].command == "pwd"
    assert ops["session.run"].idempotency_key is not None  # commands are resent safely
    assert (ops["session.stdin"].data, ops["session.stdin"].eof) == ("y\n", True)
    assert ops["file.read"].path == "/a b?c"
    assert (ops["file.write"].data, ops["file.write"].mode) == (b"\x00\xff", 0o640)
    assert (ops["file.mkdir"].parents, ops["file.remove"].recursive) == (False, True)
    assert ops["tar.upload"].data == b"tar"


def test_the_http_transport_sends_each_operation_on_its_route():
    """The REST request is built from the OPS row alone, and is the wire the Admin reads."""
    from rock_serve.sdk import _base

    settings = _base.ClientSettings(timeout=5.0)
    wire = {}
    for tag, call in _sdk_calls().items():
        kw = _base.request_kwargs(call, settings)
        method, template = OPS[tag].route
        path = template.replace("{sandbox_id}", SID).replace("{session}", "s.1")
        assert (kw["method"], kw["url"]) == (method, path), tag
        key = kw["headers"].get("Idempotency-Key")
        assert key == getattr(call.op, "idempotency_key", None), f"{tag}: Idempotency-Key"
        wire[tag] = (kw.get("params", []), kw.get("json"), kw.get("content"))
    assert wire["exec"][1] == {
        "command": "echo hi",
        "env": {"A": "1"},
        "shell": None,
        "cwd": None,
        "stdin": None,
        "timeout": DEFAULT_TIMEOUT,
        "max_output_bytes": wire["exec"][1]["max_output_bytes"],
    }
    assert wire["session.run"][1] == {
        "command": "pwd",
        "timeout": DEFAULT_TIMEOUT,
        "max_output_bytes": wire["session.run"][1]["max_output_bytes"],
    }
    assert wire["session.create"][1]["session"] == "s.1"
    assert wire["session.stdin"] == ([], {"data": "y\n", "eof": True}, None)
    assert wire["session.interrupt"] == wire["session.close"] == wire["stats"] == ([], None, None)
    assert wire["file.read"] == ([("path", "/a b?c")], None, None)
    assert wire["file.write"] == ([("path", "/a"), ("mode", "640")], None, b"\x00\xff")
    assert wire["file.mkdir"] == ([], {"path": "/d", "parents": False, "exist_ok": True}, None)
    assert wire["file.remove"][1] == {"path": "/d", "recursive": True, "missing_ok": False}
    assert wire["tar.upload"] == ([("path", "/d")], None, b"tar")
    # A command's read waits for its own timeout; a streamed one asks for the stream.
    assert (
        _base.request_kwargs(_sdk_calls()["exec"], settings)["timeout"].read == DEFAULT_TIMEOUT + 30
    )
    streamed = _base.op_call(SID, ExecOp(command="x"), stream=True)
    assert streamed.params == (("stream", "true"),) and streamed.idempotency_key is None
    # A session name is one quoted path segment.
    odd = _base.op_call("sb-w1-x", SessionCloseOp(session="a.b_c"))
    assert odd.path == "/v1/sandboxes/sb-w1-x/sessions/a.b_c"


def test_the_ray_transport_sends_each_operation_model_to_the_worker():
    """Over Ray the model itself goes to ``Worker.ray_op`` (no REST encoding), keyless."""
    from rock_serve.deployments.client import ActorCall, entry, route

    for tag, call in _sdk_calls().items():
        target = route(call)
        assert (target.sandbox, target.method, target.streams) == (SID, "op", False), tag
        (op,) = target.args
        assert type(op) is OPS[tag].model and getattr(op, "idempotency_key", None) is None
        assert op.model_copy(update={"idempotency_key": None}) == call.op.model_copy(
            update={"idempotency_key": None}
        )
        assert entry(target, gate=True, token="t") == ("ray_op", ("t", SID, op))
        assert entry(target, gate=False, token="t") == ("op", (SID, op))
    streamed = route(_base_call_streamed(), stream=True)
    assert streamed == ActorCall(SID, "op_stream", streamed.args, streams=True)
    assert entry(streamed, gate=True, token=None)[0] == "ray_op_stream"


def _base_call_streamed() -> Any:
    from rock_serve.sdk import _base

    return _base.op_call(SID, SessionRunOp(command="x"), stream=True)


def test_the_ray_transport_maps_each_control_plane_call_to_one_actor_method():
    from rock_serve.deployments.client import ROUTES, actor_call, entry
    from rock_serve.protocol.fork import ForkRequest
    from rock_serve.protocol.llm import LLMAnswer, LLMCallList
    from rock_serve.protocol.processes import ProcessSignalBody, ProcessStartRequest
    from rock_serve.protocol.snapshot import SnapshotList, SnapshotRequest
    from rock_serve.sdk import _base, _fork, _llm_base, _processes

    request = CreateSandboxRequest(ray_job_id="0a0b", labels={"k": "v"})
    expected: dict[str, tuple[Any, str, tuple[Any, ...]]] = {
        "health": (_base.health(), "health", ()),
        "create": (_base.create_sandbox(request), "create", ("<request>", "ns")),
        "list": (
            _base.list_sandboxes(owner="o", state="running", labels={"a": "b=c"}),
            "list",
            ("o", "running", {"a": "b=c"}),
        ),
        "by-token": (_base.delete_by_token("ct"), "delete_by_token", ("ct", "ns")),
        "get": (_base.get_sandbox(SID), "get", (SID,)),
        "delete": (_base.delete_sandbox(SID), "delete", (SID,)),
        "renew": (_base.renew(SID), "renew", ()),
        "fork": (_fork.fork_sandbox(SID, ForkRequest(count=2)), "fork", (SID, "<fork>", "ns")),
        "pause": (_fork.pause_sandbox(SID), "pause", (SID, "ns")),
        "resume": (_fork.resume_sandbox(SID), "resume", (SID, "ns")),
        "snapshot": (
            _fork.snapshot_sandbox(SID, SnapshotRequest()),
            "snapshot",
            (SID, SnapshotRequest(), "ns"),
        ),
        "snapshots": (_fork.list_snapshots(), "snapshots", ("ns",)),
        "get_snapshot": (_fork.get_snapshot("sn-1"), "get_snapshot", ("sn-1", "ns")),
        "delete_snapshot": (_fork.delete_snapshot("sn-1"), "delete_snapshot", ("sn-1", "ns")),
        "start": (
            _processes.start(SID, ProcessStartRequest(command="sleep 1")),
            "start_process",
            (ProcessStartRequest(command="sleep 1"),),
        ),
        "procs": (_processes.list_(SID), "list_processes", ()),
        "status": (_processes.status(SID, 7), "process_status", (7,)),
        "kill": (_processes.kill(SID, 7), "kill_process", (7,)),
        "signal": (
            _processes.signal(SID, 7, ProcessSignalBody(signal="SIGINT")),
            "signal_process",
            (7, ProcessSignalBody(signal="SIGINT")),
        ),
        "wait": (_processes.wait(SID, 7, 2.5), "wait_process", (7, 2.5)),
        "input": (
            _processes.send_input(SID, 7, _processes.input_body(b"\x00", True)),
            "process_input",
            (7, _processes.input_body(b"\x00", True)),
        ),
        "output": (
            _processes.output(SID, 7, "stderr", 5, True),
            "stream_process_output",
            (7, "stderr", 5, True),
        ),
        "llm_poll": (_llm_base.poll(SID, 2.5, 8), "llm_poll", (2.5, 8)),
        "llm_answer": (
            _llm_base.answer(SID, "c-1", LLMAnswer(error="no")),
            "llm_answer",
            ("c-1", LLMAnswer(error="no")),
        ),
        "llm_release": (_llm_base.release(SID, ["c-1", "c-2"]), "llm_release", (["c-1", "c-2"],)),
        "llm_trajectory": (_llm_base.trajectory(SID), "llm_trajectory", ()),
    }
    seen = set()
    for name, (call, method, args) in expected.items():
        target = actor_call(call, tenant="ns")
        assert target.method == method, name
        got = target.args
        if name == "create":
            assert got[0].ray_job_id == "0a0b" and got[0].labels == {"k": "v"}
            got = ("<request>", *got[1:])
        if name == "fork":
            assert got[1].count == 2
            got = (got[0], "<fork>", got[2])
        assert got == args, name
        assert (target.sandbox is None) == (name in _SCHEDULER), name
        assert target.streams == (name == "output"), name
        gated = entry(target, gate=True, token="t")
        assert gated[0] == ("ray_stream" if target.streams else "ray_call"), name
        seen.add(next(k for k in ROUTES if k[0] == call.method and _matches(k[1], call.path)))
    assert seen == set(ROUTES), "a ROUTES row without its case here"
    snaps = actor_call(_fork.list_snapshots(), tenant="ns")
    assert snaps.wrap is not None and snaps.wrap([]) == SnapshotList(items=[])
    polled = actor_call(_llm_base.poll(SID, 1.0, 4), tenant="ns")
    assert polled.wrap is not None and polled.wrap([]) == LLMCallList(calls=[])
    for wait, max_calls in ((61.0, 4), (1.0, 0), (1.0, 4097)):  # the Admin's bounds
        with pytest.raises(InvalidRequest):
            actor_call(_llm_base.poll(SID, wait, max_calls), tenant="ns")
    with pytest.raises(InvalidRequest, match="needs HTTP"):  # images go over HTTP
        actor_call(_base.list_images())
    from rock_serve.errors import SandboxNotFound

    with pytest.raises(SandboxNotFound):
        actor_call(_base.get_sandbox("not-an-id"))


_SCHEDULER = {
    "health",
    "create",
    "list",
    "by-token",
    "get",
    "delete",
    "fork",
    "pause",
    "resume",
    "snapshot",
    "snapshots",
    "get_snapshot",
    "delete_snapshot",
}


def _matches(template: str, path: str) -> bool:
    import re

    pattern = re.sub(r"\\\{(\w+)\\\}", r"[^/]+", re.escape(template))
    return re.fullmatch(pattern, path) is not None


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
    "rock_serve/protocol/dataplane.py": "the batch item's session run (one command on N "
    "sandboxes: the direct plane's batch route and Worker.run_many over Ray)",
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
