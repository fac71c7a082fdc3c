"""The agent's framing and failure behaviour, over real pipes to a real agent process."""

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rock_serve import errors
from rock_serve.protocol import SessionCreateRequest, SessionRunRequest
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from rock_serve.rocklet.agent import encode_frame, read_frame
from tests._wait import async_wait_until


async def _raw_agent(tmp_path):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        AGENT_PATH,
        "--root",
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 27,
    )


async def _reply(proc):
    return await asyncio.wait_for(read_frame(proc.stdout), 10)


@pytest.fixture
async def handle(tmp_path):
    h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    yield h
    await h.close()


async def test_many_requests_multiplexed_out_of_order(handle):
    await handle.create_session(SessionCreateRequest(session="slow"))
    await handle.create_session(SessionCreateRequest(session="fast"))
    slow = asyncio.ensure_future(
        handle.run_in_session(SessionRunRequest(session="slow", command="sleep 0.3; echo slow"))
    )
    fast = [
        await handle.run_in_session(SessionRunRequest(session="fast", command=f"echo {i}"))
        for i in range(20)
    ]
    assert not slow.done(), "a slow session must not delay another one"
    assert [r.output for r in fast] == [f"{i}\n" for i in range(20)]
    assert (await slow).output == "slow\n"


async def test_clean_exit_on_eof(tmp_path):
    proc = await _raw_agent(tmp_path)
    proc.stdin.write(encode_frame({"id": 1, "op": "session.create", "args": {}}))
    header, _ = await _reply(proc)
    assert header["type"] == "result"
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_unknown_operation_and_bad_args_are_typed(tmp_path):
    proc = await _raw_agent(tmp_path)
    proc.stdin.write(encode_frame({"id": 1, "op": "rm_rf_everything", "args": {}}))
    header, _ = await _reply(proc)
    assert header == {
        "id": 1,
        "type": "error",
        "error": {"code": "unknown_operation", "message": "unknown operation: 'rm_rf_everything'"},
    }
    proc.stdin.write(encode_frame({"id": 2, "op": "exec", "args": {"command": 5}}))
    header, _ = await _reply(proc)
    assert header["error"]["code"] == "invalid_request"
    proc.stdin.write(encode_frame({"id": "x", "op": "ping"}))
    header, _ = await _reply(proc)
    assert header["error"]["code"] == "bad_frame"
    proc.stdin.write(encode_frame({"id": 3, "op": "ping"}))
    header, _ = await _reply(proc)
    assert header["type"] == "result", "the agent keeps serving after bad requests"
    proc.stdin.close()
    await proc.wait()


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (struct.pack(">II", 1 << 30, 0), "too_large"),  # absurd header length
        (struct.pack(">II", 5, 0) + b"nope!", "bad_frame"),  # header is not JSON
        (struct.pack(">II", 2, 0) + b"[]", "bad_frame"),  # header is not an object
    ],
)
async def test_malformed_frames_get_a_typed_error_and_a_clean_exit(tmp_path, garbage, code):
    proc = await _raw_agent(tmp_path)
    proc.stdin.write(garbage)
    await proc.stdin.drain()
    header, _ = await _reply(proc)
    assert header["type"] == "error"
    assert header["error"]["code"] == code
    proc.stdin.close()  # EOF while the agent skips the oversized frame's bytes
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_an_oversized_frame_is_skipped_and_the_agent_keeps_serving(tmp_path):
    from rock_serve.rocklet.agent import MAX_HEADER

    proc = await _raw_agent(tmp_path)
    head = b'{"id":1,"op":"exec","args":{"command":"' + b"x" * (MAX_HEADER + 10) + b'"}}'
    proc.stdin.write(struct.pack(">II", len(head), 0) + head)
    proc.stdin.write(encode_frame({"id": 2, "op": "ping"}))
    await proc.stdin.drain()
    header, _ = await _reply(proc)
    assert header["id"] is None
    assert header["error"]["code"] == "too_large"
    header, _ = await _reply(proc)
    assert header["id"] == 2
    assert header["type"] == "result", "the agent survived the oversized frame"
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_bad_frame_fails_the_handle_not_hangs(tmp_path):
    r, w = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb"))
    sink = await asyncio.create_subprocess_exec(
        "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    h = RockletHandle(reader, sink.stdin, name="garbled")
    pending = asyncio.ensure_future(h.ping())
    await asyncio.sleep(0)
    os.write(w, struct.pack(">II", 3, 0) + b"{{{")
    with pytest.raises(errors.RockletUnavailable, match="bad frame"):
        await asyncio.wait_for(pending, 30)
    assert not h.alive
    os.close(w)
    sink.stdin.close()
    await sink.wait()


async def test_rocklet_killed_mid_request_fails_every_waiter_at_once(handle):
    await handle.create_session(SessionCreateRequest())
    await handle.create_session(SessionCreateRequest(session="other"))
    waiters = [
        asyncio.ensure_future(handle.run_in_session(SessionRunRequest(command="sleep 30"))),
        asyncio.ensure_future(
            handle.run_in_session(SessionRunRequest(session="other", command="sleep 30"))
        ),
    ]
    await asyncio.sleep(0.2)
    handle.process.kill()
    done, _ = await asyncio.wait(waiters, timeout=30)
    assert len(done) == 2
    for task in done:
        with pytest.raises(errors.RockletUnavailable):
            task.result()
    with pytest.raises(errors.RockletUnavailable):
        await handle.ping()


async def test_cancelled_call_is_cancelled_in_the_agent(handle):
    await handle.create_session(SessionCreateRequest())
    agent_pid = handle.process.pid

    def sleeping() -> bool:
        """A child of the agent named 'sleep 30' runs."""
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
        cmdlines = []
        for child in children:
            try:
                cmdlines.append(Path(f"/proc/{child}/cmdline").read_bytes())
            except FileNotFoundError:
                pass  # exited between the two reads
        return any(b"sleep\x0030" in c for c in cmdlines)

    slow = asyncio.ensure_future(handle.request("exec", {"command": "sleep 30", "timeout": 60}))
    # cancel once the command runs (a cancel before it started would prove nothing)
    await async_wait_until(sleeping, what="the command to start")
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The agent kills the process: soon nothing named 'sleep 30' is left under it.
    await async_wait_until(lambda: not sleeping(), what="the cancelled command to be killed")
    assert (await handle.ping())["version"]


def test_frame_encoding_is_binary_safe():
    payload = bytes(range(256)) * 4
    frame = encode_frame({"id": 1, "type": "chunk"}, payload)
    head_len, body_len = struct.unpack(">II", frame[:8])
    assert json.loads(frame[8 : 8 + head_len]) == {"id": 1, "type": "chunk"}
    assert frame[8 + head_len :] == payload
    assert body_len == len(payload)


def _old_pythons():
    found = []
    for version in ("3.8", "3.9"):
        candidates = [
            *sorted(Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python{version}")),
            shutil.which(f"python{version}"),
        ]
        for candidate in candidates:
            if (
                candidate
                and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0
            ):
                found.append(str(candidate))
                break
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no Python 3.8/3.9 here"))]


@pytest.mark.parametrize("python", _old_pythons())
async def test_agent_runs_on_old_python(python, tmp_path):
    h = await RockletHandle.spawn([python, "-I", AGENT_PATH, "--root", str(tmp_path)])
    try:
        assert (await h.ping())["python"].startswith(Path(python).name[len("python") :])
        await h.create_session(SessionCreateRequest())
        result = await h.run_in_session(SessionRunRequest(command="echo $((6*7))"))
        assert result.output == "42\n"
        await h.write_file("f.bin", b"\x00\x01" * 300_000)
        assert len(await h.read_file("f.bin")) == 600_000
    finally:
        await h.close()


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/hostname", "link/escaped.txt", "link"])
async def test_paths_are_confined_to_the_root(handle, tmp_path, path):
    outside = tmp_path.parent / "outside.txt"
    outside.write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(errors.PathOutsideSandbox):
        await handle.read_file(path)
    with pytest.raises(errors.PathOutsideSandbox):
        await handle.write_file(path, b"overwrite")
    assert outside.read_text() == "secret"


async def test_inside_paths_work_relative_and_absolute(handle, tmp_path):
    await handle.write_file("a/b.txt", b"x")
    assert await handle.read_file(str(tmp_path / "a" / "b.txt")) == b"x"
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"x"


def _ignore_interrupts() -> None:
    # What `cmd &` in a script (CI's runner, nohup) hands a platform: SIGINT/SIGQUIT ignored.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


async def test_commands_see_interrupts_even_if_the_platform_ignores_them(tmp_path):
    h = await RockletHandle.spawn(
        [sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)],
        preexec_fn=_ignore_interrupts,
    )
    try:
        await h.create_session(SessionCreateRequest(session="s"))
        ignored = await h.run_in_session(
            SessionRunRequest(session="s", command="grep SigIgn /proc/self/status")
        )
        assert int(ignored.output.split()[1], 16) & 0b110 == 0, ignored.output
        result = await h.run_in_session(
            SessionRunRequest(session="s", command="sleep 30", timeout=0.3)
        )
        assert result.timed_out and result.exit_code == 130, result
    finally:
        await h.close()
