"""Every rocklet operation, run unchanged against every runtime the machine has."""

import asyncio
import hashlib
import io
import tarfile
import time
import uuid

import pytest

from rock_serve import errors
from rock_serve.protocol import (
    ExecRequest,
    OutputChunk,
    SessionCreateRequest,
    SessionRunRequest,
    SessionRunResult,
)
from tests._wait import async_wait_until


@pytest.fixture
def h(sandbox):
    return sandbox[2]


@pytest.fixture
async def sh(h):
    await h.create_session(SessionCreateRequest())
    return h


async def run(h, command, **kw):
    return await h.run_in_session(SessionRunRequest(command=command, **kw))


def started_marker():
    """A fresh marker path: a command touches it first, the test waits for it to exist.

    Unique per call (the local runtime's /tmp is the host's, shared by every run).
    """
    return f"/tmp/.rock-test-started-{uuid.uuid4().hex}"


async def wait_started(h, marker):
    """Wait until a command that touches ``marker`` first is running (no guessed sleep)."""

    async def exists():
        return (await h.exec(ExecRequest(command=f"test -e {marker}"))).exit_code == 0

    await async_wait_until(exists, what=f"{marker} to exist")


# ---------------------------------------------------------------- sessions


async def test_state_persists_between_commands(sh):
    await run(
        sh, "mkdir -p work && cd work && export GREETING=hi && greet() { echo $GREETING $1; }"
    )
    result = await run(sh, "basename $(pwd); greet there")
    assert result.output == "work\nhi there\n"
    assert result.exit_code == 0


async def test_exit_code_and_dollar_question_survive(sh):
    assert (await run(sh, "false")).exit_code == 1
    assert (await run(sh, "echo $?")).output == "1\n", "$? is the previous command's status"
    assert (await run(sh, "(exit 42)")).exit_code == 42


async def test_multiline_heredoc_and_syntax_error(sh):
    result = await run(sh, "cat <<'EOF'\nline 1\n  line 2\nEOF")
    assert result.output == "line 1\n  line 2\n"
    bad = await run(sh, "echo 'unterminated")
    assert bad.exit_code == 2
    assert "unexpected EOF" in bad.output
    assert (await run(sh, "echo still here")).output == "still here\n"


async def test_output_without_trailing_newline_and_binary(sh):
    assert (await run(sh, "printf abc")).output == "abc"
    binary = await run(sh, r"printf '\xff\x00\xfe'")
    assert binary.encoding == "base64"
    assert binary.output_bytes() == b"\xff\x00\xfe"


async def test_timeout_interrupts_the_command_not_the_session(sh):
    await run(sh, "export KEEP=1")
    started = time.monotonic()
    result = await run(sh, "sleep 30", timeout=0.3)
    assert result.timed_out
    assert result.exit_code == 130
    assert time.monotonic() - started < 25, "the sleep was interrupted, not waited for"
    after = await run(sh, "echo $KEEP")
    assert after.output == "1\n", "the session and its state survive a timeout"


@pytest.mark.parametrize("command", ["read x", "python3", "cat", "python3 -c 'input()'"])
async def test_commands_waiting_for_input_end_by_their_timeout(sh, command):
    result = await run(sh, command, timeout=0.3)
    assert result.timed_out
    assert (await run(sh, "echo ok")).output == "ok\n"


async def test_sigint_ignoring_command_is_killed(sh):
    result = await run(
        sh,
        "trap '' INT; python3 -c 'import signal,time; "
        "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(30)'",
        timeout=0.3,
    )
    assert result.timed_out
    assert not result.session_restarted
    assert (await run(sh, "echo ok")).output == "ok\n"


async def test_busy_shell_loop_restarts_the_session(sh):
    result = await run(sh, "while :; do :; done", timeout=0.2)
    assert result.timed_out
    assert result.session_restarted
    assert (await run(sh, "echo fresh")).output == "fresh\n"


async def test_output_cap_sets_truncated_and_keeps_the_head(sh):
    result = await run(sh, "seq 1 200000", max_output_bytes=1000)
    assert result.truncated
    assert len(result.output) == 1000
    assert result.output.startswith("1\n2\n3\n")
    assert (await run(sh, "echo next")).output == "next\n"


@pytest.mark.slow
async def test_a_gigabyte_of_output_is_drained_not_held(sh):
    result = await run(sh, "head -c 1000000000 /dev/zero | tr '\\0' x", max_output_bytes=4096)
    assert result.truncated
    assert result.exit_code == 0
    assert len(result.output) == 4096


async def test_streaming_arrives_as_it_is_produced(sh):
    # Each line waits for a go file that the test makes only after it received the line before:
    # if output were held back until the command ended, the command would time out instead.
    go = started_marker()
    command = f"for i in 1 2 3; do echo $i; until [ -e {go}.$i ]; do sleep 0.01; done; done"
    items = []
    async for item in sh.stream_in_session(SessionRunRequest(command=command, timeout=60)):
        items.append(item)
        if isinstance(item, OutputChunk):
            for n in item.data.split():
                await sh.exec(ExecRequest(command=f"touch {go}.{n}"))
    chunks = [i for i in items if isinstance(i, OutputChunk)]
    assert "".join(c.data for c in chunks) == "1\n2\n3\n"
    assert len(chunks) == 3, "one chunk per line: each was sent before the next was printed"
    assert isinstance(items[-1], SessionRunResult)
    assert (items[-1].exit_code, items[-1].timed_out) == (0, False)


async def test_stdin_reaches_the_running_command(sh):
    marker = started_marker()
    task = asyncio.ensure_future(run(sh, f"touch {marker}; read a; read b; echo got $a $b"))
    await wait_started(sh, marker)
    await sh.session_stdin("default", b"one\n")
    await sh.session_stdin("default", b"two\n", eof=True)
    result = await task
    assert result.output == "got one two\n"
    assert not result.timed_out


async def test_interrupt_stops_the_running_command(sh):
    marker = started_marker()
    task = asyncio.ensure_future(run(sh, f"sh -c 'touch {marker}; exec sleep 30'", timeout=60))
    await wait_started(sh, marker)
    await sh.interrupt_session("default")
    result = await task
    assert result.exit_code == 130
    assert not result.timed_out


async def test_second_command_in_a_busy_session_is_refused(sh):
    marker = started_marker()
    task = asyncio.ensure_future(run(sh, f"sh -c 'touch {marker}; exec sleep 30'", timeout=60))
    await wait_started(sh, marker)
    with pytest.raises(errors.SessionBusy):
        await run(sh, "echo no")
    await sh.interrupt_session("default")
    assert (await task).exit_code == 130
    assert (await run(sh, "echo free")).output == "free\n"


async def test_sessions_run_in_parallel(h):
    # A barrier: each command arrives, then waits until all 8 have arrived. Run one at a time,
    # the first would wait forever (and time out); run at once, all finish. No clock involved.
    barrier = f"/tmp/.rock-barrier-{started_marker().rsplit('-', 1)[1]}"
    await h.exec(ExecRequest(command=f"mkdir -p {barrier}"))
    for i in range(8):
        await h.create_session(SessionCreateRequest(session=f"s{i}"))
    wait_all = f'set -- {barrier}/*; [ "$#" -ge 8 ]'  # a glob, not ls (gvisor: statx)
    results = await asyncio.gather(
        *[
            h.run_in_session(
                SessionRunRequest(
                    session=f"s{i}",
                    command=f"touch {barrier}/{i}; until {wait_all}; do sleep 0.01; done",
                    timeout=60,
                )
            )
            for i in range(8)
        ]
    )
    assert [(r.exit_code, r.timed_out) for r in results] == [(0, False)] * 8


async def test_session_lifecycle_errors(h):
    with pytest.raises(errors.SessionNotFound):
        await run(h, "echo")
    await h.create_session(SessionCreateRequest(session="a", env={"FOO": "bar"}))
    with pytest.raises(errors.SessionExists):
        await h.create_session(SessionCreateRequest(session="a"))
    assert (
        await h.run_in_session(SessionRunRequest(session="a", command="echo $FOO"))
    ).output == "bar\n"
    assert await h.list_sessions() == ["a"]
    await h.close_session("a")
    with pytest.raises(errors.SessionNotFound):
        await h.close_session("a")


async def test_exit_ends_the_session(sh):
    result = await run(sh, "exit 3")
    assert result.exit_code == 3
    assert result.session_ended
    with pytest.raises(errors.SessionNotFound):
        await run(sh, "echo")


async def test_startup_commands_run_once(h):
    created = await h.create_session(
        SessionCreateRequest(session="s", startup_commands=["X=7", "echo started"])
    )
    assert created.output == "started\n"
    assert (
        await h.run_in_session(SessionRunRequest(session="s", command="echo $X"))
    ).output == "7\n"


# ---------------------------------------------------------------- exec


async def test_exec_keeps_stdout_and_stderr_apart(h):
    result = await h.exec(ExecRequest(command="echo out; echo err >&2; exit 3"))
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not result.timed_out
    assert result.duration > 0


async def test_exec_argv_env_cwd_stdin(h):
    await h.mkdir("sub")
    result = await h.exec(
        ExecRequest(
            command=[
                "python3",
                "-c",
                "import os,sys; "
                "print(os.environ['V'], os.path.basename(os.getcwd()), sys.stdin.read())",
            ],
            env={"V": "val"},
            cwd="sub",
            stdin="piped",
        )
    )
    assert result.stdout == "val sub piped\n"
    argv = await h.exec(ExecRequest(command=["echo", "a b", "$HOME"]))
    assert argv.stdout == "a b $HOME\n", "argv lists are not shell-interpreted"


async def test_exec_timeout_kills_the_process_group(h):
    started = time.monotonic()
    result = await h.exec(ExecRequest(command="sleep 30 & sleep 30; echo never", timeout=0.3))
    assert result.timed_out
    assert result.stdout == ""
    assert time.monotonic() - started < 25, "the group was killed, not waited for"


async def test_exec_caps_and_missing_program(h):
    result = await h.exec(ExecRequest(command="seq 1 100000", max_output_bytes=100))
    assert result.truncated
    assert len(result.stdout) == 100
    missing = await h.exec(ExecRequest(command=["definitely-not-a-program"]))
    assert missing.exit_code == 127


async def test_exec_streaming(h):
    items = [i async for i in h.stream_exec(ExecRequest(command="echo a; echo b >&2"))]
    streams = {(i.stream, i.data) for i in items if isinstance(i, OutputChunk)}
    assert streams == {("stdout", "a\n"), ("stderr", "b\n")}
    assert items[-1].exit_code == 0


# ---------------------------------------------------------------- files


async def test_write_read_stat_list_remove(h):
    size = await h.write_file("d/hello.txt", b"hello\n", mode=0o640)
    assert size == 6
    assert await h.read_file("d/hello.txt") == b"hello\n"
    assert await h.read_file("d/hello.txt", offset=1, length=3) == b"ell"
    info = await h.stat("d/hello.txt")
    assert (info.type, info.size, info.mode) == ("file", 6, 0o640)
    listing = await h.list_dir("d")
    assert [e.name for e in listing.entries] == ["hello.txt"]
    with pytest.raises(errors.IsADirectory):
        await h.remove("d")
    await h.remove("d", recursive=True)
    with pytest.raises(errors.FileNotFound):
        await h.stat("d")
    await h.remove("d", missing_ok=True)


async def test_large_binary_file_round_trip(h):
    blob = bytes(range(256)) * (12 * 4096)  # 12 MiB, every byte value
    assert await h.write_file("big.bin", blob) == len(blob)
    assert await h.read_file("big.bin") == blob
    parts = [c async for c in h.iter_file("big.bin")]
    assert len(parts) > 1
    assert b"".join(parts) == blob
    result = await h.exec(ExecRequest(command="md5sum big.bin"))
    assert result.stdout.split()[0] == hashlib.md5(blob).hexdigest()


async def test_file_errors_are_typed(h):
    with pytest.raises(errors.FileNotFound):
        await h.read_file("no/such/file")
    await h.mkdir("adir")
    with pytest.raises(errors.IsADirectory):
        await h.read_file("adir")
    await h.write_file("f", b"x")
    with pytest.raises(errors.NotADirectory):
        await h.list_dir("f")
    with pytest.raises(errors.InvalidRequest):
        await h.request("file.read", {"path": 7})


async def test_tar_round_trip_of_a_directory(h):
    await h.write_file("src/a.txt", b"A")
    await h.write_file("src/deep/b.bin", b"\x00\xff")
    tar = b"".join([c async for c in h.download_tar("src")])
    names = tarfile.open(fileobj=io.BytesIO(tar)).getnames()
    assert "./deep/b.bin" in names
    await h.upload_tar("dst", tar)
    assert await h.read_file("dst/deep/b.bin") == b"\x00\xff"


async def test_tar_upload_refuses_escaping_members(h):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(errors.PathOutsideSandbox):
        await h.upload_tar("dst", buf.getvalue())
    with pytest.raises(errors.FileNotFound):
        await h.stat("escape.txt")


# ---------------------------------------------------------------- stats


async def test_stats_report_the_sandbox_view(h):
    stats = await h.stats()
    assert stats.cpu_count >= 1
    assert stats.pids_current >= 1


async def test_a_cancelled_run_leaves_the_next_output_clean(sh):
    marker = started_marker()
    task = asyncio.ensure_future(run(sh, f"touch {marker}; sleep 1; echo late", timeout=30))
    await wait_started(sh, marker)
    task.cancel()

    async def next_run():
        try:
            return await run(sh, "echo next")
        except errors.SessionBusy:
            return None  # the abandoned command is still being stopped

    result = await async_wait_until(next_run, what="the abandoned command to be stopped")
    assert result.output == "next\n"


async def test_output_larger_than_a_frame_arrives_whole(sh):
    size = 70_000_000  # over the 64 MiB frame limit
    result = await run(sh, f"head -c {size} /dev/zero | tr '\\0' a", max_output_bytes=size)
    assert not result.truncated
    assert len(result.output) == size
    assert sh.alive


# ---------------------------------------------------------------- background processes


async def test_background_process_in_every_runtime(h):
    from rock_serve.protocol.processes import (
        ProcessOutputChunk,
        ProcessOutputEnd,
        ProcessStartRequest,
    )

    info = await h.start_process(
        ProcessStartRequest(command="trap 'exit 9' TERM; echo up; while :; do sleep 0.05; done")
    )
    follow = h.process_output(info.pid, follow=True)
    first = await follow.__anext__()
    assert isinstance(first, ProcessOutputChunk) and first.data == "up\n"
    assert (await h.process_status(info.pid)).running
    await h.signal_process(info.pid, "TERM")  # its own process group, in any pid namespace
    rest = [item async for item in follow]
    assert isinstance(rest[-1], ProcessOutputEnd) and rest[-1].process.exit_code == 9
    assert [p.pid for p in (await h.list_processes()).processes] == [info.pid]
