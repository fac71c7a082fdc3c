"""Limits that hold, and env secrets that stay secret.

Before (issue 11): ``disk_mb: 50`` let a sandbox write 734 MB to the host disk, there was no
default CPU quota, env values were in bwrap's command line (``/proc/<pid>/cmdline``, readable
by every host user) and ``meta.json`` was 0644.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

import pytest

from rock_serve.protocol import Resources, SandboxSpec

from .conftest import new_id, py, sh


async def test_default_limits_apply_to_a_bare_spec(sandbox):
    runtime, _, h = sandbox
    dflt = runtime.config.default_resources
    stats = await h.stats()
    assert dflt.cpus is not None and stats.cpu_limit == pytest.approx(dflt.cpus)
    assert dflt.memory_mb is not None and stats.memory_limit_bytes == dflt.memory_mb << 20
    assert stats.pids_limit == dflt.pids


async def test_disk_limit_gives_enospc_and_spares_the_host(runtime):
    if runtime.name != "bwrap":
        pytest.skip(
            "docker: overlay2 on an ext4 backing file system has no writable-layer quota "
            "(it needs xfs with pquota); disk_mb is ignored there with a warning"
        )
    sid = new_id()
    await runtime.create(sid, SandboxSpec(resources=Resources(disk_mb=50)))
    h = await runtime.start(sid)
    attack = await sh(h, "dd if=/dev/zero of=/root/big bs=1M count=200 2>&1; sync; df -m /")
    assert "No space left on device" in attack.stdout, attack
    # The host holds at most the sandbox's disk: a sparse file of 50 MiB.
    image = os.path.join(runtime.state_dir, sid, "disk.img")
    assert os.stat(image).st_blocks * 512 <= 50 << 20
    await sh(h, "rm /root/big")
    assert (await sh(h, "echo fine > /root/other && cat /root/other")).stdout == "fine\n"
    await runtime.remove(sid)


FORK_BOMB = """
import os, signal, time
pids = []
try:
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            os.close(1); os.close(2); time.sleep(60); os._exit(0)
        pids.append(pid)
    print("forked", 0, len(pids))
except OSError as e:
    print("refused", e.errno, len(pids))
for pid in pids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


async def test_pids_limit_stops_a_fork_bomb(runtime):
    sid = new_id()
    await runtime.create(sid, SandboxSpec(resources=Resources(pids=32)))
    h = await runtime.start(sid)
    bomb = await py(h, FORK_BOMB)
    refused, err, forked = bomb.stdout.split()
    assert (refused, int(err)) == ("refused", errno.EAGAIN), bomb
    assert int(forked) < 32
    # The rocklet survived, and the sandbox recovers once the processes are gone.
    assert (await sh(h, "echo alive")).stdout == "alive\n"
    await runtime.remove(sid)


async def test_env_values_never_reach_a_host_command_line(runtime):
    secret = "s3cr3t-" + secrets.token_hex(16)
    sid = new_id()
    await runtime.create(sid, SandboxSpec(env={"API_KEY": secret}))
    h = await runtime.start(sid)
    assert (await sh(h, "echo $API_KEY")).stdout == f"{secret}\n"
    await sh(h, "sleep 30 >/dev/null 2>&1 &")
    needle = secret.encode()
    leaks = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        leaks.append(entry)
            except OSError:
                pass
    assert leaks == []
    await runtime.remove(sid)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_state_files_are_private(runtime):
    if runtime.name != "bwrap":
        pytest.skip("the docker runtime keeps no sandbox state files (Docker holds it)")
    sid = new_id()
    await runtime.create(sid, SandboxSpec(env={"TOKEN": "x"}))
    await runtime.start(sid)
    path = os.path.join(runtime.state_dir, sid)
    assert _mode(runtime.state_dir) == 0o700
    assert _mode(path) == 0o700
    for name in ("meta.json", "env", "agent.log"):
        assert _mode(os.path.join(path, name)) == 0o600, name
    assert _mode(runtime.seccomp_file) == 0o600
    await runtime.remove(sid)
