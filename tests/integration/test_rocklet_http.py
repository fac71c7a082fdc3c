"""The rocklet's standalone HTTP mode, driven by SWE-ReX's own client and by httpx.

Every test runs a real uvicorn server on an ephemeral port in front of a real agent.
"""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import aiohttp
import httpx
import pytest
import uvicorn
from swerex.exceptions import (
    BashIncorrectSyntaxError,
    CommandTimeoutError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    BashAction,
    BashInterruptAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)
from swerex.runtime.remote import RemoteRuntime

from rock_serve.protocol import ExecResult, FileInfo, SandboxStats, SessionRunResult
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from rock_serve.rocklet.__main__ import is_loopback
from rock_serve.rocklet.http import create_app
from tests._wait import async_wait_until, pid_alive

TOKEN = "s3cret-token"


class Server:
    def __init__(self, port, handle_root):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.root = handle_root

    def runtime(self, token=TOKEN):
        # SWE-ReX's default client timeout is 0.15 s: a loaded machine misses it (is_alive then
        # says False), so the tests give it a bound that only catches a broken server.
        return RemoteRuntime(
            host="http://127.0.0.1", port=self.port, auth_token=token, timeout=SWEREX_TIMEOUT
        )

    def client(self, token=TOKEN, **kw):
        headers = {"X-API-Key": token} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kw)


SWEREX_TIMEOUT = 30.0


@pytest.fixture
async def server(tmp_path):
    root = tmp_path / "sbx"
    root.mkdir()

    async def factory():
        return await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(root)])

    app = create_app(factory, token=TOKEN)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    task = asyncio.ensure_future(srv.serve())
    while not srv.started:
        assert not task.done(), "server failed to start"
        await asyncio.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield Server(port, root)
    srv.should_exit = True
    await asyncio.wait_for(task, 15)


# ---------------------------------------------------------------------------- SWE-ReX client


async def test_swerex_sessions_keep_state_and_report_exit_codes(server):
    rt = server.runtime()
    assert (await rt.is_alive()).is_alive
    resp = await rt.create_session(CreateBashSessionRequest(session="s"))
    assert resp.session_type == "bash"

    obs = await rt.run_in_session(BashAction(session="s", command="echo hi"))
    assert (obs.output, obs.exit_code, obs.expect_string) == ("hi\n", 0, "SHELLPS1PREFIX")
    await rt.run_in_session(BashAction(session="s", command=f"cd {server.root} && X=41"))
    obs = await rt.run_in_session(BashAction(session="s", command="echo $((X+1)); pwd"))
    assert obs.output == f"42\n{server.root}\n"
    obs = await rt.run_in_session(
        BashAction(session="s", command="for i in 1 2; do\necho $i\ndone")
    )
    assert obs.output == "1\n2\n"

    obs = await rt.run_in_session(BashAction(session="s", command="(exit 3)", check="silent"))
    assert obs.exit_code == 3
    obs = await rt.run_in_session(BashAction(session="s", command="false", check="ignore"))
    assert obs.exit_code is None
    with pytest.raises(NonZeroExitCodeError, match="boom: Command 'echo out; false' failed"):
        await rt.run_in_session(
            BashAction(session="s", command="echo out; false", check="raise", error_msg="boom")
        )
    with pytest.raises(BashIncorrectSyntaxError):
        await rt.run_in_session(BashAction(session="s", command="if true; then echo y"))
    # Non-UTF-8 output and ANSI escapes come back as SWE-ReX renders them.
    obs = await rt.run_in_session(
        BashAction(session="s", command=r"printf 'a\377b\r\n\033[31mred\033[0m\n'")
    )
    assert obs.output == "a\\xffb\nred\n"


async def test_swerex_session_errors(server):
    rt = server.runtime()
    await rt.create_session(CreateBashSessionRequest(session="s"))
    with pytest.raises(SessionExistsError):
        await rt.create_session(CreateBashSessionRequest(session="s"))
    with pytest.raises(SessionDoesNotExistError):
        await rt.run_in_session(BashAction(session="nope", command="true"))
    await rt.close_session(CloseBashSessionRequest(session="s"))
    with pytest.raises(SessionDoesNotExistError):
        await rt.run_in_session(BashAction(session="s", command="true"))
    with pytest.raises(SessionDoesNotExistError):
        await rt.close_session(CloseBashSessionRequest(session="s"))


async def test_swerex_startup_source(server):
    rc = server.root / "rc.sh"
    rc.write_text("export FROM_RC=yes\necho sourced\n")
    rt = server.runtime()
    resp = await rt.create_session(CreateBashSessionRequest(session="s", startup_source=[str(rc)]))
    assert "sourced" in resp.output
    obs = await rt.run_in_session(BashAction(session="s", command="echo $FROM_RC"))
    assert obs.output == "yes\n"


async def test_swerex_timeout_leaves_session_usable(server):
    rt = server.runtime()
    await rt.create_session(CreateBashSessionRequest(session="s"))
    await rt.run_in_session(BashAction(session="s", command="Y=7"))
    t = time.monotonic()
    with pytest.raises(CommandTimeoutError, match="timeout after 0.3 seconds"):
        await rt.run_in_session(BashAction(session="s", command="sleep 30", timeout=0.3))
    assert time.monotonic() - t < 25  # timed out, not waited for the sleep
    # SWE-agent interrupts after a timeout; then the session carries on with its state.
    obs = await rt.run_in_session(BashInterruptAction(session="s"))
    assert obs.exit_code == 0
    obs = await rt.run_in_session(BashAction(session="s", command="echo $Y"))
    assert obs.output == "7\n"


async def test_swerex_interrupt_stops_running_command(server, tmp_path):
    rt = server.runtime()
    await rt.create_session(CreateBashSessionRequest(session="s"))
    marker = tmp_path / "started"
    run = asyncio.ensure_future(
        rt.run_in_session(
            BashAction(
                session="s", command=f"sh -c 'touch {marker}; exec sleep 30'", check="silent"
            )
        )
    )
    await async_wait_until(marker.exists, what="the command to start")
    obs = await rt.run_in_session(BashInterruptAction(session="s"))
    assert obs.exit_code == 0
    stopped = await run  # well before the sleep's 30 s (the test's timeout bounds it)
    assert stopped.exit_code == 130
    obs = await rt.run_in_session(BashAction(session="s", command="echo alive"))
    assert obs.output == "alive\n"


async def test_swerex_interactive_program(server):
    rt = server.runtime()
    await rt.create_session(CreateBashSessionRequest(session="py"))
    obs = await rt.run_in_session(
        BashAction(
            session="py",
            command="python3 -q -i",
            is_interactive_command=True,
            expect=[">>> "],
            timeout=10,
        )
    )
    assert obs.expect_string == ">>> "
    obs = await rt.run_in_session(
        BashAction(session="py", command="print(6*7)", is_interactive_command=True, expect=[">>> "])
    )
    assert obs.output == "42"
    obs = await rt.run_in_session(
        BashAction(session="py", command="exit()", is_interactive_quit=True, timeout=10)
    )
    assert obs.expect_string == "SHELLPS1PREFIX"
    obs = await rt.run_in_session(BashAction(session="py", command="echo back"))
    assert obs.output == "back\n"


async def test_swerex_execute(server):
    rt = server.runtime()
    r = await rt.execute(Command(command="echo out; echo err >&2; exit 2", shell=True))
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 2)
    r = await rt.execute(Command(command=["printf", "%s|", "a b", "c"]))
    assert r.stdout == "a b|c|"
    r = await rt.execute(
        Command(command="echo o; echo e >&2", shell=True, merge_output_streams=True)
    )
    assert (r.stdout, r.stderr) == ("o\ne\n", "")
    r = await rt.execute(Command(command=["pwd"], cwd=str(server.root)))
    assert r.stdout == f"{server.root}\n"
    r = await rt.execute(
        Command(command="echo ${ONLY-unset} ${HOME-nohome}", shell=True, env={"ONLY": "1"})
    )
    assert r.stdout == "1 nohome\n"  # subprocess semantics: env replaces the environment
    with pytest.raises(NonZeroExitCodeError, match="failed with exit code 1"):
        await rt.execute(Command(command=["false"], check=True))
    with pytest.raises(CommandTimeoutError):
        await rt.execute(Command(command=["sleep", "30"], timeout=0.3))
    with pytest.raises(FileNotFoundError):
        await rt.execute(Command(command=["no-such-program-here"]))


async def test_swerex_files_and_upload(server, tmp_path):
    rt = server.runtime()
    target = server.root / "deep" / "dir" / "f.txt"
    await rt.write_file(WriteFileRequest(path=str(target), content="héllo\r\nworld\n"))
    assert target.read_bytes() == "héllo\r\nworld\n".encode()
    got = await rt.read_file(ReadFileRequest(path=str(target)))
    assert got.content == "héllo\nworld\n"  # Path.read_text: universal newlines
    (server.root / "latin1.txt").write_bytes("é".encode("latin-1"))
    got = await rt.read_file(
        ReadFileRequest(path=str(server.root / "latin1.txt"), encoding="latin-1")
    )
    assert got.content == "é"
    with pytest.raises(ValueError):
        await rt.read_file(ReadFileRequest(path=str(server.root / "latin1.txt")))
    with pytest.raises(FileNotFoundError):
        await rt.read_file(ReadFileRequest(path=str(server.root / "missing")))
    with pytest.raises(IsADirectoryError):
        await rt.read_file(ReadFileRequest(path=str(server.root)))

    src = tmp_path / "one.bin"
    src.write_bytes(bytes(range(256)) * 100)
    await rt.upload(
        UploadRequest(source_path=str(src), target_path=str(server.root / "up/one.bin"))
    )
    assert (server.root / "up/one.bin").read_bytes() == src.read_bytes()

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("A")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "sub" / "run.sh").chmod(0o755)
    await rt.upload(UploadRequest(source_path=str(tree), target_path=str(server.root / "tree")))
    assert (server.root / "tree/a.txt").read_text() == "A"
    assert (server.root / "tree/sub/run.sh").read_text() == "#!/bin/sh\necho ran\n"
    assert os.access(server.root / "tree/sub/run.sh", os.X_OK)

    # Paths are confined to the rocklet's root.
    with pytest.raises(PermissionError):
        await rt.read_file(ReadFileRequest(path="/etc/hostname"))


async def test_swerex_close_closes_every_session(server):
    rt = server.runtime()
    for name in ("a", "b"):
        await rt.create_session(CreateBashSessionRequest(session=name))
    await rt.close()
    for name in ("a", "b"):
        with pytest.raises(SessionDoesNotExistError):
            await rt.run_in_session(BashAction(session=name, command="true"))
    await rt.create_session(CreateBashSessionRequest(session="a"))


async def test_wrong_token_is_refused(server):
    bad = server.runtime(token="wrong")
    alive = await bad.is_alive()
    assert not alive.is_alive and "401" in alive.message
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await bad.create_session(CreateBashSessionRequest(session="x"))
    assert info.value.status == 401
    async with server.client(token=None) as c:
        r = await c.get("/is_alive")
        assert (r.status_code, r.json()) == (401, {"detail": "Not authenticated"})
        r = await c.get("/rock/v1/stats")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    async with server.client(token="wrong") as c:
        r = await c.post("/run_in_session", json={"command": "true"})
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid API Key"})


async def test_request_id_makes_retries_idempotent(server):
    async with server.client() as c:
        await c.post("/create_session", json={"session": "s"})
        await c.post("/run_in_session", json={"session": "s", "command": "n=0"})
        body = {"session": "s", "command": "n=$((n+1)); echo $n"}
        headers = {"X-Request-ID": "req-1"}
        first, again = await asyncio.gather(
            c.post("/run_in_session", json=body, headers=headers),
            c.post("/run_in_session", json=body, headers=headers),
        )
        assert first.json()["output"] == again.json()["output"] == "1\n"
        later = await c.post("/run_in_session", json=body, headers=headers)
        assert later.json()["output"] == "1\n"
        fresh = await c.post("/run_in_session", json=body, headers={"X-Request-ID": "req-2"})
        assert fresh.json()["output"] == "2\n"


async def test_swerex_shapes_for_bad_input(server):
    async with server.client() as c:
        r = await c.post("/run_in_session", json={"session": "s"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "command"]
        r = await c.post("/execute", content=b"{not json")
        assert r.status_code == 422
        r = await c.post("/run_in_session", json={"command": "true", "session": "bad name!"})
        assert r.status_code == 511
        assert r.json()["swerexception"]["class_path"] == "builtins.ValueError"
        assert r.json()["swerexception"]["traceback"] == ""
        r = await c.get("/")
        assert r.json() == {"message": "hello world"}
        r = await c.get("/no/such/route")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


# ---------------------------------------------------------------------------- /rock/v1


async def test_rock_stream_arrives_incrementally(server, tmp_path):
    async with server.client() as c:
        r = await c.post("/rock/v1/sessions", json={"session": "s"})
        assert r.status_code == 200 and r.json()["session"] == "s"
        # Each line waits for a go file the test makes after receiving it: held-back output
        # would make the command time out instead of finishing.
        go = tmp_path / "go"
        command = f"for i in 1 2 3; do echo $i; until [ -e {go}.$i ]; do sleep 0.01; done; done"
        body = {"session": "s", "command": command, "timeout": 60}
        lines = []
        async with c.stream("POST", "/rock/v1/sessions/stream", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            async for line in resp.aiter_lines():
                if line:
                    item = json.loads(line)
                    lines.append(item)
                    for n in item.get("data", "").split() if item.get("type") == "output" else ():
                        (tmp_path / f"go.{n}").touch()
        first = lines[0]
        assert first == {"type": "output", "stream": "output", "data": "1\n", "encoding": "utf-8"}
        result = SessionRunResult.model_validate(lines[-1])
        assert (result.exit_code, result.timed_out) == (0, False)
        assert "".join(x["data"] for x in lines[:-1]) == "1\n2\n3\n"


async def test_rock_stream_errors_have_status(server):
    async with server.client() as c:
        r = await c.post("/rock/v1/sessions/stream", json={"session": "nope", "command": "true"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_not_found"
        r = await c.post("/rock/v1/sessions/run", json={"session": "s", "comand": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = await c.post("/rock/v1/exec", content=b"not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = await c.get("/rock/v1/files", params={"path": str(server.root / "missing")})
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
        r = await c.get("/rock/v1/files")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = await c.get("/rock/v1/files", params={"path": "/etc/passwd"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "path_outside_sandbox"
        r = await c.get("/rock/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await c.post("/rock/v1/sessions", json={"session": "dup"})
        r = await c.post("/rock/v1/sessions", json={"session": "dup"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"


async def test_rock_binary_files_round_trip(server):
    blob = os.urandom(3 << 20) + b"\xff\xfe\x00tail"
    path = str(server.root / "bin" / "blob.dat")

    async def chunks():
        for i in range(0, len(blob), 100_000):
            yield blob[i : i + 100_000]

    async with server.client() as c:
        r = await c.put("/rock/v1/files", params={"path": path, "mode": "600"}, content=chunks())
        assert r.status_code == 200, r.text
        info = FileInfo.model_validate(r.json())
        assert info.size == len(blob) and info.mode & 0o777 == 0o600
        got = bytearray()
        async with c.stream("GET", "/rock/v1/files", params={"path": path}) as resp:
            assert resp.headers["content-type"] == "application/octet-stream"
            async for part in resp.aiter_bytes():
                got += part
        assert bytes(got) == blob
        r = await c.get("/rock/v1/files", params={"path": path, "offset": 5, "length": 10})
        assert r.content == blob[5:15]
        r = await c.get("/rock/v1/files/stat", params={"path": path})
        assert r.json()["size"] == len(blob)
        r = await c.get("/rock/v1/files/list", params={"path": str(server.root / "bin")})
        assert [e["name"] for e in r.json()["entries"]] == ["blob.dat"]
        r = await c.post("/rock/v1/files/remove", json={"path": path})
        assert r.status_code == 204
        r = await c.post("/rock/v1/files/mkdir", json={"path": str(server.root / "m/n")})
        assert r.status_code == 204 and (server.root / "m/n").is_dir()


async def test_rock_tar_round_trip(server):
    src = server.root / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.bin").write_bytes(b"\x00\xff" * 1000)
    (src / "y.txt").write_text("y")
    async with server.client() as c:
        r = await c.get("/rock/v1/tar", params={"path": str(src)})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            names = sorted(m.name.removeprefix("./") for m in tar.getmembers())
        assert "d/x.bin" in names and "y.txt" in names
        r = await c.put(
            "/rock/v1/tar", params={"path": str(server.root / "dst")}, content=r.content
        )
        assert r.status_code == 204
    assert (server.root / "dst/d/x.bin").read_bytes() == b"\x00\xff" * 1000


async def test_rock_exec_stdin_interrupt_stats(server, tmp_path):
    async with server.client() as c:
        r = await c.post("/rock/v1/exec", json={"command": "echo o; echo e >&2; exit 4"})
        res = ExecResult.model_validate(r.json())
        assert (res.stdout, res.stderr, res.exit_code) == ("o\n", "e\n", 4)
        r = await c.post("/rock/v1/exec/stream", json={"command": ["sh", "-c", "echo a"]})
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines[0]["data"] == "a\n" and lines[-1]["exit_code"] == 0

        await c.post("/rock/v1/sessions", json={"session": "s"})
        reading, sleeping = tmp_path / "reading", tmp_path / "sleeping"
        run = asyncio.ensure_future(
            c.post(
                "/rock/v1/sessions/run",
                json={"session": "s", "command": f"touch {reading}; read x; echo got $x"},
            )
        )
        await async_wait_until(reading.exists, what="the read to start")
        r = await c.post("/rock/v1/sessions/stdin", json={"session": "s", "data": "hello\n"})
        assert r.status_code == 204
        assert (await run).json()["output"] == "got hello\n"

        run = asyncio.ensure_future(
            c.post(
                "/rock/v1/sessions/run",
                json={"session": "s", "command": f"sh -c 'touch {sleeping}; exec sleep 30'"},
            )
        )
        await async_wait_until(sleeping.exists, what="the sleep to start")
        r = await c.post("/rock/v1/sessions/interrupt", json={"session": "s"})
        assert r.status_code == 204
        assert (await run).json()["exit_code"] == 130
        r = await c.post("/rock/v1/sessions/close", json={"session": "s"})
        assert r.status_code == 204

        r = await c.get("/rock/v1/stats")
        assert SandboxStats.model_validate(r.json()).pids_current >= 1


# ---------------------------------------------------------------------------- the command


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("::")
    assert not is_loopback("example.com")


def test_token_required_off_loopback():
    env = {k: v for k, v in os.environ.items() if k != "ROCK_ROCKLET_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "rock_serve.rocklet", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 2
    assert "token" in proc.stderr and proc.stdout == ""


async def test_module_serves_swerex_and_shuts_down_cleanly(tmp_path):
    env = dict(os.environ, ROCK_ROCKLET_TOKEN=TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rock_serve.rocklet",
        "--port",
        "0",
        "--root",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("rocklet listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        rt = RemoteRuntime(
            host="http://127.0.0.1", port=port, auth_token=TOKEN, timeout=SWEREX_TIMEOUT
        )
        assert (await rt.is_alive()).is_alive
        await rt.create_session(CreateBashSessionRequest(session="s"))
        obs = await rt.run_in_session(BashAction(session="s", command="sleep 1000 & echo $$ $!"))
        bash_pid, sleep_pid = map(int, obs.output.split())
        agent_pid = int((await rt.execute(Command(command="echo $PPID", shell=True))).stdout)
        pids = (bash_pid, sleep_pid, agent_pid)
        assert all(map(pid_alive, pids))
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        # The group kill is sent before the server exits; reaping the orphans is the kernel's
        # and init's business, so wait for it rather than checking at once.
        await async_wait_until(
            lambda: not any(map(pid_alive, pids)), what="the session's processes to end"
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
