"""Snapshot archives through real S3 (moto server on loopback) between two simulated nodes
(issue 16 item 2, runtime level: no routes yet).

Node A and node B are two bwrap runtimes with state dirs of their own; the bytes move only
through S3 (``S3ArtifactStore``, boto3). A snapshot taken on A restores on B with A's files;
a corrupt object in S3 is refused by its digest and nothing is made on B; a corrupt local
archive gets the typed ``artifact_corrupt``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rock_serve.errors import http_status
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime._snapshot import SnapshotCorrupt, unpack_layer
from rock_serve.runtime.bwrap import BwrapRuntime
from tests._s3 import use_test_credentials
from tests.contract.conftest import RUNTIMES, make_config

pytestmark = [pytest.mark.s3, pytest.mark.bwrap, *RUNTIMES[1].marks]

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
hub = pytest.importorskip("rock_serve.envs.hub")


@pytest.fixture
def store(s3_endpoint, monkeypatch):
    use_test_credentials(monkeypatch)
    bucket = f"snap-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    config = hub.S3StoreConfig(
        bucket=bucket, prefix="rock-serve/snapshots", endpoint_url=s3_endpoint, region="us-east-1"
    )
    return hub.S3ArtifactStore(config), client, bucket


@pytest.fixture
async def nodes(tmp_path) -> AsyncIterator[tuple[BwrapRuntime, BwrapRuntime]]:
    made = []
    for name in ("a", "b"):
        rt = make_config("bwrap", str(tmp_path / f"node-{name}")).build()
        assert isinstance(rt, BwrapRuntime)
        made.append(rt)
    try:
        yield made[0], made[1]
    finally:
        for rt in made:
            for info in await rt.list():
                await rt.remove(info.id)
            await rt.close()


def _id() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


_HANDLES: dict[str, Any] = {}


async def _sh(rt: BwrapRuntime, sid: str, command: str) -> str:
    if sid not in _HANDLES:
        _HANDLES[sid] = await rt.start(sid)
    result = await _HANDLES[sid].exec(ExecRequest(command=command, timeout=60))
    assert result.exit_code == 0, result
    return result.stdout


async def test_snapshot_on_node_a_restores_on_node_b_through_s3(nodes, store, tmp_path):
    a, b = nodes
    s3, client, bucket = store
    src = _id()
    await a.create(src, SandboxSpec())
    digest = await _sh(
        a,
        src,
        "mkdir -p /work && head -c 3000000 /dev/urandom > /work/blob && rm -f /etc/motd "
        "&& chown 1000:1000 /work/blob && md5sum < /work/blob",
    )
    path, sha, size = await a.snapshot(src, str(tmp_path / "node-a-store"))
    assert os.path.basename(path).startswith(sha) and size > 0
    s3.put_file(Path(path), sha)

    fetched = tmp_path / "node-b-store" / sha
    fetched.parent.mkdir()
    s3.fetch(sha, fetched)  # digest-checked download
    restored = _id()
    await b.restore(restored, SandboxSpec(), str(fetched), sha)
    out = await _sh(b, restored, "md5sum < /work/blob; stat -c %u:%g /work/blob; ls /etc/motd || :")
    lines = out.splitlines()
    assert lines[0] == digest.strip()
    assert lines[1] == "1000:1000"  # owners survive the shift to B's own uid range
    assert "motd" not in out.split("\n", 2)[-1]  # a deletion (whiteout) survives too
    await _sh(b, restored, "echo b-only > /work/new")
    assert await _sh(a, src, "ls /work") == "blob\n"  # the nodes are independent

    # A corrupt object in S3: the download refuses it, and node B makes nothing.
    client.put_object(Bucket=bucket, Key=s3.key(sha), Body=b"not the snapshot")
    before = {i.id for i in await b.list()}
    with pytest.raises(hub.ArtifactCorrupt):
        s3.fetch(sha, tmp_path / "node-b-store" / "again")
    assert not (tmp_path / "node-b-store" / "again").exists()
    assert {i.id for i in await b.list()} == before


async def test_a_corrupt_archive_is_typed_and_leaves_nothing(nodes, tmp_path):
    a, b = nodes
    src = _id()
    await a.create(src, SandboxSpec())
    await _sh(a, src, "echo x > /root/x")
    path, sha, _ = await a.snapshot(src, str(tmp_path / "store"))
    with open(path, "r+b") as f:  # flip bytes in the middle
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(SnapshotCorrupt) as bad:
        await b.restore(_id(), SandboxSpec(), path, sha)
    assert bad.value.code.value == "artifact_corrupt" and http_status(bad.value.code) == 502
    assert await b.list() == []
    assert os.listdir(os.path.join(b.state_dir, ".frozen")) == []
    with pytest.raises(SnapshotCorrupt):  # a right digest of bytes that are no archive
        junk = tmp_path / "junk"
        junk.write_bytes(b"junk")
        from rock_serve.runtime._snapshot import sha256_of

        unpack_layer(str(junk), sha256_of(str(junk)), str(tmp_path / "layer"))
    assert not (tmp_path / "layer").exists()
