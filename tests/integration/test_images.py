"""The image store against a real registry (docker-registry on loopback) and real layers.

Covers: layer unpacking (whiteouts, opaque dirs, links, setuid, owners) as a sandbox sees it,
refused escapes, typed errors (not found, bad credentials, registry down, store full,
malformed reference), single flight, LRU eviction, sharing of layers, that a default
sandbox sees none of the host's files, and the image's User (the ``nonroot`` test image: its
processes run as that user in the sandbox's user namespace, no capabilities left).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from rock_serve import envs, errors
from rock_serve.config import BwrapRuntimeConfig, ImageStoreConfig
from rock_serve.protocol import (
    CommitRequest,
    CreateSandboxRequest,
    ExecRequest,
    ImagePullRequest,
    ImagePushRequest,
    RegistryAuth,
    SandboxSpec,
    validate_image_ref,
)
from rock_serve.runtime._image_unpack import LayerEscape, unpack_layer
from rock_serve.runtime.images import ImageStore
from rock_serve.sdk import Client
from rock_serve.sdk import _base as sdk_base
from tests._registry import (
    IMAGE_CACHE,
    SKOPEO,
    Registry,
    SilentRegistry,
    free_port,
    oci,
    registry_skip_reason,
)
from tests._wait import async_wait_until
from tests.contract.conftest import _BWRAP_SKIP, REQUIRE_DOCKER, TEST_CGROUP_PARENT

_SKIP = registry_skip_reason()
if _SKIP is not None and REQUIRE_DOCKER:
    raise RuntimeError(f"ROCK_REQUIRE_DOCKER=1 but the image tests cannot run: {_SKIP}")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
needs_bwrap = pytest.mark.skipif(_BWRAP_SKIP is not None, reason=str(_BWRAP_SKIP))

AUTH = ("alice", "pw-" + uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        for tag in ("nopython", "multilayer"):
            reg.push(oci(tag), f"test/{tag}:v1")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("private"), auth=AUTH).start()
    try:
        reg.push(oci("nopython"), "team/secret:v1")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One store root for the tests that need the Debian base (unpacked once per module)."""
    return tmp_path_factory.mktemp("shared-store")


def layout_with(tmp_path, tag: str, layers: list[dict[str, bytes]]) -> str:
    """A small OCI image (one layer per dict of files) made with umoci; its skopeo name."""
    layout = tmp_path / "layout"
    if not layout.exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
    for n, files in enumerate(layers):
        blob = _tar(
            tmp_path / f"{tag}-{n}.tar", [(k, tarfile.REGTYPE, v) for k, v in files.items()]
        )
        subprocess.run(
            ["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", blob], check=True
        )
    return f"oci:{layout}:{tag}"


def store_at(path, **kw) -> ImageStore:
    """A store at ``path`` that may read OCI layouts next to it and the test image cache."""
    sources = [str(Path(path).parent), IMAGE_CACHE]
    return ImageStore(
        ImageStoreConfig(root=str(path), retry_backoff_seconds=0.05, local_sources=sources, **kw)
    )


# ---------------------------------------------------------------- layers


def _tar(path, members) -> str:
    with tarfile.open(path, "w") as t:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            data = b""
            if kind == tarfile.REGTYPE:
                data = extra or b"x"
                info.size = len(data)
            else:
                info.linkname = extra or ""
            t.addfile(info, io.BytesIO(data) if data else None)
    return str(path)


@pytest.mark.parametrize(
    "members",
    [
        [("../escape.txt", tarfile.REGTYPE, b"pwned")],
        [("/escape.txt", tarfile.REGTYPE, b"pwned")],
        [("a/../../escape.txt", tarfile.REGTYPE, b"pwned")],
        [("link", tarfile.SYMTYPE, "/OUTSIDE"), ("link/escape.txt", tarfile.REGTYPE, b"pwned")],
        [("link", tarfile.SYMTYPE, "../.."), ("link/escape.txt", tarfile.REGTYPE, b"pwned")],
        [("hard", tarfile.LNKTYPE, "../escape.txt")],
        # a hard link through an absolute symlink would link a host file into the layer
        [("link", tarfile.SYMTYPE, "/etc"), ("hard", tarfile.LNKTYPE, "link/hostname")],
        # a chain: a relative symlink to an absolute one, then a write through the first
        [
            ("a", tarfile.SYMTYPE, "b"),
            ("b", tarfile.SYMTYPE, "/OUTSIDE"),
            ("a/escape.txt", tarfile.REGTYPE, b"pwned"),
        ],
    ],
    ids=[
        "dotdot",
        "absolute",
        "nested-dotdot",
        "abs-symlink-dir",
        "rel-symlink-dir",
        "hardlink",
        "hardlink-via-abs-symlink",
        "symlink-chain",
    ],
)
def test_escaping_layers_are_refused_and_write_nothing_outside(tmp_path, members):
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    dest = tmp_path / "root" / "layer"
    dest.mkdir(parents=True)
    blob = _tar(tmp_path / "layer.tar", members)
    with pytest.raises(LayerEscape):
        unpack_layer(blob, str(dest))
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "root" / "escape.txt").exists()
    assert list(outside.iterdir()) == []


def test_a_layer_with_an_escape_is_a_typed_error_and_never_visible(tmp_path):
    evil = layout_with(tmp_path, "evil", [{"../../evil": b"x"}])
    store = store_at(tmp_path / "store")
    with pytest.raises(errors.InvalidRequest, match="refused"):
        asyncio.run(store.get(evil))
    assert store.list() == []
    assert os.listdir(tmp_path / "store" / "layers" / "sha256") == []
    assert not (tmp_path / "evil").exists()


# ---------------------------------------------------------------- sandboxes on images


@pytest.fixture
async def bwrap(tmp_path, shared_root):
    cfg = BwrapRuntimeConfig(
        state_dir=str(tmp_path / "state"),
        cgroup_parent=TEST_CGROUP_PARENT,
        images=ImageStoreConfig(root=str(shared_root), retry_backoff_seconds=0.05),
    )
    rt = cfg.build()
    try:
        yield rt
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()


async def _started(rt, spec):
    sid = f"t-{uuid.uuid4().hex[:16]}"
    await rt.create(sid, spec)
    return sid, await rt.start(sid)


async def _sh(handle, command: str) -> str:
    result = await handle.exec(ExecRequest(command=command))
    assert result.exit_code == 0, result
    return result.stdout


@needs_bwrap
async def test_multilayer_image_as_the_sandbox_sees_it(bwrap, registry):
    sid, h = await _started(bwrap, SandboxSpec(image=registry.ref("test/multilayer:v1")))
    # WorkingDir and Env of the image config; the spec's env wins over the image's
    assert await _sh(h, "pwd; echo $ROCK_TEST_LAYER") == "/opt\n3\n"
    listing = await _sh(h, "ls -A /opt/layer2 /opt/replaced; ls /etc/issue 2>&1 || true")
    assert listing.split("\n")[:2] == ["/opt/layer2:", "abs-link"]
    assert "gone.txt" not in listing  # whiteout of a lower layer's file
    assert "old.txt" not in listing and "new.txt" in listing  # opaque directory
    assert "No such file" in listing  # whiteout of a base-layer file (/etc/issue)
    stat = await _sh(
        h,
        "stat -c '%a %u:%g %h' /opt/layer2/setuid /opt/layer2/owned.txt /opt/layer2/hard.txt;"
        " readlink /opt/layer2/abs-link; cat /opt/layer2/rel-link",
    )
    assert stat.split("\n") == [
        "4755 0:0 1",
        "640 1234:2345 1",
        "644 0:0 2",  # a hard link shares the inode with keep.txt
        "/etc/hostname",
        "layer2 keep",
        "",
    ]
    assert not os.path.exists("/opt/layer2")  # nothing of it leaked to the host
    # writes go to the sandbox's upper dir, never into the shared layers
    await _sh(h, "echo changed > /opt/layer2/keep.txt; rm /opt/layer3.txt")
    img = bwrap.images.lookup(registry.ref("test/multilayer:v1"))
    texts = [
        Path(d, "opt/layer2/keep.txt").read_text()
        for d in bwrap.images.layer_dirs(img)
        if os.path.exists(os.path.join(d, "opt/layer2/keep.txt"))
    ]
    assert texts == ["layer2 keep\n"]
    await bwrap.remove(sid)


@needs_bwrap
async def test_default_sandbox_sees_no_host_directory(bwrap):
    """With no image, a sandbox gets the default image: no host top-level dir is readable."""
    sid, h = await _started(bwrap, SandboxSpec())
    assert bwrap.images.lookup(bwrap.images.config.default_image) is not None
    os_release = await _sh(h, "cat /etc/os-release")
    assert "bookworm" in os_release
    probe = "import os, sys\nprint(os.path.realpath(sys.executable))\n"
    exe = (await h.exec(ExecRequest(command=["python3", "-c", probe]))).stdout.strip()
    assert exe.startswith("/usr/bin/python3")  # the image's own python, not the node's
    leaked = []
    img = bwrap.images.lookup(bwrap.images.config.default_image)
    image_top = {n for d in bwrap.images.layer_dirs(img) for n in os.listdir(d)}
    for name in sorted(os.listdir("/")):
        host = os.path.join("/", name)
        if name in ("proc", "sys", "dev", "tmp") or not os.path.isdir(host):
            continue  # the sandbox's own proc, sys, dev and tmp
        entries = sorted(os.listdir(host))[:50]
        if name not in image_top:
            result = await h.exec(ExecRequest(command=["ls", "-A", host]))
            if result.exit_code == 0 and result.stdout.strip():
                leaked.append(host)
            continue
        for entry in entries:
            path = os.path.join(host, entry)
            if any(
                os.path.lexists(os.path.join(d, name, entry)) for d in bwrap.images.layer_dirs(img)
            ):
                continue  # the image has its own file of that name
            result = await h.exec(ExecRequest(command=["ls", "-d", path]))
            if result.exit_code == 0:
                leaked.append(path)
    assert leaked == []
    await bwrap.remove(sid)


# ---------------------------------------------------------------- errors


async def test_unknown_image_is_image_not_found_fast(tmp_path, registry):
    # fast = asked once, never retried (counted by a skopeo that logs its runs: no clock)
    runs = tmp_path / "skopeo-runs"
    counting = tmp_path / "skopeo"
    counting.write_text(f'#!/bin/sh\necho "$*" >> {runs}\nexec {SKOPEO} "$@"\n')
    counting.chmod(0o755)
    store = store_at(tmp_path / "store", pull_attempts=3, skopeo_path=str(counting))
    with pytest.raises(errors.ImageNotFound):
        await store.get(registry.ref("test/nothing-here:v1"))
    assert len(runs.read_text().splitlines()) == 1
    with pytest.raises(errors.ImageNotFound):
        await store.get(f"oci:{tmp_path}/no-layout:x")
    assert store.list() == []


async def test_private_registry_needs_the_right_credentials(tmp_path, private_registry):
    store = store_at(tmp_path / "store")
    ref = private_registry.ref("team/secret:v1")
    with pytest.raises(errors.RegistryUnauthorized):
        await store.get(ref)
    with pytest.raises(errors.RegistryUnauthorized):
        await store.get(ref, RegistryAuth(username=AUTH[0], password="wrong"))
    img = await store.get(ref, RegistryAuth(username=AUTH[0], password=AUTH[1]))
    assert img.python is None and img.refs == [ref]
    # the password is nowhere in the store's files
    for dirpath, _, files in os.walk(tmp_path / "store" / "images"):
        for f in files:
            assert AUTH[1] not in Path(dirpath, f).read_text()
    assert AUTH[1] not in repr(RegistryAuth(username=AUTH[0], password=AUTH[1]))


async def test_registry_down_is_retried_then_unavailable(tmp_path):
    store = store_at(tmp_path / "store", pull_attempts=3)
    start = time.monotonic()
    with pytest.raises(errors.RegistryUnavailable) as info:
        await store.get(f"127.0.0.1:{free_port()}/x/y:v1")
    assert time.monotonic() - start >= 0.05 + 0.1  # two backoffs: 0.05 s then 0.1 s
    assert info.value.retry_after is not None
    assert errors.http_status(info.value.code) == 502


async def test_registry_coming_back_during_retries_succeeds(tmp_path):
    reg = Registry(tmp_path / "late")
    await asyncio.to_thread(reg.start)
    await asyncio.to_thread(reg.push, oci("nopython"), "late/np:v1")
    reg.stop()  # down, with the image in its storage
    store = store_at(tmp_path / "store", pull_attempts=8)
    pulling = asyncio.ensure_future(store.get(reg.ref("late/np:v1")))
    while store.progress(reg.ref("late/np:v1")) is None:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(reg.start)  # back on the same port and storage
    try:
        img = await pulling
        assert img.python is None
    finally:
        reg.stop()


async def test_local_sources_outside_the_allow_list_are_refused(tmp_path):
    store = ImageStore(ImageStoreConfig(root=str(tmp_path / "store")))
    for ref in (f"oci:{tmp_path}/layout:x", "oci-archive:/etc/passwd", "oci:/var/cache/../../etc"):
        with pytest.raises((errors.PermissionDenied, errors.InvalidRequest)):
            await store.get(ref)
    events = [e async for e in store.events("docker-archive:/root/x.tar")]
    assert events[-1].phase == "error" and events[-1].error["code"] == "permission_denied"
    closed = ImageStore(ImageStoreConfig(root=str(tmp_path / "store2"), allow_docker_daemon=False))
    with pytest.raises(errors.PermissionDenied):
        await closed.get("docker-daemon:rock-serve/test:bookworm")


MALFORMED = [
    "UPPER/case",
    "a b",
    "x:" + "t" * 200,
    "oci:relative/path",
    "oci:/var/../etc",
    "-lead",
    "a@sha256:z",
    "docker-daemon:Bad",
    "",
    "a" * 513,
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_references_are_invalid_image_reference(bad):
    # every wire model that takes a reference: pydantic's error is of our code's type...
    for build in (
        lambda: SandboxSpec(image=bad),
        lambda: ImagePullRequest(images=["python:3.11", bad]),
        lambda: ImagePushRequest(image="a/b:c", destination=bad),
        lambda: CommitRequest(image=bad),
    ):
        with pytest.raises(ValidationError) as info:
            build()
        assert [e["type"] for e in info.value.errors()] == ["invalid_image_reference"]
        # ...which the one table turns into the typed error, 422 over HTTP
        typed = errors.from_validation(info.value.errors())
        assert type(typed) is errors.InvalidImageReference
        assert errors.http_status(typed.code) == 422 and isinstance(typed, ValueError)
    with pytest.raises(errors.InvalidImageReference):
        validate_image_ref(bad)
    with pytest.raises(errors.InvalidImageReference):  # the SDK raises it typed, client side
        sdk_base.build(CreateSandboxRequest, image=bad)


async def test_the_store_refuses_malformed_references_typed(tmp_path):
    store = store_at(tmp_path / "store")
    for call in (
        lambda: store.get("Bad Ref!"),
        lambda: store.push("python:3.11", "Bad Ref!"),
        lambda: store.commit(str(tmp_path), None, "UPPER/case"),
    ):
        with pytest.raises(errors.InvalidImageReference):
            await call()
    events = [e async for e in store.events("Bad Ref!")]
    assert [(e.phase, e.error["code"]) for e in events] == [("error", "invalid_image_reference")]


def test_an_env_with_a_malformed_image_is_refused_typed_at_make():
    # what GEM's /make answers (422) when its kwargs carry sandbox={"image": ...}
    with Client("http://127.0.0.1:9") as client:  # never reached: make refuses first
        with pytest.raises(errors.InvalidImageReference, match="bad sandbox settings"):
            envs.make("rock/GuessNumber-v0", client=client, sandbox={"image": "Bad Ref!"})


def test_well_formed_references_and_other_violations():
    for good in (
        "python:3.11-slim",
        "registry:5000/org/task-123:v2",
        "name@sha256:" + "a" * 64,
        "oci:/var/cache/layout:tag",
        "docker-daemon:rock-serve/test:bookworm",
        "/srv/rootfs",
    ):
        assert SandboxSpec(image=good).image == good
        assert str(validate_image_ref(good))
    # a non-string is an ordinary schema violation: invalid_request (400), pydantic's error
    with pytest.raises(ValidationError) as info:
        SandboxSpec(image=5)  # type: ignore[arg-type]
    assert type(errors.from_validation(info.value.errors())) is errors.InvalidRequest
    with pytest.raises(ValidationError):
        sdk_base.build(CreateSandboxRequest, image=5)
    # the JSON schema keeps the pattern the fuzzer and clients read
    assert "pattern" in str(SandboxSpec.model_json_schema()["properties"]["image"])


async def test_store_full_and_lru_eviction(tmp_path):
    small_ref = layout_with(tmp_path, "small", [{"a.bin": b"a" * 1000}])
    big_ref = layout_with(tmp_path, "big", [{"b.bin": b"b" * 5000}, {"c.bin": b"c" * 5000}])
    # room for the big image alone: the small one is evicted (least recently used, unused)
    store = store_at(tmp_path / "store", max_bytes=10_500)
    seen: list[dict[str, int]] = []  # what /metrics gets (ImageMetrics listens the same way)
    store.listeners.append(lambda s: seen.append(s.stats()))
    first = await store.get(small_ref)
    assert seen[0]["pulls_in_flight"] == 1 and seen[-1]["pulls_in_flight"] == 0
    assert seen[-1] | {"pulls_in_flight": 0} == {
        "bytes": 1000,
        "budget": 10_500,
        "images": 1,
        "pulls_in_flight": 0,
        "pull_failures": 0,
        "pulls": 1,
        "pushes": 0,
    }
    await store.get(big_ref)
    assert [i.refs for i in store.list()] == [[big_ref]]
    assert seen[-1]["bytes"] == 10_000 and seen[-1]["images"] == 1
    assert not os.path.exists(store.layer_dir(first.layers[0]))
    # in use: never evicted; a new image that does not fit is image_store_full
    img = store.lookup(big_ref)
    store.acquire(img, "sb-1")
    with pytest.raises(errors.ImageStoreFull):
        await store.get(small_ref)
    assert store.lookup(big_ref) is not None
    assert seen[-1]["pull_failures"] == 1 and seen[-1]["pulls_in_flight"] == 0
    assert not os.path.exists(store.layer_dir(first.layers[0]))  # the refused one is gone
    with pytest.raises(errors.Conflict):
        await store.remove(big_ref)
    store.release("sb-1")
    await store.remove(big_ref)
    assert store.list() == [] and store.disk_bytes() == 0
    assert os.listdir(tmp_path / "store" / "layers" / "sha256") == []


async def test_one_pull_for_a_hundred_concurrent_requests(tmp_path, registry):
    store = store_at(tmp_path / "store")
    ref = registry.ref("test/nopython:v1")
    seen = []

    async def watch():
        async for ev in store.events(ref):
            seen.append(ev.phase)

    watcher = asyncio.ensure_future(watch())
    images = await asyncio.gather(*(store.get(ref) for _ in range(100)))
    await watcher
    assert store.pull_count == 1
    assert len({i.id for i in images}) == 1
    assert seen[-1] == "done" and "unpacking" in seen


async def test_images_share_layers_on_disk(shared_root, registry):
    store = store_at(shared_root)
    base = await store.get(oci("bookworm"))
    multi = await store.get(registry.ref("test/multilayer:v1"))
    assert multi.layers[0] == base.layers[0]
    assert store.disk_bytes() < base.size + multi.size
    assert store.disk_bytes() == multi.size  # the base layer is stored once


# ---------------------------------------------------------------- image User

PROBE = (
    "id -u; id -g; id -G; pwd; echo $HOME; touch /tmp/t && echo tmp-ok;"
    " grep CapEff /proc/self/status; (touch ~/made && stat -c '%u:%g' ~/made) || echo denied"
)


async def _probe(rt, spec: SandboxSpec) -> list[str]:
    sid = f"t-{uuid.uuid4().hex[:16]}"
    await rt.create(sid, spec)
    try:
        h = await rt.start(sid)
        out = await h.exec(ExecRequest(command=PROBE))
        assert out.exit_code == 0, out
        return out.stdout.split("\n")
    finally:
        await rt.remove(sid)


@needs_bwrap
async def test_bwrap_runs_the_sandbox_as_the_images_user(bwrap):
    lines = await _probe(bwrap, SandboxSpec(image=oci("nonroot")))
    assert lines[:2] == ["1000", "1000"] and sorted(lines[2].split()) == ["1000", "50"]
    assert lines[3:6] == ["/home/agent", "/home/agent", "tmp-ok"]
    assert lines[6].split() == ["CapEff:", "0000000000000000"]
    assert lines[7] == "1000:1000"  # a file it makes is its own (inside the namespace)
    # the create's user wins over the image's; the image's WorkingDir stays
    spec = SandboxSpec(image=oci("nonroot"), user="nobody:staff")
    lines = await _probe(bwrap, spec)
    assert lines[:5] == ["65534", "50", "50", "/home/agent", "/"]
    assert lines[7] == "denied"  # nobody may not write to / (permissions hold)
    # an image without User runs as root, as before
    root = await _probe(bwrap, SandboxSpec(image=oci("nopython")))
    assert root[:2] == ["0", "0"]


@needs_bwrap
async def test_unknown_user_is_a_conflict_and_leaves_nothing(bwrap):
    with pytest.raises(errors.Conflict, match="not in the image"):
        await bwrap.create("t-nouser", SandboxSpec(image=oci("nonroot"), user="mallory"))
    assert await bwrap.list() == []
    img = bwrap.images.lookup(oci("nonroot"))
    assert img is not None and img.user == "agent" and bwrap.images.in_use(img.id) == 0


# ---------------------------------------------------------------- commit


@needs_bwrap
async def test_commit_makes_an_image_usable_at_once(bwrap, registry):
    sid, h = await _started(bwrap, SandboxSpec(image=registry.ref("test/multilayer:v1")))
    await _sh(
        h,
        "echo new > /opt/made.txt && chmod 4711 /opt/made.txt && ln /opt/made.txt /opt/hl"
        " && rm /opt/layer3.txt && rm -r /opt/replaced && mkdir /opt/replaced"
        " && echo fresh > /opt/replaced/only.txt && ln -s made.txt /opt/sym",
    )
    ref = await bwrap.commit(sid, "local/committed", "v1")
    assert ref == "docker.io/local/committed:v1"
    img = bwrap.images.lookup("local/committed:v1")
    parent = bwrap.images.lookup(registry.ref("test/multilayer:v1"))
    assert img.layers[:-1] == parent.layers and img.env == parent.env
    assert img.labels["rock-serve.committed-from"] == parent.id
    top = bwrap.images.layer_dir(img.layers[-1])
    assert not os.path.exists(os.path.join(top, ".rock"))  # the rocklet's mount point
    await bwrap.remove(sid)
    # a new sandbox from it (the original is gone: the layers are the store's)
    sid2, h2 = await _started(bwrap, SandboxSpec(image="local/committed:v1"))
    out = await _sh(
        h2,
        "cat /opt/made.txt; stat -c '%a %h' /opt/made.txt; readlink /opt/sym; ls /opt/replaced;"
        " ls /opt/layer3.txt 2>&1 || true; pwd",
    )
    lines = out.split("\n")
    assert lines[:4] == ["new", "4711 2", "made.txt", "only.txt"]
    assert "No such file" in lines[4] and lines[5] == "/opt"
    await bwrap.remove(sid2)
    assert bwrap.images.in_use(img.id) == 0


@needs_bwrap
async def test_commit_push_then_pull_and_run_on_a_fresh_store(
    bwrap, private_registry, tmp_path, caplog
):
    caplog.set_level("DEBUG")
    sid, h = await _started(bwrap, SandboxSpec(image=oci("nopython")))
    await _sh(h, "echo pushed-marker > /root/marker; mkdir -p /opt/x && ln -s ../root /opt/x/r")
    committed = await bwrap.commit(sid, "local/pushme", "v1")
    await bwrap.remove(sid)
    dest = private_registry.ref(f"team/pushed:{uuid.uuid4().hex[:8]}")
    store = bwrap.images
    with pytest.raises(errors.RegistryUnauthorized):
        await store.push(committed, dest, RegistryAuth(username=AUTH[0], password="wrong"))
    with pytest.raises(errors.RegistryUnauthorized):
        await store.push(committed, dest)  # no credentials, never the node's own login
    with pytest.raises(errors.ImageNotFound):
        await store.push("local/never:v1", dest)
    good = RegistryAuth(username=AUTH[0], password=AUTH[1])
    digest = await store.push(committed, dest, good)
    assert digest.startswith("sha256:")
    assert AUTH[1] not in caplog.text
    assert [n for n in os.listdir(store.root + "/tmp") if n.startswith("push-")] == []
    # a fresh node: pull what was pushed (with credentials) and run it
    cfg = BwrapRuntimeConfig(
        state_dir=str(tmp_path / "state2"),
        cgroup_parent=TEST_CGROUP_PARENT,
        images=ImageStoreConfig(root=str(tmp_path / "fresh")),
    )
    fresh = cfg.build()
    try:
        sid2, h2 = await _started(fresh, SandboxSpec(image=dest, registry_auth=good))
        assert await _sh(h2, "cat /root/marker; readlink /opt/x/r") == "pushed-marker\n../root\n"
        img = fresh.images.lookup(dest)
        src = store.lookup(committed)
        assert img is not None and src is not None and len(img.layers) == len(src.layers)
        assert img.labels["rock-serve.committed-from"] == src.labels["rock-serve.committed-from"]
        await fresh.remove(sid2)
    finally:
        await fresh.close()


def _layer_digests(registry: Registry, name: str) -> list[str]:
    repo, tag = name.rsplit(":", 1)
    accept = (
        "application/vnd.oci.image.manifest.v1+json,"
        "application/vnd.docker.distribution.manifest.v2+json"
    )
    reply = httpx.get(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}", headers={"Accept": accept}
    )
    reply.raise_for_status()
    return [layer["digest"] for layer in reply.json()["layers"]]


async def test_push_sends_the_original_layer_blobs_when_the_store_keeps_them(tmp_path, registry):
    src = registry.ref("test/nopython:v1")
    original = await asyncio.to_thread(_layer_digests, registry, "test/nopython:v1")
    dest = f"pushed/kept:{uuid.uuid4().hex[:8]}"
    store = store_at(tmp_path / "kept", keep_layer_blobs=True)
    img = await store.get(src)
    blobs = tmp_path / "kept" / "blobs" / "sha256"
    assert sorted(os.listdir(blobs)) == sorted(d.split(":")[1] for d in set(original))
    kept = sum(os.path.getsize(blobs / n) for n in os.listdir(blobs))
    assert img.size > kept  # the kept blobs count against the budget
    # the pushed image's layers are the source's, digest for digest (a re-tar's never are:
    # member order, headers and gzip's output differ)
    await store.push(src, registry.ref(dest))
    assert await asyncio.to_thread(_layer_digests, registry, dest) == original
    again = store_at(tmp_path / "again")
    assert (await again.get(registry.ref(dest))).layers == img.layers
    # removing the image drops its kept blobs with its layers
    await store.remove(src)
    assert os.listdir(blobs) == []
    assert os.listdir(tmp_path / "kept" / "layers" / "sha256") == []


@needs_bwrap
async def test_commit_of_a_host_root_sandbox_is_refused(tmp_path):
    cfg = BwrapRuntimeConfig(
        state_dir=str(tmp_path / "state"), cgroup_parent=TEST_CGROUP_PARENT, images=None
    )
    rt = cfg.build()
    sid = f"t-{uuid.uuid4().hex[:16]}"
    await rt.create(sid, SandboxSpec())
    try:
        with pytest.raises(errors.InvalidRequest):
            await rt.commit(sid, "x/y", "v1")
    finally:
        await rt.remove(sid)
        await rt.close()


async def test_push_to_an_unreachable_registry_is_a_fast_typed_error(tmp_path):
    # Found by the fuzzer: skopeo waits for a registry that holds the connection without
    # answering until the whole transfer's timeout (30 min). The push asks /v2/ first, bounded.
    store = store_at(tmp_path / "store", registry_answer_timeout_seconds=0.5)
    src = oci("nopython")
    await store.get(src)
    with pytest.raises(errors.RegistryUnavailable) as closed:  # nothing listens there
        await store.push(src, f"127.0.0.1:{free_port()}/x/closed:v1")
    assert errors.http_status(closed.value.code) == 502 and closed.value.retry_after
    with SilentRegistry() as silent:
        pushing = asyncio.ensure_future(store.push(src, silent.ref("x/silent:v1")))
        await async_wait_until(lambda: silent.accepted, what="the push to reach the registry")
        with pytest.raises(errors.RegistryUnavailable, match="does not answer") as held:
            await pushing
    assert "no answer in 0.5s" in held.value.message
    assert store.pushes == 0
    assert [n for n in os.listdir(store.root + "/tmp") if n.startswith("push-")] == []
