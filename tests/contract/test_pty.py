"""The rocklet's pty on every runtime: echo, resize, Ctrl-C, exit codes and close."""

from __future__ import annotations

import asyncio
import re

import pytest

from rock_serve.errors import InvalidRequest
from rock_serve.rocklet.handle import PtyProcess

pytestmark = pytest.mark.timeout(180)  # hang guards; a busy CPU slows a container start


async def _expect(
    p: PtyProcess, needle: bytes | re.Pattern[bytes], seen: bytearray, timeout: float = 60
) -> None:
    """Read output into ``seen`` until ``needle`` (bytes, or a pattern) is in it."""

    def found() -> bool:
        return bool(needle.search(seen)) if isinstance(needle, re.Pattern) else needle in seen

    async def read() -> None:
        async for data in p:
            seen.extend(data)
            if found():
                return
        raise AssertionError(f"pty ended before {needle!r}: {bytes(seen)!r}")

    if found():  # an earlier read may have brought it with what that one waited for
        return
    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        said = bytes(seen)
        raise AssertionError(f"no {needle!r} within {timeout:g}s; the pty said {said!r}") from None


async def test_echo_and_exit_code(sandbox):
    _, _, h = sandbox
    async with h.pty(cols=100, rows=30) as p:
        seen = bytearray()
        await p.send(b"echo $((40 + 2))-ok; tty\n")
        await _expect(p, b"42-ok", seen)
        await _expect(p, b"/dev/pts/", seen)
        await p.send(b"exit 3\n")
        assert await asyncio.wait_for(p.wait(), 60) == 3
        assert p.exit_code == 3


async def test_resize_reaches_stty(sandbox):
    _, _, h = sandbox
    async with h.pty(cols=100, rows=30) as p:
        seen = bytearray()
        await p.send(b"stty size; echo done-1\n")
        await _expect(p, b"30 100", seen)
        await p.resize(132, 43)
        await p.send(b"stty size; echo done-2\n")
        await _expect(p, b"43 132", seen)


#: Exit 0 once a ``sleep 30.25`` runs in the sandbox (no pgrep in minimal images: /proc).
_JOB_RUNNING = (
    "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done"
    " | grep -q '^sleep 30[.]25'; echo $?"
)


async def test_ctrl_c_interrupts_the_foreground_job(sandbox):
    runtime, _, h = sandbox
    if runtime.name == "gvisor":
        pytest.skip(
            "runsc 2022's pty line discipline passes ^C through as data (echoed raw, no "
            "SIGINT) although stty shows isig: verified by hand, a gVisor limitation"
        )
    async with h.pty() as p:
        seen = bytearray()
        await p.send(b"sleep 30.25 && echo not-interrupted\n")
        # ^C only once the job runs (a ^C that races the shell's read of the line is eaten).
        for _ in range(300):
            _, out = await h.request("exec", {"command": _JOB_RUNNING})
            if out.strip() == b"0":
                break
            await asyncio.sleep(0.05)
        assert out.strip() == b"0", "the foreground job never started"
        await p.send(b"\x03")
        await p.send(b"echo alive-$((1+1))\n")
        await _expect(p, b"alive-2", seen, timeout=20)  # before the sleep would end
        assert b"\nnot-interrupted" not in seen


async def test_command_env_and_cwd(sandbox):
    _, _, h = sandbox
    await h.mkdir("ptydir")
    cwd = (await h.stat("ptydir")).path
    async with h.pty(
        command=["sh", "-c", 'echo "$FOO in $PWD"; exit 5'], env={"FOO": "bar"}, cwd=cwd
    ) as p:
        out = bytearray()
        async for data in p:
            out += data
        assert p.exit_code == 5
        assert f"bar in {cwd}".encode() in out


async def test_close_kills_the_process_tree(sandbox):
    _, _, h = sandbox
    p = h.pty()
    await p.open()
    seen = bytearray()
    await p.send(b"sleep 300 & echo pid=$!.\n")
    await _expect(p, re.compile(rb"pid=(\d+)\."), seen)
    pid = int(re.findall(rb"pid=(\d+)\.", bytes(seen))[-1])
    await p.close()
    assert p.exit_code is not None and p.exit_code != 0
    for _ in range(50):  # SIGKILLed at once; reaped by init a moment later
        data, out = await h.request("exec", {"command": f"kill -0 {pid} 2>/dev/null; echo $?"})
        if out.strip() == b"1":
            break
        await asyncio.sleep(0.1)
    assert out.strip() == b"1", "the background job survived close()"


async def test_bad_command_is_a_typed_error(sandbox):
    _, _, h = sandbox
    async with h.pty(command=["no-such-program-xyz"]) as p:
        with pytest.raises(InvalidRequest):
            await p.wait()
