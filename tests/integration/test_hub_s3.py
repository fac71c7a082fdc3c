"""The EnvHub's S3 store against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rock_serve.envs.hub import (
    ArtifactCorrupt,
    AsyncEnvHub,
    EnvHub,
    HubConfig,
    S3ArtifactStore,
    S3StoreConfig,
)
from rock_serve.errors import InvalidConfig, NotFound, RuntimeUnavailable
from tests._s3 import use_test_credentials

pytestmark = pytest.mark.s3

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

SPEC = {"name": "acme/Echo-v0", "entry_point": "acme.envs:Echo"}


@pytest.fixture(autouse=True)
def _credentials(monkeypatch):
    use_test_credentials(monkeypatch)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"envhub-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_config(s3_endpoint, bucket) -> S3StoreConfig:
    return S3StoreConfig(bucket=bucket, prefix="hub/test", endpoint_url=s3_endpoint)


@pytest.fixture
def hub(tmp_path, s3_config) -> Iterator[EnvHub]:
    with EnvHub(HubConfig(home=str(tmp_path / "home"), store=s3_config)) as h:
        yield h


def _keys(endpoint: str, bucket: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_store_round_trip(s3_config, s3_endpoint, bucket):
    store = S3ArtifactStore(s3_config)
    data = b"bundle bytes" * 1000
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert _keys(s3_endpoint, bucket) == [f"hub/test/sha256/{sha}"]
    assert store.exists(sha)
    assert store.read_bytes(sha) == data
    assert store.put_bytes(data) == sha  # present: not uploaded again
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(NotFound):
        store.read_bytes(sha)
    store.close()


def test_hub_on_s3_push_fetch_delete(hub, s3_endpoint, bucket, tmp_path):
    record = hub.push(SPEC, bundle=_tree(tmp_path / "t", {"task.json": '{"n": 1}'}))
    assert _keys(s3_endpoint, bucket) == [f"hub/test/sha256/{record.bundle_sha256}"]
    path = hub.fetch_bundle("acme/Echo-v0")
    assert path is not None and (path / "task.json").read_text() == '{"n": 1}'
    hub.push({**SPEC, "version": "2"}, bundle=_tree(tmp_path / "u", {"task.json": "{}"}))
    assert len(_keys(s3_endpoint, bucket)) == 2
    hub.delete("acme/Echo-v0", "1")
    assert len(_keys(s3_endpoint, bucket)) == 1
    hub.delete("acme/Echo-v0")
    assert _keys(s3_endpoint, bucket) == []


def test_integrity_failure_on_download(hub, s3_endpoint, bucket, tmp_path):
    record = hub.push(SPEC, bundle=_tree(tmp_path / "t", {"x": "1"}))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key=f"hub/test/sha256/{record.bundle_sha256}", Body=b"evil")
    with pytest.raises(ArtifactCorrupt) as info:
        hub.fetch_bundle("acme/Echo-v0")
    assert info.value.details == {"expected": record.bundle_sha256, "actual": _sha(b"evil")}
    # Nothing half-written is left in the cache.
    assert not (hub.cache / "bundles" / record.bundle_sha256).exists()


def test_presigned_get_url(hub, tmp_path):
    record = hub.push(SPEC, bundle=_tree(tmp_path / "t", {"x": "1"}))
    url = hub.bundle_url("acme/Echo-v0", expires=60)
    assert url is not None and "X-Amz-Signature" in url
    body = httpx.get(url).content  # no credentials: the URL itself authorises
    assert _sha(body) == record.bundle_sha256


def test_presigned_put_then_push_by_digest(hub, s3_endpoint, bucket, tmp_path):
    from rock_serve.envs.hub import pack_bundle

    archive = tmp_path / "b.tgz"
    sha, _ = pack_bundle(_tree(tmp_path / "t", {"data.txt": "uploaded directly"}), archive)
    url = hub.upload_url(sha, content_type="application/gzip")
    reply = httpx.put(
        url, content=archive.read_bytes(), headers={"Content-Type": "application/gzip"}
    )
    assert reply.status_code == 200, reply.text
    record = hub.push(SPEC, bundle_sha256=sha)
    assert record.bundle_sha256 == sha and record.bundle_size is None
    assert (hub.fetch_bundle(record) / "data.txt").read_text() == "uploaded directly"

    # A client that uploads other bytes under the digest is caught when they are fetched.
    bad = "f" * 64
    reply = httpx.put(
        hub.upload_url(bad),
        content=archive.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply.status_code == 200
    hub.push({**SPEC, "version": "2"}, bundle_sha256=bad)
    with pytest.raises(ArtifactCorrupt):
        hub.fetch_bundle("acme/Echo-v0", "2")


def test_missing_bucket_and_unreachable_endpoint(tmp_path, s3_endpoint):
    store = S3ArtifactStore(S3StoreConfig(bucket="no-such-bucket-here", endpoint_url=s3_endpoint))
    with pytest.raises(InvalidConfig):
        store.put_bytes(b"x")
    dead = S3ArtifactStore(S3StoreConfig(bucket="whatever", endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(RuntimeUnavailable):
        dead.exists("0" * 64)


def test_async_hub_on_s3(tmp_path, s3_config):
    tree = _tree(tmp_path / "t", {"x": "1"})

    async def scenario() -> None:
        config = HubConfig(home=str(tmp_path / "home"), store=s3_config)
        async with AsyncEnvHub(config) as hub:
            records = await asyncio.gather(
                *(hub.push({**SPEC, "version": str(i)}, bundle=tree) for i in range(4))
            )
            assert len({r.bundle_sha256 for r in records}) == 1
            path = await hub.fetch_bundle("acme/Echo-v0")
            assert path is not None and (path / "x").read_text() == "1"
            url = await hub.bundle_url("acme/Echo-v0")
            async with httpx.AsyncClient() as http:
                assert _sha((await http.get(url)).content) == records[0].bundle_sha256
            await hub.delete("acme/Echo-v0")

    asyncio.run(scenario())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
