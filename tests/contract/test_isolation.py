"""Isolation, limits and cleanup. Only meaningful where the runtime isolates (not ``local``)."""

import asyncio
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from rock_serve import errors
from rock_serve.protocol import (
    ExecRequest,
    FailureReason,
    Resources,
    SandboxSpec,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from tests._wait import async_wait_until

LIMITS = SandboxSpec(resources=Resources(memory_mb=64, pids=64, cpus=0.5), owner="iso")


def new_id():
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def sandbox_spec():
    return LIMITS


@pytest.fixture
def isolated(sandbox):
    if sandbox[0].name == "local":
        pytest.skip("the local runtime does not isolate")
    return sandbox


async def py(h, code, timeout=30):
    return await h.exec(ExecRequest(command=["python3", "-c", code], timeout=timeout))


async def test_stats_show_the_limits(isolated):
    _, _, h = isolated
    stats = await h.stats()
    assert stats.memory_limit_bytes == 64 << 20
    assert stats.pids_limit == 64
    assert stats.cpu_limit == pytest.approx(0.5)
    assert 1 <= stats.pids_current < 10


async def test_memory_limit_kills_an_over_allocation(isolated):
    runtime, sid, h = isolated
    if runtime.name == "gvisor":
        pytest.skip(
            "gVisor 2022 has no OOM killer of its own: the host's kills the Sentry, so the "
            "whole sandbox fails (test_gvisor.py::test_over_allocation_fails_the_sandbox)"
        )
    result = await py(h, "b = bytearray(128 << 20); b[::4096] = b'x' * len(b[::4096])")
    assert result.exit_code == 137, result
    assert await runtime.oom_kills(sid) >= 1
    # Only the allocating child died: the sandbox still answers.
    assert (await runtime.inspect(sid)).state == SandboxState.RUNNING
    assert (await h.exec(ExecRequest(command="echo alive"))).stdout == "alive\n"


async def test_oom_kill_of_the_rocklet_fails_the_sandbox(isolated):
    runtime, sid, h = isolated
    pid = (await h.ping())["pid"]
    # The hog starts first (children inherit oom_score_adj), then the rocklet is made the
    # OOM killer's first choice, then the hog exhausts the memory.
    # The hog waits for a go file (not a guessed sleep), so the order holds on a loaded machine.
    hog = (
        "import os, time\n"
        "open('/tmp/.hog-started', 'w').close()\n"
        "while not os.path.exists('/tmp/.hog-go'): time.sleep(0.01)\n"
        "b = bytearray(128 << 20); b[::4096] = b'x' * len(b[::4096])\n"
    )
    task = asyncio.ensure_future(py(h, hog))

    async def hog_started():
        return (await h.exec(ExecRequest(command="test -e /tmp/.hog-started"))).exit_code == 0

    await async_wait_until(hog_started, what="the hog to start")
    adj = await h.exec(ExecRequest(command=f"echo 1000 > /proc/{pid}/oom_score_adj"))
    assert adj.exit_code == 0
    assert (await h.exec(ExecRequest(command="touch /tmp/.hog-go"))).exit_code == 0
    with pytest.raises(errors.RockletUnavailable):
        await task
    await h.wait_closed()
    info = await runtime.inspect(sid)
    assert (info.state, info.reason) == (SandboxState.FAILED, FailureReason.OOM_KILLED)


async def test_pids_limit_stops_a_fork_bomb(isolated):
    _, _, h = isolated
    bomb = (
        "import subprocess\n"
        "ok, failed, procs = 0, 0, []\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        procs.append(subprocess.Popen(['sleep', '30']))\n"
        "        ok += 1\n"
        "    except OSError:\n"
        "        failed += 1\n"
        "for p in procs:\n"
        "    p.kill(); p.wait()\n"
        "print(ok, failed)\n"
    )
    result = await py(h, bomb, timeout=60)
    assert result.exit_code == 0, result
    ok, failed = map(int, result.stdout.split())
    assert ok < 64 and failed > 400
    assert (await h.exec(ExecRequest(command="echo alive"))).stdout == "alive\n"


async def test_no_route_outside_loopback(isolated):
    runtime, _, h = isolated
    outside = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(3)\n"
        "try:\n"
        "    s.connect(('1.1.1.1', 80))\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    result = await py(h, outside)
    # ENETUNREACH; gVisor's netstack answers EHOSTUNREACH for the same missing route.
    unreachable = ("101", "113") if runtime.name == "gvisor" else ("101",)
    assert result.stdout.strip() in unreachable, result
    loopback = (
        "import socket\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "c = socket.create_connection(srv.getsockname(), timeout=3)\n"
        "a, _ = srv.accept(); c.sendall(b'ping'); print(a.recv(4).decode())\n"
    )
    assert (await py(h, loopback)).stdout == "ping\n"


async def test_host_secrets_and_homes_are_hidden(isolated):
    runtime, _, h = isolated
    if runtime.name in ("docker", "gvisor"):
        pytest.skip(
            "bwrap-specific: its root is the host's / minus hidden paths; a container's root "
            "is its image (test_docker.py::test_no_host_path_but_the_rocklet checks that)"
        )
    store = getattr(runtime, "images", None)
    if store is not None:
        # The root is the default image: the host's homes do not exist there at all.
        listing = await h.exec(ExecRequest(command="ls -A /root /home"))
        seen = set(listing.stdout.split()) - {"/root:", "/home:"}
        ours = {
            name
            for layer in store.layer_dirs(store.lookup(store.config.default_image))
            for sub in ("root", "home")
            if os.path.isdir(os.path.join(layer, sub))
            for name in os.listdir(os.path.join(layer, sub))
        }
        assert seen <= ours, seen - ours
        state = await h.exec(ExecRequest(command=["ls", runtime.state_dir]))
        assert state.exit_code != 0
        return
    listing = await h.exec(ExecRequest(command="ls -A /root /home; ls /etc/shadow"))
    assert listing.stdout.split() == ["/home:", "/root:"]
    assert "No such file" in listing.stderr
    if os.listdir("/root"):
        assert not (await h.list_dir("/root")).entries
    state = await h.exec(ExecRequest(command=["ls", runtime.state_dir]))
    assert state.exit_code != 0


async def test_own_pid_namespace_and_hostname(isolated):
    runtime, sid, h = isolated
    result = await py(
        h, "import os, socket; print(sum(e.isdigit() for e in os.listdir('/proc')), os.getpid())"
    )
    count, pid = map(int, result.stdout.split())
    # runc burns a few pid numbers setting up the container and each exec (the rocklet's).
    assert count < 10 and pid < (64 if runtime.name == "docker" else 10)
    assert (await h.exec(ExecRequest(command="hostname"))).stdout == f"{sid}\n"


async def test_writes_go_to_the_overlay(isolated):
    runtime, sid, h = isolated
    if runtime.name in ("docker", "gvisor"):
        pytest.skip(
            "bwrap-specific: checks the overlay upper dir in its state dir; a container's "
            "writes go to its own layer (test_docker.py::test_commit_round_trip checks that)"
        )
    name = f"/usr/local/rock-test-{sid}"
    assert (await h.exec(ExecRequest(command=f"echo x > {name} && cat {name}"))).stdout == "x\n"
    assert not os.path.exists(name)
    upper = os.path.join(runtime._rw_dir(os.path.join(runtime.state_dir, sid)), "upper")
    assert os.path.exists(os.path.join(upper, name.lstrip("/")))
    # The lower layer is never written, even when a sandbox deletes a system file.
    assert (await h.exec(ExecRequest(command="rm /etc/hostname && ls /etc/hostname"))).exit_code
    assert os.path.exists("/etc/hostname")


async def test_sandboxes_do_not_see_each_other(runtime):
    if runtime.name == "local":
        pytest.skip("the local runtime does not isolate")
    a, b = new_id(), new_id()
    for sid in (a, b):
        await runtime.create(sid, SandboxSpec())
    ha, hb = await runtime.start(a), await runtime.start(b)
    # The background sleep must not hold the exec's output pipe (the exec would wait for it).
    await ha.exec(ExecRequest(command="echo a > /var/tmp/mine; sleep 30 >/dev/null 2>&1 &"))

    async def a_sees_its_sleep() -> bool:
        # the background child may not have exec'd sleep yet when the exec returns
        return "sleep" in (await ha.exec(ExecRequest(command="cat /proc/*/comm"))).stdout

    await async_wait_until(a_sees_its_sleep, what="the sandbox's own background sleep")
    assert (await hb.exec(ExecRequest(command="cat /proc/*/comm"))).exit_code == 0
    assert (await hb.exec(ExecRequest(command="cat /var/tmp/mine"))).exit_code != 0
    assert "sleep" not in (await hb.exec(ExecRequest(command="cat /proc/*/comm"))).stdout
    for sid in (a, b):
        await runtime.remove(sid)


def _pids_of(needle: bytes) -> list[int]:
    """Host pids whose cgroup file or environment mentions ``needle``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cgroup", "environ"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    if needle in f.read():
                        out.append(int(entry))
                        break
            except OSError:
                pass
    return out


async def test_remove_leaves_nothing_behind(runtime):
    sid = new_id()
    await runtime.create(sid, LIMITS)
    h = await runtime.start(sid)
    await h.create_session(SessionCreateRequest())
    await h.run_in_session(SessionRunRequest(command="sleep 300 & sleep 301 & disown -a"))
    await h.exec(ExecRequest(command="nohup sleep 302 >/dev/null 2>&1 &"))
    if runtime.name in ("docker", "gvisor"):
        # The container's cgroup paths and its mounts' paths name its id; it has no state dir.
        container = runtime._client.inspect_container(runtime.container_name(sid))["Id"]
        sandbox_dir, needle, mark = None, container.encode(), container
    else:
        sandbox_dir = os.path.join(runtime.state_dir, sid)
        needle = sid.encode() if runtime.name == "bwrap" else sandbox_dir.encode()
        mark = sandbox_dir  # (the bwrap runtime keeps its default root's skeleton mounted)
    assert len(_pids_of(needle)) >= 4

    await runtime.remove(sid)

    assert _pids_of(needle) == []
    with open("/proc/self/mountinfo") as f:
        assert mark not in f.read()
    if sandbox_dir is not None:
        assert not os.path.exists(sandbox_dir)
    if runtime.name in ("docker", "gvisor"):
        assert await runtime.list() == []
    if runtime.name == "bwrap":
        assert not runtime._cgroup(sid).exists()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert sid not in ps


async def test_custom_rootfs(runtime, tmp_path):
    """A minimal rootfs built from the host's python3, bash and coreutils (as CI's stand-in
    for a debootstrapped tree): the rocklet runs from it and nothing else is visible."""
    if runtime.name == "local":
        pytest.skip("the local runtime has no rootfs")
    if runtime.name in ("docker", "gvisor"):
        pytest.skip(
            "a docker image is an image, not a directory (test_docker.py runs other images: "
            "a committed one and one without python3)"
        )
    rootfs = tmp_path / "rootfs"
    _build_rootfs(str(rootfs))
    sid = new_id()
    await runtime.create(sid, SandboxSpec(image=str(rootfs)))
    h = await runtime.start(sid)
    await h.create_session(SessionCreateRequest())
    result = await h.run_in_session(SessionRunRequest(command="echo hi; ls /; ls /work"))
    assert result.output.startswith("hi\n")
    assert "usr" in result.output.split() and "No such file" in result.output
    ver = await h.exec(ExecRequest(command=["python3", "-c", "import sys; print(sys.prefix)"]))
    assert ver.stdout == "/usr\n"
    await runtime.remove(sid)


def _build_rootfs(root: str) -> None:
    stdlib = os.path.dirname(os.__file__) if sys.prefix == "/usr" else "/usr/lib/python3.11"
    python = os.path.realpath(shutil.which("python3", path="/usr/bin") or "/usr/bin/python3")
    if not os.path.isdir(stdlib) or not os.path.exists(python):
        pytest.skip("needs the system python3 and its stdlib")
    os.makedirs(f"{root}/usr/bin")
    os.makedirs(f"{root}/usr/lib")
    os.makedirs(f"{root}/usr/lib64")
    os.makedirs(f"{root}/etc")
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{'bin' if link == 'sbin' else link}", f"{root}/{link}")
    subprocess.run(["cp", "-al", stdlib, f"{root}{stdlib}"], check=True)
    tools = [python, *(shutil.which(t) for t in ("bash", "sh", "ls", "cat", "sleep", "hostname"))]
    binaries = [t for t in tools if t]
    libs = set()
    dynload = [os.path.join(stdlib, "lib-dynload", n) for n in os.listdir(f"{stdlib}/lib-dynload")]
    for binary in binaries + dynload:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if path.startswith("/"):
                libs.add(path)
    for binary in binaries:
        shutil.copy2(binary, f"{root}/usr/bin/{os.path.basename(binary)}")
    os.symlink(os.path.basename(python), f"{root}/usr/bin/python3")
    for lib in libs:
        dest = root + lib
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            shutil.copy2(lib, dest)
