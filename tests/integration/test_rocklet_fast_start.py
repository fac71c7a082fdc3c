"""The rocklet's fast start: ping and plain exec served before asyncio is imported, and the
hand-over to the asyncio agent (with unread frames and a running exec) losing nothing.

A real agent process over real pipes. ``ROCKLET_FAST_IDLE`` keeps the fast loop from handing
over on its own while a test looks at it (the hand-over on a quiet host is timing; the tests
make every hand-over happen on a frame instead).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from rock_serve.protocol import ExecRequest
from rock_serve.rocklet import AGENT_PATH, RockletHandle
from tests._wait import async_wait_until

# Run as the runtimes do (imported module, ssl blocked); at exit, say whether asyncio came in.
_BOOT = (
    "import sys;sys.modules['ssl']=None;sys.path[:0]=[{dir!r}];import agent;import atexit;"
    "atexit.register(lambda: open({mark!r},'w').write(str('asyncio' in sys.modules)));"
    "sys.exit(agent.main(sys.argv[1:]))"
)


async def _spawn(tmp_path: Path, idle: str = "3600") -> tuple[RockletHandle, Path]:
    mark = tmp_path / "asyncio-imported"
    boot = _BOOT.format(dir=os.path.dirname(AGENT_PATH), mark=str(mark))
    env = {"PATH": os.environ.get("PATH", os.defpath), "ROCKLET_FAST_IDLE": idle}
    h = await RockletHandle.spawn([sys.executable, "-I", "-S", "-c", boot], env=env)
    return h, mark


async def _exited(h: RockletHandle) -> None:
    proc = h.process
    assert proc is not None
    await h.close()
    await asyncio.wait_for(proc.wait(), 30)


async def test_ping_and_exec_need_no_asyncio(tmp_path: Path) -> None:
    h, mark = await _spawn(tmp_path)
    info = await h.ping()
    assert info["version"] == "1"
    r = await h.exec(ExecRequest(command="echo hi; echo err >&2; exit 3"))
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n")
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    bad = await h.exec(ExecRequest(command=[str(script)], shell=False))
    assert bad.exit_code == 127 and "No such file" in bad.stderr
    r = await h.exec(ExecRequest(command="sleep 30", timeout=0.2))
    assert r.timed_out and r.exit_code == 137
    big = await h.exec(ExecRequest(command="head -c 300000 /dev/zero", max_output_bytes=1000))
    assert big.truncated and len(big.stdout) == 1000
    huge = await h.exec(ExecRequest(command="head -c 400000 /dev/zero | tr '\\0' a"))
    assert huge.stdout == "a" * 400000  # more than one frame's chunk: sent as chunks first
    await _exited(h)
    assert mark.read_text() == "False"

    # The asyncio agent answers the same (a command it cannot find hands over).
    h, mark = await _spawn(tmp_path)
    nf = await h.exec(ExecRequest(command=["nosuchcommand-x"], shell=False))
    assert nf.exit_code == 127 and "No such file" in nf.stderr
    again = await h.exec(ExecRequest(command=[str(script)], shell=False))
    assert (again.exit_code, again.stdout, again.stderr) == (127, bad.stdout, bad.stderr)
    await _exited(h)
    assert mark.read_text() == "True"


async def test_hand_over_keeps_the_running_exec_and_the_unread_frames(tmp_path: Path) -> None:
    h, mark = await _spawn(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Blocks in the fast loop until the test writes the fifo.
    running = asyncio.ensure_future(h.exec(ExecRequest(command=f"cat {fifo}; echo done")))
    # Not a fast op: the asyncio agent takes over with the exec still running.
    stat = await h.stat(str(tmp_path))
    assert stat.type == "dir"
    second = await h.exec(ExecRequest(command="echo second"))
    assert second.stdout == "second\n"
    assert not running.done()
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"from the test\n")
    os.close(fd)
    r = await asyncio.wait_for(running, 30)
    assert (r.exit_code, r.stdout) == (0, "from the test\ndone\n")
    await _exited(h)
    assert mark.read_text() == "True"


async def test_cancel_kills_a_fast_exec(tmp_path: Path) -> None:
    h, _ = await _spawn(tmp_path)
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(h.exec(ExecRequest(command=f"echo $$ > {pidfile}; exec sleep 60")))
    text = await async_wait_until(
        lambda: pidfile.exists() and pidfile.read_text().strip(), what="the command's pid"
    )
    task.cancel()
    await async_wait_until(lambda: not os.path.exists(f"/proc/{text}"), what="the kill")
    r = await h.exec(ExecRequest(command="echo alive"))
    assert r.stdout == "alive\n"
    await _exited(h)


async def test_eof_during_a_fast_exec_kills_it_and_exits(tmp_path: Path) -> None:
    h, mark = await _spawn(tmp_path)
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(h.exec(ExecRequest(command=f"echo $$ > {pidfile}; exec sleep 60")))
    text = await async_wait_until(
        lambda: pidfile.exists() and pidfile.read_text().strip(), what="the command's pid"
    )
    await _exited(h)
    task.cancel()
    await async_wait_until(lambda: not os.path.exists(f"/proc/{text}"), what="the kill")
    assert mark.read_text() == "False"


async def test_quiet_agent_imports_asyncio_in_a_thread_and_hands_over(tmp_path: Path) -> None:
    h, mark = await _spawn(tmp_path, idle="0.01")
    assert (await h.exec(ExecRequest(command="echo one"))).stdout == "one\n"
    # Whether the import thread is still running or the asyncio agent has taken over, both
    # kinds of request are answered; a session needs the asyncio agent.
    results = await asyncio.gather(*(h.exec(ExecRequest(command=f"echo {i}")) for i in range(5)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
    stat = await h.stat(str(tmp_path))
    assert stat.type == "dir"
    await _exited(h)
    assert mark.read_text() == "True"
