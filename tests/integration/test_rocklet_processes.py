"""Background processes (``proc.*`` ops) of a real rocklet over its pipes: no Ray, no runtime.

Every op and its bad input: start/status/list, output with offsets and follow, a flood that
the ring buffer bounds (a typed truncation marker, bounded memory), wait with a timeout,
signals, stdin, the per-sandbox cap, and the end of the sandbox (the rocklet's EOF) ending
every process it started, grandchildren included.
"""

import asyncio
import os
import sys
from pathlib import Path

import pytest

from rock_serve import errors
from rock_serve.protocol.processes import (
    ProcessOutputChunk,
    ProcessOutputEnd,
    ProcessStartRequest,
    ProcessTruncated,
)
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from tests._wait import async_wait_until


@pytest.fixture
async def handle(tmp_path):
    h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    yield h
    await h.close()


async def _read(handle, pid, **kwargs):
    """(bytes, items, end) of one output read."""
    items = [item async for item in handle.process_output(pid, **kwargs)]
    end = items[-1]
    assert isinstance(end, ProcessOutputEnd)
    data = b"".join(i.data_bytes() for i in items if isinstance(i, ProcessOutputChunk))
    return data, items, end


def _gone(pid: int) -> bool:
    """The pid has exited (gone, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_start_status_output_wait_and_list(handle):
    info = await handle.start_process(
        ProcessStartRequest(command="echo hi; echo oops >&2; exit 3", env={"X": "1"})
    )
    assert info.running is True or info.exit_code == 3
    assert info.command[:2] == ["bash", "-c"]
    done = await handle.wait_process(info.pid, timeout=30)
    assert (done.running, done.exit_code, done.signal) == (False, 3, None)
    assert done.ended_at is not None and done.ended_at >= done.started_at
    assert (done.stdout_bytes, done.stderr_bytes) == (3, 5)
    out, _, end = await _read(handle, info.pid)
    assert (out, end.next) == (b"hi\n", 3)
    err, _, _ = await _read(handle, info.pid, stream="stderr")
    assert err == b"oops\n"
    argv = await handle.start_process(
        ProcessStartRequest(command=["printenv", "X"], env={"X": "v"})
    )
    await handle.wait_process(argv.pid, timeout=30)
    assert (await _read(handle, argv.pid))[0] == b"v\n"
    listed = await handle.list_processes()
    assert [p.pid for p in listed.processes] == [info.pid, argv.pid]
    assert (await handle.process_status(info.pid)).exit_code == 3


async def test_follow_streams_until_exit_and_resumes_from_an_offset(handle, tmp_path):
    gate = tmp_path / "gate"
    script = f"echo one; while [ ! -e {gate} ]; do sleep 0.01; done; echo two; echo three"
    info = await handle.start_process(ProcessStartRequest(command=script))
    follow = handle.process_output(info.pid, follow=True)
    first = await follow.__anext__()
    assert isinstance(first, ProcessOutputChunk)
    assert (first.offset, first.data) == (0, "one\n")
    gate.touch()
    rest = [item async for item in follow]
    assert isinstance(rest[-1], ProcessOutputEnd)
    assert rest[-1].process.running is False and rest[-1].next == 14
    assert "".join(i.data for i in rest if isinstance(i, ProcessOutputChunk)) == "two\nthree\n"
    # A reader that reconnects resumes from the offset it got to.
    again, items, end = await _read(handle, info.pid, offset=4, follow=True)
    assert again == b"two\nthree\n"
    assert items[0].offset == 4 and end.next == 14
    # Past the end: nothing, and next stays where the stream ends.
    assert (await _read(handle, info.pid, offset=99))[2].next == 14


async def test_processes_outlive_the_request_and_a_reader_that_goes_away(handle, tmp_path):
    gate = tmp_path / "gate"
    info = await handle.start_process(
        ProcessStartRequest(
            command=f"echo start; while [ ! -e {gate} ]; do sleep 0.01; done; echo end"
        )
    )
    reader = asyncio.ensure_future(_read(handle, info.pid, follow=True))
    await async_wait_until(lambda: _stdout_is(handle, info.pid, b"start\n"), what="the first line")
    reader.cancel()  # the client disconnects mid-follow
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert (await handle.process_status(info.pid)).running
    gate.touch()
    assert (await handle.wait_process(info.pid, timeout=30)).exit_code == 0
    assert (await _read(handle, info.pid))[0] == b"start\nend\n"


async def _stdout_is(handle, pid, want):
    return (await _read(handle, pid))[0] == want


async def test_a_flood_is_bounded_with_a_typed_truncation_marker(handle):
    agent_pid = handle.process.pid
    before = _rss_kib(agent_pid)
    size, cap = 200 * 1024 * 1024, 64 * 1024
    info = await handle.start_process(
        ProcessStartRequest(
            command=f"head -c {size} /dev/zero; echo; echo tail", max_output_bytes=cap
        )
    )
    done = await handle.wait_process(info.pid, timeout=120)
    assert done.exit_code == 0 and done.stdout_bytes == size + 6
    assert _rss_kib(agent_pid) - before < 32 * 1024, "the rocklet kept the flood in memory"
    data, items, end = await _read(handle, info.pid)
    assert items[0] == ProcessTruncated(stream="stdout", truncated_before=size + 6 - cap)
    assert len(data) == cap and data.endswith(b"\x00\ntail\n")
    assert items[1].offset == size + 6 - cap and end.next == size + 6
    # A reader inside the kept window sees no marker; max_bytes bounds one read.
    part, items, end = await _read(handle, info.pid, offset=size, max_bytes=3)
    assert part == b"\nta" and not any(isinstance(i, ProcessTruncated) for i in items)
    assert end.next == size + 3


async def test_wait_timeout_is_typed_and_kill_ends_the_whole_group(handle):
    info = await handle.start_process(ProcessStartRequest(command="sleep 1000 & sleep 1000; wait"))
    with pytest.raises(errors.Timeout) as caught:
        await handle.wait_process(info.pid, timeout=0.2)
    assert caught.value.details["pid"] == info.pid
    assert (await handle.process_status(info.pid)).running
    children = await async_wait_until(
        lambda: Path(f"/proc/{info.pid}/task/{info.pid}/children").read_text().split(),
        what="the sleeps to start",
    )
    killed = await handle.kill_process(info.pid)
    assert (killed.running, killed.exit_code, killed.signal) == (False, 137, 9)
    for child in children:
        await async_wait_until(lambda c=int(child): _gone(c), what=f"child {child} to end")
    assert (await handle.kill_process(info.pid)).signal == 9, "killing twice is a no-op"


async def test_signals_by_name_and_number_and_bad_ones(handle):
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
    info = await handle.start_process(ProcessStartRequest(command=script))
    await async_wait_until(lambda: _stdout_is(handle, info.pid, b"ready\n"), what="ready")
    with pytest.raises(errors.InvalidRequest, match="unknown signal"):
        await handle.request("proc.signal", {"pid": info.pid, "signal": "SIGNOPE"})
    for bad in (999, 0, True, None):
        with pytest.raises(errors.InvalidRequest, match="unknown signal"):
            await handle.request("proc.signal", {"pid": info.pid, "signal": bad})
    await handle.signal_process(info.pid, "term")
    done = await handle.wait_process(info.pid, timeout=30)
    assert done.exit_code == 7 and (await _read(handle, info.pid))[0] == b"ready\ngot-term\n"
    with pytest.raises(errors.Conflict, match="has exited"):
        await handle.signal_process(info.pid, 15)
    other = await handle.start_process(ProcessStartRequest(command=["sleep", "1000"]))
    await handle.signal_process(other.pid, 2, group=False)
    assert (await handle.wait_process(other.pid, timeout=30)).signal == 2


async def test_input_reaches_stdin_and_eof_closes_it(handle):
    info = await handle.start_process(
        ProcessStartRequest(command="read a; echo got:$a; cat; echo bye", stdin=True)
    )
    assert info.stdin_open
    await handle.process_input(info.pid, b"first\n")
    await async_wait_until(lambda: _stdout_is(handle, info.pid, b"got:first\n"), what="echo")
    closed = await handle.process_input(info.pid, b"\xff\x00rest", eof=True)
    assert closed.stdin_open is False
    done = await handle.wait_process(info.pid, timeout=30)
    assert done.exit_code == 0
    assert (await _read(handle, info.pid))[0] == b"got:first\n\xff\x00restbye\n"
    with pytest.raises(errors.Conflict, match="closed"):
        await handle.process_input(info.pid, b"late")
    none = await handle.start_process(ProcessStartRequest(command=["sleep", "1000"]))
    assert none.stdin_open is False
    with pytest.raises(errors.Conflict, match="without stdin"):
        await handle.process_input(none.pid, b"x")


async def test_bad_input_is_typed(handle):
    with pytest.raises(errors.ProcessNotFound):
        await handle.process_status(424242)
    for op in ("proc.status", "proc.output", "proc.kill", "proc.wait"):
        with pytest.raises(errors.InvalidRequest):
            await handle.request(op, {"pid": "1"})
    for command in ("", [], ["ok", ""], 5):
        with pytest.raises(errors.InvalidRequest, match="command"):
            await handle.request("proc.start", {"command": command})
    with pytest.raises(errors.FileNotFound, match="command not found"):
        await handle.start_process(ProcessStartRequest(command=["/no/such/binary"]))
    odd, _ = await handle.request(  # lone surrogates: a JSON string may hold them
        "proc.start", {"command": ["printf", "%s", "a\udcff\ud9ee"], "env": {"V\ud9ee": "x"}}
    )
    assert (await handle.wait_process(odd["pid"], timeout=30)).exit_code == 0, "no encoding error"
    with pytest.raises(errors.InvalidRequest, match="null byte"):
        await handle.request("proc.start", {"command": ["echo", "a\x00b"]})
    with pytest.raises(errors.FileNotFound):
        await handle.start_process(ProcessStartRequest(command="true", cwd="missing-dir"))
    with pytest.raises(errors.InvalidRequest, match="env"):
        await handle.request("proc.start", {"command": "true", "env": {"A=B": "x"}})
    with pytest.raises(errors.InvalidRequest, match="max_output_bytes"):
        await handle.request("proc.start", {"command": "true", "max_output_bytes": 0})
    info = await handle.start_process(ProcessStartRequest(command="true"))
    with pytest.raises(errors.InvalidRequest, match="stream"):
        await handle.request("proc.output", {"pid": info.pid, "stream": "stdlog"})
    with pytest.raises(errors.InvalidRequest, match="offset"):
        await handle.request("proc.output", {"pid": info.pid, "offset": -1})
    with pytest.raises(errors.InvalidRequest, match="timeout"):
        await handle.request("proc.wait", {"pid": info.pid, "timeout": -1})


async def test_the_process_cap_is_typed(handle):
    pids = [
        (
            await handle.start_process(ProcessStartRequest(command=["sleep", "1000"]), max_procs=2)
        ).pid
        for _ in range(2)
    ]
    with pytest.raises(errors.ResourceExhausted) as caught:
        await handle.start_process(ProcessStartRequest(command="true"), max_procs=2)
    assert caught.value.details == {"resource": "processes", "limit": 2}
    await handle.kill_process(pids[0])  # an ended process frees its slot
    third = await handle.start_process(ProcessStartRequest(command="true"), max_procs=2)
    assert (await handle.wait_process(third.pid, timeout=30)).exit_code == 0


async def test_ending_the_sandbox_ends_its_processes(tmp_path):
    h = await RockletHandle.spawn([sys.executable, "-I", AGENT_PATH, "--root", str(tmp_path)])
    info = await h.start_process(
        ProcessStartRequest(command="setsid sleep 1000 & echo $!; sleep 1000")
    )
    escaped = int(await async_wait_until(lambda: _first_line(h, info.pid), what="the escaped pid"))
    assert not _gone(info.pid) and not _gone(escaped)
    await h.close()  # the rocklet's EOF: what a sandbox kill does to it
    await async_wait_until(lambda: _gone(info.pid), what="the process to end")
    await async_wait_until(lambda: _gone(escaped), what="its setsid grandchild to end")


async def _first_line(handle, pid):
    data = (await _read(handle, pid))[0]
    return data.split(b"\n")[0] if b"\n" in data else None


def test_pid_gone_helper_sees_this_process_alive():
    assert not _gone(os.getpid())
