"""What only the docker runtime has: container settings, images, commit, reattach, typed failures.

Real dockerd, real containers, the offline test image from ``scripts/build-test-image``.
Skipped with the reason when no daemon or image is there, an error under ROCK_REQUIRE_DOCKER=1.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from rock_serve import errors
from rock_serve.config import DOCKER_TEST_IMAGE, parse_runtime_config
from rock_serve.protocol import (
    ExecRequest,
    FailureReason,
    Resources,
    SandboxSpec,
    SandboxState,
    SessionCreateRequest,
    SessionRunRequest,
)
from rock_serve.runtime import LABEL_ID, LABEL_OWNER, LABEL_RUNTIME, build_runtime

from .conftest import docker_config, new_id, require_docker

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


@pytest.fixture
def config(tmp_path):
    require_docker()
    return docker_config(str(tmp_path))


@pytest.fixture
async def rt(config, images):
    # After ``images`` is set up, so its teardown runs after this one's: no container of a
    # committed image is left when the image goes (it would only be untagged).
    runtime = config.build()
    try:
        yield runtime
    finally:
        for info in await runtime.list():
            await runtime.remove(info.id)
        await runtime.close()


@pytest.fixture
def dapi():
    import docker

    client = docker.APIClient(version="auto")
    yield client
    client.close()


@pytest.fixture
def images(dapi):
    """Image tags made by a test; removed afterwards."""
    made: list[str] = []
    yield made
    for ref in made:
        try:
            dapi.remove_image(ref, force=True)
        except Exception:  # noqa: S110 - already gone
            pass


async def started(rt, spec=None):
    sid = new_id()
    await rt.create(sid, spec or SandboxSpec())
    return sid, await rt.start(sid)


async def sh(h, command, **kw):
    return await h.exec(ExecRequest(command=command, **kw))


async def pids_named(h, name):
    """Pids of processes called ``name`` in the sandbox (the test image has no pgrep)."""
    script = (
        'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = '
        f"{name} ] && echo ${{p#/proc/}}; done; true"
    )
    return (await sh(h, script)).stdout.split()


# ---------------------------------------------------------------- the container


async def test_limits_reach_the_container_and_its_stats(rt, dapi):
    spec = SandboxSpec(resources=Resources(cpus=0.5, memory_mb=96, pids=80))
    sid, h = await started(rt, spec)
    c = dapi.inspect_container(rt.container_name(sid))
    host = c["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 96 << 20, "no swap beyond the limit"
    assert host["PidsLimit"] == 80
    stats = dapi.stats(c["Id"], stream=False)
    assert stats["memory_stats"]["limit"] == 96 << 20
    assert stats["pids_stats"]["limit"] == 80
    assert 1 <= stats["pids_stats"]["current"] < 10
    assert stats["cpu_stats"]["cpu_usage"]["total_usage"] > 0
    inside = await h.stats()
    assert (inside.cpu_limit, inside.memory_limit_bytes, inside.pids_limit) == (0.5, 96 << 20, 80)


async def test_unprivileged_and_only_the_rocklet_is_mounted(rt, dapi):
    sid, h = await started(rt)
    host = dapi.inspect_container(rt.container_name(sid))["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert "NET_RAW" not in str(host["CapAdd"]) and "SYS_ADMIN" not in str(host["CapAdd"])
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Init"] is True
    status = (await sh(h, "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")).stdout.split()
    cap_eff = int(status[status.index("CapEff:") + 1], 16)
    assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN"
    assert not cap_eff & (1 << 13), "CAP_NET_RAW"
    assert status[status.index("NoNewPrivs:") + 1] == "1"
    binds = [m for m in dapi.inspect_container(rt.container_name(sid))["Mounts"]]
    assert [(m["Destination"], m["RW"]) for m in binds] == [("/.rock", False)]
    denied = await sh(h, "touch /.rock/x")
    assert denied.exit_code != 0 and "Read-only file system" in denied.stderr


async def test_no_host_path_but_the_rocklet(rt, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    marker = secrets / f"host-only-{uuid.uuid4().hex}"
    marker.write_text("secret")
    _, h = await started(rt)
    assert (await sh(h, f"cat {marker}")).exit_code != 0
    mounts = (await sh(h, "cat /proc/self/mountinfo")).stdout
    assert str(secrets) not in mounts
    # The container's root is the image's Debian, not the host's filesystem.
    assert (await sh(h, "cat /etc/debian_version")).stdout.startswith("12.")
    assert (await sh(h, "ls /work /var/lib/docker")).exit_code != 0


async def test_network_none_by_default(rt, dapi):
    sid, h = await started(rt)
    assert dapi.inspect_container(rt.container_name(sid))["HostConfig"]["NetworkMode"] == "none"
    assert (await sh(h, "ls /sys/class/net")).stdout.split() == ["lo"]


async def test_network_needs_permission_and_an_existing_network(tmp_path):
    require_docker()
    strict = docker_config(str(tmp_path)).build()
    for network in ("host", "bridge"):
        with pytest.raises(errors.InvalidConfig, match="allow_network"):
            await strict.create(new_id(), SandboxSpec(network=network))
    loose = docker_config(
        str(tmp_path), allow_network=True, bridge_network="rock-no-such-network"
    ).build()
    with pytest.raises(errors.InvalidConfig, match="rock-no-such-network"):
        await loose.create(new_id(), SandboxSpec(network="bridge"))
    with pytest.raises(errors.InvalidConfig, match="allow_host_network"):
        await loose.create(new_id(), SandboxSpec(network="host"))
    await loose.close()
    loose = docker_config(str(tmp_path), allow_network=True, allow_host_network=True).build()
    sid = new_id()
    try:
        await loose.create(sid, SandboxSpec(network="host"))
        h = await loose.start(sid)
        assert len((await sh(h, "ls /sys/class/net")).stdout.split()) > 1  # the node's
    finally:
        await loose.remove(sid)
        await loose.close()
        await strict.close()


async def test_labels_on_the_container_and_in_list(rt, dapi):
    sid = new_id()
    spec = SandboxSpec(owner="alice", labels={"job": "j7", "rock.worker": "w1"})
    info = await rt.create(sid, spec)
    want = {"job": "j7", "rock.worker": "w1", LABEL_ID: sid, LABEL_OWNER: "alice"}
    want[LABEL_RUNTIME] = "docker"
    assert info.labels == want
    labels = dapi.inspect_container(rt.container_name(sid))["Config"]["Labels"]
    assert {k: labels[k] for k in want} == want
    assert labels["rock-serve.scope"] == rt.config.scope
    assert [i.id for i in await rt.list({"job": "j7"})] == [sid]
    assert await rt.list({"job": "other"}) == []
    # Another scope on the same daemon sees nothing of this one.
    other = docker_config(rt.config.agent_dir).build()
    assert await other.list() == []
    with pytest.raises(errors.SandboxNotFound):
        await other.inspect(sid)
    await other.remove(sid)  # not its sandbox: nothing happens
    assert (await rt.inspect(sid)).state == SandboxState.PENDING
    await other.close()


async def test_oom_kill_of_the_init_fails_the_sandbox(rt):
    sid, h = await started(rt, SandboxSpec(resources=Resources(memory_mb=64)))
    # The init and the keep-alive become the OOM killer's first choice, then memory runs out.
    pids = await pids_named(h, "docker-init") + await pids_named(h, "keepalive")
    assert len(pids) == 2
    await sh(h, " ; ".join(f"echo 1000 > /proc/{p}/oom_score_adj" for p in pids))
    # Two hogs of 40 MiB each: together over the limit, each one's badness (its rss) below the
    # init's (oom_score_adj 1000 = the whole limit). One hog of 128 MiB could outscore the init
    # when the rocklet leaves it most of the 64 MiB (the rocklet starts without asyncio).
    hog = "b = bytearray(40 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(60)"
    with pytest.raises(errors.RockletUnavailable):
        await h.exec(
            ExecRequest(command=f'python3 -c "{hog}" & python3 -c "{hog}"; wait', timeout=30)
        )
    await h.wait_closed()
    info = await rt.inspect(sid)
    assert (info.state, info.reason) == (SandboxState.FAILED, FailureReason.OOM_KILLED)
    assert await rt.oom_kills(sid) >= 1


async def test_stop_kills_everything_and_start_again(rt, dapi):
    sid, h = await started(rt)
    await h.exec(ExecRequest(command="nohup sleep 300 >/dev/null 2>&1 &"))
    await rt.stop(sid)
    c = dapi.inspect_container(rt.container_name(sid))
    # 143: SIGTERM ended it (a stop that waited out its grace would end in SIGKILL, 137)
    assert c["State"]["Running"] is False and c["State"]["ExitCode"] == 143
    assert (await rt.inspect(sid)).state == SandboxState.STOPPED
    with pytest.raises(errors.SandboxNotRunning):
        await rt.attach(sid)
    h = await rt.start(sid)
    assert await pids_named(h, "sleep") == []  # nothing survived the stop


# ---------------------------------------------------------------- images


async def test_missing_image_fails_fast(rt):
    # "never": the pull policy refused it before any pull was tried
    with pytest.raises(errors.ImageNotFound, match="never"):
        await rt.create(new_id(), SandboxSpec(image="rock-serve/no-such-image:1"))
    assert await rt.list() == []


@pytest.mark.parametrize("policy", ["if-missing", "always"])
async def test_unpullable_image_fails_fast(tmp_path, policy):
    """No registry is reachable here; with one, the image does not exist there: either way a
    typed image_not_found, quickly, and no container left."""
    require_docker()
    runtime = docker_config(str(tmp_path), pull=policy).build()
    try:
        t = time.perf_counter()
        ref = f"rock-serve/no-such-image-{uuid.uuid4().hex[:8]}:1"
        with pytest.raises(errors.ImageNotFound, match="pull"):
            await runtime.create(new_id(), SandboxSpec(image=ref))
        assert time.perf_counter() - t < 30
        if policy == "always":  # a local-only image cannot be pulled either
            with pytest.raises(errors.ImageNotFound):
                await runtime.create(new_id(), SandboxSpec(image=DOCKER_TEST_IMAGE))
        assert await runtime.list() == []
    finally:
        await runtime.close()


async def test_commit_round_trip(rt, dapi, images):
    sid, h = await started(rt, SandboxSpec(env={"FROM_SPEC": "1"}, labels={"job": "c"}))
    await h.write_file("/opt/made-here.txt", b"committed")
    await sh(h, "rm /etc/issue")
    changed = {c["Path"] for c in dapi.diff(rt.container_name(sid))}
    assert "/opt/made-here.txt" in changed and "/etc/issue" in changed
    assert not any(p.startswith("/.rock") and p != "/.rock" for p in changed)
    repo = f"rock-serve/test-commit-{uuid.uuid4().hex[:8]}"
    ref = await rt.commit(sid, repo, "v1")
    images.append(ref)
    assert ref == f"{repo}:v1"
    image = dapi.inspect_image(ref)["Config"]
    assert image["Cmd"] == ["/bin/bash"] and not image["Entrypoint"]
    # The daemon keeps every label key of the container; the sandbox's are blanked.
    labels = {k: v for k, v in image["Labels"].items() if v}
    assert labels == {"rock-serve.committed-from": sid} and not image["OpenStdin"]
    assert "FROM_SPEC=1" in image["Env"] and image["WorkingDir"] == "/root"
    assert (await sh(h, "echo still running")).stdout == "still running\n"

    sid2, h2 = await started(rt, SandboxSpec(image=ref))
    assert await h2.read_file("/opt/made-here.txt") == b"committed"
    assert (await sh(h2, "ls /etc/issue")).exit_code != 0
    assert (await rt.inspect(sid2)).labels == {
        LABEL_ID: sid2,
        LABEL_OWNER: "",
        LABEL_RUNTIME: "docker",
    }
    assert [i.id for i in await rt.list({"job": "c"})] == [sid]
    with pytest.raises(errors.InvalidRequest):
        await rt.commit(sid, "Not A Valid/Repo!", "v1")


@pytest.fixture(scope="module")
def python_less_image():
    """The test image without python3 (made with the SDK alone), removed afterwards."""
    require_docker()
    import docker

    api = docker.APIClient(version="auto")
    c = api.create_container(DOCKER_TEST_IMAGE, ["/bin/sh", "-c", "rm -f /usr/bin/python3*"])
    try:
        api.start(c["Id"])
        assert api.wait(c["Id"], timeout=60)["StatusCode"] == 0
        repo = f"rock-serve/test-nopython-{uuid.uuid4().hex[:8]}"
        api.commit(c["Id"], repository=repo, tag="v1")
    finally:
        api.remove_container(c["Id"], force=True)
    yield f"{repo}:v1"
    api.remove_image(f"{repo}:v1", force=True)
    api.close()


def _distribution_python() -> str | None:
    """A python3 of the node installed under /usr (Debian's), for the /.rock-python layout."""
    exe = shutil.which("python3", path="/usr/bin")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "-I", "-c", "import sys; print(sys.base_prefix, sys.version_info >= (3, 8))"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return exe if out == ["/usr", "True"] else None


@pytest.mark.parametrize("node", ["worker", "distribution"])
async def test_image_without_python_uses_the_nodes(tmp_path, dapi, python_less_image, node):
    exe = None
    if node == "distribution":
        exe = _distribution_python()
        if exe is None:
            pytest.skip("no python3 >= 3.8 under /usr on this node")
    rt = docker_config(str(tmp_path), node_python_executable=exe).build()
    try:
        sid, h = await started(rt, SandboxSpec(image=python_less_image))
        assert (await sh(h, "command -v python3")).exit_code != 0
        pong = await h.ping()
        if exe is None:
            assert pong["python"] == ".".join(map(str, sys.version_info[:3]))
        await h.create_session(SessionCreateRequest())
        run = await h.run_in_session(SessionRunRequest(command="echo $((6 * 7))"))
        assert run.output == "42\n"
        mounts = dapi.inspect_container(rt.container_name(sid))["Mounts"]
        assert len(mounts) > 1 and all(not m["RW"] for m in mounts)
        if node == "distribution":
            assert {m["Destination"] for m in mounts} == {
                "/.rock",
                "/.rock-python/bin/python3",
                f"/.rock-python/lib/python{pong['python'].rsplit('.', 1)[0]}",
            }
        async with h.pty(command=["sh", "-c", "echo pty-ok"]) as p:  # the pty's python hop
            assert await p.wait() == 0
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()


async def test_image_without_python_and_no_fallback(tmp_path, python_less_image):
    rt = docker_config(str(tmp_path), node_python=False).build()
    try:
        with pytest.raises(errors.InvalidConfig, match="node_python"):
            await rt.create(new_id(), SandboxSpec(image=python_less_image))
        assert await rt.list() == []
    finally:
        await rt.close()


# ---------------------------------------------------------------- adoption and failures


async def test_attach_after_the_owner_dies(config):
    first = config.build()
    sid, h = await started(first, SandboxSpec(owner="w1"))
    await h.write_file("notes.txt", b"kept")
    await h.exec(ExecRequest(command="nohup sleep 300 >/dev/null 2>&1 &"))
    await h.create_session(SessionCreateRequest())
    await h.run_in_session(SessionRunRequest(command="export OLD=1"))
    h.abort()  # the Worker's process dies: its connection drops without a goodbye
    await h.wait_closed()

    second = config.build()  # the restarted Worker
    try:
        (found,) = await second.list({LABEL_OWNER: "w1"})
        assert found.id == sid
        assert found.state in (SandboxState.RUNNING, SandboxState.FAILED)  # old rocklet exiting
        h2 = await second.attach(sid)
        assert await second.attach(sid) is h2
        assert (await second.inspect(sid)).state == SandboxState.RUNNING
        assert await h2.read_file("notes.txt") == b"kept"
        assert len(await pids_named(h2, "sleep")) == 1  # background work survived
        await h2.create_session(SessionCreateRequest())
        run = await h2.run_in_session(SessionRunRequest(command="echo ${OLD:-fresh}"))
        assert run.output == "fresh\n"  # a new rocklet, a new session
        # One rocklet runs: the old one exited when its connection dropped.
        rocklets = await sh(h2, "grep -l 'import agen[t]' /proc/[0-9]*/cmdline")
        assert len(rocklets.stdout.split()) == 1, rocklets
        await second.remove(sid)
        assert await second.list() == []
    finally:
        for info in await second.list():
            await second.remove(info.id)
        await second.close()
        await first.close()


async def test_a_rocklet_that_cannot_start_is_a_typed_error(tmp_path):
    require_docker()
    runtime = docker_config(str(tmp_path), python="/bin/sh").build()  # no -I or -S option
    try:
        sid = new_id()
        await runtime.create(sid, SandboxSpec())
        with pytest.raises(
            errors.RuntimeUnavailable, match="did not start.*Illegal option"
        ) as info:
            await runtime.start(sid)
        assert errors.http_status(info.value.code) == 503
        assert (await runtime.inspect(sid)).state == SandboxState.STOPPED
    finally:
        for info in await runtime.list():
            await runtime.remove(info.id)
        await runtime.close()


async def test_attach_errors(rt):
    with pytest.raises(errors.SandboxNotFound):
        await rt.attach("nope")
    sid = new_id()
    await rt.create(sid, SandboxSpec())
    with pytest.raises(errors.SandboxNotRunning):
        await rt.attach(sid)


async def test_daemon_unreachable_is_runtime_unavailable(tmp_path):
    runtime = docker_config(str(tmp_path), docker_host="unix:///nonexistent/docker.sock").build()
    t = time.perf_counter()
    for call in (
        runtime.create(new_id(), SandboxSpec()),
        runtime.list(),
        runtime.inspect("x"),
        runtime.remove("x"),
    ):
        with pytest.raises(errors.RuntimeUnavailable, match="unreachable") as info:
            await call
        assert errors.http_status(info.value.code) == 503
    assert time.perf_counter() - t < 30  # no retry loop (each call takes milliseconds)
    await runtime.close()


def test_bad_configs(tmp_path):
    with pytest.raises(errors.InvalidConfig, match="scope"):
        parse_runtime_config({"type": "docker", "scope": "Not_Valid"})
    with pytest.raises(errors.InvalidConfig, match="pull"):
        parse_runtime_config({"type": "docker", "pull": "sometimes"})
    with pytest.raises(errors.InvalidConfig, match="docker_host"):
        parse_runtime_config({"type": "docker", "docker_host": "ssh://somewhere"})
    with pytest.raises(errors.InvalidConfig, match="capabilities"):
        build_runtime({"type": "docker", "agent_dir": str(tmp_path), "capabilities": ["SYS_ADMIN"]})
    cfg = parse_runtime_config({"type": "docker", "agent_dir": str(tmp_path)})
    assert cfg.build().name == "docker"


async def test_disk_limit_where_the_driver_allows_it(rt, dapi, caplog):
    caplog.set_level(logging.WARNING, logger="rock_serve.runtime.docker")
    spec = SandboxSpec(resources=Resources(disk_mb=512))
    ids = [new_id(), new_id()]
    for sid in ids:
        await rt.create(sid, spec)
    opts = [
        dapi.inspect_container(rt.container_name(s))["HostConfig"].get("StorageOpt") for s in ids
    ]
    if opts[0]:  # e.g. overlay2 on xfs with pquota
        assert opts == [{"size": "512M"}] * 2
    else:  # overlay2 on ext4 (this machine): ignored, with one warning
        warnings = [r for r in caplog.records if "disk_mb is ignored" in r.getMessage()]
        assert len(warnings) == 1


async def test_concurrent_creates_and_a_free_event_loop(rt):
    lags: list[float] = []

    async def ticker():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    tick = asyncio.ensure_future(ticker())
    try:
        results = await asyncio.gather(*(started(rt) for _ in range(4)))
    finally:
        tick.cancel()
    for _, h in results:
        assert (await sh(h, "echo ok")).stdout == "ok\n"
    assert len(await rt.list()) == 4
    # Every daemon call ran in a thread: the loop kept ticking throughout.
    assert max(lags) < 0.5, max(lags)
