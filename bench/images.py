"""Images on the bwrap runtime, all in one run (p50 / p99 in ms unless said otherwise).

    .venv/bin/python bench/images.py            # everything (about 5 minutes on 2 cores)
    .venv/bin/python bench/images.py --quick    # fewer samples, 20 concurrent creates, no REST

1. create -> first command (``exec echo hi``) from a cached image at the Worker (the Worker
   class in-process on the bwrap runtime: create + start + exec), from a per-image warm pool
   at the Worker, over REST (Serve proxy + Admin + Scheduler + Worker), and on the docker
   runtime with the same image (same registry) for comparison.
2. Cold pull of the multi-layer Debian image (~160 MB unpacked) from a loopback registry
   (docker-registry): our store (skopeo + unpack) vs ``docker pull`` of the same image.
3. N concurrent creates (+ first command) of one uncached image: pulls done, wall time, errors.
4. Disk: 20 task images sharing the Debian base: bytes on disk vs the sum of image sizes.
5. Idle memory per sandbox (its cgroup's usage after start), image with python and without.

Needs root, bwrap, skopeo, umoci, docker-registry and the OCI test images
(scripts/build-test-images); docker parts are skipped (with a line) without a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import pct, platform  # noqa: E402
from rock_serve.config import (  # noqa: E402
    BwrapRuntimeConfig,
    ImageStoreConfig,
    ServerArgs,
)
from rock_serve.protocol import CreateSandboxRequest, ExecRequest, SandboxSpec  # noqa: E402
from rock_serve.protocol.ops import ExecOp
from rock_serve.runtime.images import ImageStore  # noqa: E402
from tests._registry import Registry, oci  # noqa: E402

CGROUP = "rock-serve-bench"
DOCKER = shutil.which("docker") or "/usr/bin/docker"


def row(name: str, xs: list[float], unit: str = "ms") -> str:
    return f"| {name} | {pct(xs, 50):.1f} / {pct(xs, 99):.1f} {unit} | n={len(xs)} |"


def new_id() -> str:
    return f"sb-bench-{uuid.uuid4().hex[:16]}"


#: Where the bench's own OCI layouts are (besides the test image cache).
SOURCES = ["/var/cache/rock-serve/", "/var/tmp/"]


def store_config(root: str) -> ImageStoreConfig:
    return ImageStoreConfig(root=root, local_sources=SOURCES)


def bwrap_config(state: str, store: str) -> BwrapRuntimeConfig:
    return BwrapRuntimeConfig(state_dir=state, cgroup_parent=CGROUP, images=store_config(store))


async def worker_latency(
    state: str, store: str, ref: str, n: int, pool: bool
) -> tuple[list[float], int]:
    """create -> first command at the Worker (in-process, bwrap); with ``pool``, from a
    per-image warm pool of ``n`` sandboxes filled first."""
    from rock_serve.deployments.worker import Worker

    runtime = bwrap_config(state, store).build()
    extra: dict[str, Any] = {"warm_pools": [{"image": ref, "size": n}]} if pool else {}
    args = ServerArgs.model_validate(
        {"runtime": {"type": "fake"}, "max_sandboxes_per_node": n + 4, **extra}
    )
    worker = Worker(args, "bench", "node-bench", runtime=runtime)
    await worker.ready()
    try:
        if pool:
            for _ in range(6000):
                if len(worker._warm) >= n:
                    break
                await asyncio.sleep(0.05)
        samples: list[float] = []
        hits = 0
        for i in range(n + (0 if pool else 3)):
            sid = f"sb-bench-{uuid.uuid4().hex[:12]}"
            t0 = time.perf_counter()
            rec = await worker.create(sid, CreateSandboxRequest(image=ref), ttl=600)
            out = await worker.op(rec.id, ExecOp.of(ExecRequest(command="echo hi")))
            dt = (time.perf_counter() - t0) * 1000
            assert out.stdout == "hi\n", out
            if pool or i >= 3:  # warm-up: the first creates load the agent and caches
                samples.append(dt)
            hits += rec.history[-1].reason == "warm_pool"
            if not pool:
                await worker.remove(rec.id)
        return samples, hits
    finally:
        await worker.shutdown()
        await runtime.close()


async def host_root_latency(state: str, n: int) -> list[float]:
    """The floor: create + start + exec on the bwrap runtime over the host's root."""
    rt = BwrapRuntimeConfig(state_dir=state, cgroup_parent=CGROUP, images=None).build()
    samples = []
    try:
        for i in range(n + 3):
            sid = new_id()
            t0 = time.perf_counter()
            await rt.create(sid, SandboxSpec())
            h = await rt.start(sid)
            out = await h.exec(ExecRequest(command="echo hi"))
            dt = (time.perf_counter() - t0) * 1000
            assert out.stdout == "hi\n"
            if i >= 3:
                samples.append(dt)
            await rt.remove(sid)
    finally:
        await rt.close()
    return samples


async def docker_latency(ref: str, n: int, auth: Any) -> list[float] | str:
    """create -> first command on the docker runtime with the same image."""
    from tests.contract.conftest import docker_config, docker_unavailable

    reason = docker_unavailable()
    if reason is not None:
        return reason
    state = tempfile.mkdtemp(prefix="rock-bench-docker-")
    rt = docker_config(state, pull="if-missing").build()
    samples = []
    try:
        for i in range(n + 1):
            sid = new_id()
            t0 = time.perf_counter()
            await rt.create(sid, SandboxSpec(image=ref, registry_auth=auth))
            h = await rt.start(sid)
            out = await h.exec(ExecRequest(command="echo hi"))
            dt = (time.perf_counter() - t0) * 1000
            assert out.stdout == "hi\n"
            if i:
                samples.append(dt)
            await rt.remove(sid)
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)
    return samples


def docker_pull_seconds(ref: str) -> float | str:
    if not os.path.exists("/var/run/docker.sock"):
        return "no docker daemon"
    subprocess.run([DOCKER, "rmi", "-f", ref], capture_output=True, check=False)
    t0 = time.perf_counter()
    done = subprocess.run([DOCKER, "pull", "-q", ref], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    subprocess.run([DOCKER, "rmi", "-f", ref], capture_output=True, check=False)
    if done.returncode != 0:
        return f"docker pull failed: {done.stderr.strip()[-200:]}"
    return dt


async def concurrent_creates(state: str, store: str, ref: str, n: int) -> dict[str, Any]:
    rt = bwrap_config(state, store).build()
    errors = 0
    # All n creates wait on the one pull at once; starts are admitted 16 at a time, as the
    # Scheduler does per node (max_creates_in_flight_per_node).
    starts = asyncio.Semaphore(ServerArgs().max_creates_in_flight_per_node)

    async def one() -> str | None:
        nonlocal errors
        sid = new_id()
        try:
            await rt.create(sid, SandboxSpec(image=ref))
            async with starts:
                h = await rt.start(sid)
                out = await h.exec(ExecRequest(command="echo hi"))
            assert out.stdout == "hi\n"
            return sid
        except Exception as exc:  # counted, reported, cleaned up
            errors += 1
            print(f"  create failed: {exc!r}", file=sys.stderr)
            with contextlib.suppress(Exception):
                await rt.remove(sid)
            return None

    t0 = time.perf_counter()
    try:
        ids = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
        assert rt.images is not None
        pulls = rt.images.pull_count
    finally:
        for info in await rt.list():
            with contextlib.suppress(Exception):
                await rt.remove(info.id)
        await rt.close()
    del ids
    return {"wall_s": wall, "pulls": pulls, "errors": errors, "n": n}


async def idle_memory(state: str, store: str, ref: str) -> float:
    rt = bwrap_config(state, store).build()
    sid = new_id()
    try:
        await rt.create(sid, SandboxSpec(image=ref))
        h = await rt.start(sid)
        await h.exec(ExecRequest(command="true"))
        await asyncio.sleep(0.5)  # let the agent settle (not a correctness wait)
        stats = await h.stats()
        return (stats.memory_usage_bytes or 0) / 2**20
    finally:
        await rt.remove(sid)
        await rt.close()


def unique_image(work: Path, src_store: ImageStore, base_ref: str) -> str:
    """A ~160 MB three-layer image no daemon or store has seen (the Debian base's files split
    in two layers, each with a marker unique to this run, plus a small one): a fair cold pull.
    Returns its skopeo name."""
    base = src_store.lookup(base_ref)
    assert base is not None
    src = src_store.layer_dir(base.layers[0])
    marker = uuid.uuid4().hex
    layout = work / "unique"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:img"], check=True)
    top = sorted(os.listdir(src))
    parts = [["usr"], [t for t in top if t != "usr"]]
    for i, names in enumerate(parts):
        (work / f"m{i}").write_text(marker)
        tar = work / f"u{i}.tar"
        subprocess.run(["tar", "-C", src, "--numeric-owner", "-cf", str(tar), *names], check=True)
        subprocess.run(
            [
                "tar",
                "-C",
                str(work),
                "--transform",
                f"s,m{i},.bench-{marker}-{i},",
                "-rf",
                str(tar),
                f"m{i}",
            ],
            check=True,
        )
        subprocess.run(
            ["umoci", "raw", "add-layer", "--image", f"{layout}:img", str(tar)], check=True
        )
    extra = work / "extra"
    (extra / "bench").mkdir(parents=True)
    (extra / "bench" / "id").write_text(marker)
    subprocess.run(["tar", "-C", str(extra), "-cf", str(work / "u2.tar"), "bench"], check=True)
    subprocess.run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:img", str(work / "u2.tar")], check=True
    )
    subprocess.run(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:img",
            "--config.env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ],
        check=True,
    )
    return f"oci:{layout}:img"


def task_images(work: Path, n: int) -> list[str]:
    """``n`` task images over the bookworm base (one small layer each), in one OCI layout."""
    layout = work / "tasks"
    subprocess.run(["cp", "-a", oci("bookworm")[4:].rsplit(":", 1)[0], str(layout)], check=True)
    refs = []
    for i in range(n):
        files = work / f"task{i}"
        (files / "task").mkdir(parents=True)
        (files / "task" / "README").write_text(f"task {i}\n" * 100)
        (files / "task" / "data.bin").write_bytes(os.urandom(64 * 1024))
        tar = work / f"task{i}.tar"
        subprocess.run(["tar", "-C", str(files), "-cf", str(tar), "task"], check=True)
        subprocess.run(
            [
                "umoci",
                "raw",
                "add-layer",
                "--image",
                f"{layout}:bookworm",
                "--tag",
                f"t{i}",
                str(tar),
            ],
            check=True,
        )
        refs.append(f"oci:{layout}:t{i}")
    return refs


async def rest_latency(ref: str, n: int) -> list[float]:
    from rock_serve.sdk import AsyncClient

    state = tempfile.mkdtemp(prefix="rock-bench-rest-")
    runtime = {"type": "bwrap", "state_dir": state, "cgroup_parent": CGROUP}
    samples = []
    with platform({"/": {"runtime": runtime, "max_sandboxes_per_node": 8}}) as urls:
        async with AsyncClient(urls["/"]) as client:
            for i in range(n + 3):
                t0 = time.perf_counter()
                rec = await client.create_sandbox(image=ref)
                out = await client.exec(rec.id, "echo hi")
                dt = (time.perf_counter() - t0) * 1000
                assert out.stdout == "hi\n"
                if i >= 3:
                    samples.append(dt)
                await client.delete_sandbox(rec.id)
    shutil.rmtree(state, ignore_errors=True)
    return samples


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=None, help="samples per latency row")
    parser.add_argument("--concurrent", type=int, default=None)
    parser.add_argument("--no-rest", action="store_true")
    opts = parser.parse_args()
    n = opts.n or (10 if opts.quick else 30)
    many = opts.concurrent or (20 if opts.quick else 100)
    work = Path(tempfile.mkdtemp(prefix="rock-bench-images-", dir="/var/tmp"))
    reg = Registry(work / "registry").start()
    lines: list[str] = ["| what | p50 / p99 | notes |", "|---|---|---|"]
    try:
        np_ref = reg.push(oci("nopython"), "bench/nopython:v1")
        store = str(work / "store")
        source = ImageStore(store_config(str(work / "source")))
        await source.get(oci("bookworm"))
        ref = reg.push(unique_image(work, source, oci("bookworm")), "bench/unique:v1")

        # 2. cold pull: our store vs docker pull, same image, same registry
        t0 = time.perf_counter()
        img = await ImageStore(store_config(store)).get(ref)
        ours = time.perf_counter() - t0
        theirs = docker_pull_seconds(ref)
        size = img.size / 2**20
        if isinstance(theirs, float):
            lines.append(
                f"| cold pull, {size:.0f} MB in {len(img.layers)} layers | ours {ours:.2f} s, "
                f"docker pull {theirs:.2f} s | docker/ours = {theirs / ours:.2f}x |"
            )
        else:
            lines.append(f"| cold pull, {size:.0f} MB | ours {ours:.2f} s | docker: {theirs} |")

        # 1. create -> first command
        state = str(work / "state")
        cached, _ = await worker_latency(state, store, ref, n, pool=False)
        lines.append(row("create -> first command, cached image, at the Worker (bwrap)", cached))
        host = await host_root_latency(str(work / "state-host"), n)
        lines.append(row("floor: same at the runtime, host root (no image, no Worker)", host))
        lines.append(
            f"| cached image / host-root floor (p50) | {pct(cached, 50) / pct(host, 50):.2f}x "
            "| same run |"
        )
        pooled, hits = await worker_latency(state, store, ref, n, pool=True)
        lines.append(
            row(
                f"create -> first command, per-image warm pool, at the Worker ({hits} hits)", pooled
            )
        )
        no_py, _ = await worker_latency(state, store, np_ref, max(5, n // 3), pool=False)
        lines.append(row("create -> first command, image without python (node's)", no_py))
        docker = await docker_latency(ref, max(5, n // 3), None)
        if isinstance(docker, list):
            lines.append(row("create -> first command, docker runtime, same image", docker))
            lines.append(
                f"| docker / bwrap (p50) | {pct(docker, 50) / pct(cached, 50):.1f}x | same run |"
            )
        else:
            lines.append(f"| docker runtime | skipped | {docker} |")
        if not (opts.no_rest or opts.quick):
            rest = await rest_latency(ref, n)
            lines.append(row("create -> first command over REST (bwrap, cached image)", rest))

        # 3. concurrent creates of one uncached image
        fresh = reg.push(oci("multilayer"), f"bench/fresh-{uuid.uuid4().hex[:6]}:v1")
        result = await concurrent_creates(str(work / "state2"), str(work / "store2"), fresh, many)
        lines.append(
            f"| {result['n']} concurrent creates, uncached image | {result['wall_s']:.1f} s wall "
            f"| pulls={result['pulls']}, errors={result['errors']} |"
        )

        # 4. disk sharing
        refs = task_images(work, 20)
        disk_store = ImageStore(store_config(str(work / "store3")))
        images = [await disk_store.get(r) for r in refs]
        total = sum(i.size for i in images)
        on_disk = disk_store.disk_bytes()
        du = subprocess.run(
            ["du", "-sb", str(work / "store3" / "layers")], capture_output=True, text=True
        ).stdout.split()[0]
        lines.append(
            f"| disk, 20 task images on one base | {on_disk / 2**20:.0f} MB stored "
            f"(du {int(du) / 2**20:.0f} MB) | sum of image sizes {total / 2**20:.0f} MB, "
            f"{total / on_disk:.1f}x saved |"
        )

        # 5. idle memory
        with_py = await idle_memory(state, store, ref)
        without = await idle_memory(state, store, np_ref)
        lines.append(
            f"| idle memory per sandbox (cgroup) | {with_py:.1f} MiB (image python), "
            f"{without:.1f} MiB (node python) | after start + one exec |"
        )
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
