"""The EnvHub on real SQLite and the local artifact store (no Ray, no network)."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
from pathlib import Path

import pytest

import rock_serve.envs.hub as hub_pkg
from rock_serve.envs.hub import (
    ArtifactCorrupt,
    AsyncEnvHub,
    EnvHub,
    HubConfig,
    LocalArtifactStore,
    LocalStoreConfig,
    S3StoreConfig,
    default_home,
    pack_bundle,
    sha256_file,
    unpack_bundle,
)
from rock_serve.errors import Conflict, InvalidConfig, InvalidRequest, NotFound

SPEC = {"name": "acme/Echo-v0", "entry_point": "acme.envs:Echo", "description": "echo"}


@pytest.fixture
def config(tmp_path: Path) -> HubConfig:
    return HubConfig(home=str(tmp_path / "home"))


@pytest.fixture
def hub(config: HubConfig):
    with EnvHub(config) as h:
        yield h


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _artifacts(config: HubConfig) -> list[Path]:
    return sorted(p for p in config.local_root().rglob("*") if p.is_file())


def test_exported_members():
    assert set(hub_pkg.__all__) == {
        "ArtifactCorrupt",
        "ArtifactStore",
        "AsyncEnvHub",
        "EnvHub",
        "EnvRecord",
        "HubConfig",
        "HubEnvSpec",
        "LocalArtifactStore",
        "LocalStoreConfig",
        "S3ArtifactStore",
        "S3StoreConfig",
        "build_store",
        "default_home",
        "pack_bundle",
        "parse_hub_config",
        "parse_spec",
        "sha256_file",
        "unpack_bundle",
    }
    for name in hub_pkg.__all__:
        assert hasattr(hub_pkg, name)


def test_config_defaults_and_environment(tmp_path):
    assert default_home({"ROCK_HOME": "/x/rock"}) == Path("/x/rock")
    assert default_home({"XDG_DATA_HOME": "/xdg"}) == Path("/xdg/rock-serve")
    assert default_home({}) == Path.home() / ".local/share/rock-serve"

    cfg = HubConfig.from_env({"ROCK_HOME": str(tmp_path)})
    assert cfg.db_file() == tmp_path / "envhub.sqlite3"
    assert cfg.local_root() == tmp_path / "artifacts"
    assert cfg.cache_path() == tmp_path / "cache" / "envhub"
    assert isinstance(cfg.store, LocalStoreConfig)

    s3 = HubConfig.from_env(
        {
            "ROCK_HUB_S3_BUCKET": "bundles",
            "ROCK_HUB_S3_PREFIX": "p",
            "ROCK_HUB_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "ROCK_HUB_S3_REGION": "us-east-1",
            "ROCK_HUB_DB": str(tmp_path / "x.db"),
        }
    )
    assert s3.store == S3StoreConfig(
        bucket="bundles", prefix="p", endpoint_url="http://127.0.0.1:9", region="us-east-1"
    )
    assert s3.db_file() == tmp_path / "x.db"
    with pytest.raises(InvalidConfig):
        HubConfig.from_env({"ROCK_HUB_S3_BUCKET": "b"})  # too short a bucket name


def test_push_get_list_versions(hub):
    first = hub.push(SPEC)
    assert (first.name, first.version, first.bundle_sha256) == ("acme/Echo-v0", "1", None)
    assert first.registry_id == "acme/Echo-v0:1"
    second = hub.push({**SPEC, "version": "2", "kwargs": {"n": 3}, "max_episode_steps": 8})
    hub.push({**SPEC, "name": "acme/Other-v0"})

    assert hub.get("acme/Echo-v0") == second  # the latest is the last pushed
    assert hub.get("acme/Echo-v0", "1") == first
    assert [r.version for r in hub.versions("acme/Echo-v0")] == ["2", "1"]
    assert [(r.name, r.version) for r in hub.list()] == [
        ("acme/Echo-v0", "2"),
        ("acme/Other-v0", "1"),
    ]
    assert len(hub.list(all_versions=True)) == 3
    # "Latest" is push order, not the label's order.
    hub.push({**SPEC, "version": "0.9"})
    assert hub.get("acme/Echo-v0").version == "0.9"
    assert second.spec().model_dump()["kwargs"] == {"n": 3}


def test_push_same_version_is_idempotent_or_conflict(hub):
    stored = hub.push(SPEC)
    assert hub.push(SPEC) == stored  # same content: no-op, same record
    with pytest.raises(Conflict):
        hub.push({**SPEC, "description": "changed"})
    replaced = hub.push({**SPEC, "description": "changed"}, replace=True)
    assert hub.get("acme/Echo-v0").description == "changed" == replaced.description
    assert len(hub.versions("acme/Echo-v0")) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {**SPEC, "name": "../etc"},
        {**SPEC, "entry_point": "no-colon"},
        {**SPEC, "version": "a b"},
        {**SPEC, "unknown": 1},
        {"name": "x"},
    ],
)
def test_bad_specs_are_invalid_requests(hub, bad):
    with pytest.raises(InvalidRequest):
        hub.push(bad)


def test_missing_things_are_not_found(hub):
    with pytest.raises(NotFound):
        hub.get("nope")
    hub.push(SPEC)
    with pytest.raises(NotFound):
        hub.get("acme/Echo-v0", "9")
    with pytest.raises(NotFound):
        hub.versions("nope")
    with pytest.raises(NotFound):
        hub.delete("acme/Echo-v0", "9")
    with pytest.raises(NotFound):
        hub.push(SPEC | {"version": "3"}, bundle_sha256="0" * 64)
    with pytest.raises(InvalidRequest):
        hub.push(SPEC | {"version": "3"}, bundle_sha256="not-a-digest")
    assert hub.fetch_bundle("acme/Echo-v0") is None
    assert hub.bundle_url("acme/Echo-v0") is None


def test_bundles_are_content_addressed_and_fetched_into_the_cache(hub, config, tmp_path):
    tree = _tree(tmp_path / "tasks", {"a.txt": "alpha\n", "sub/b.txt": "beta\n"})
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    v1 = hub.push(SPEC, bundle=tree)
    assert v1.bundle_sha256 is not None and v1.bundle_size and v1.bundle_size > 0
    # The same tree in another place packs to the same digest: one artifact for both.
    copy = _tree(tmp_path / "copy", {"a.txt": "alpha\n", "sub/b.txt": "beta\n"})
    (copy / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (copy / "run.sh").chmod(0o755)
    v2 = hub.push({**SPEC, "version": "2"}, bundle=copy)
    assert v2.bundle_sha256 == v1.bundle_sha256
    assert len(_artifacts(config)) == 1

    local = hub.fetch_bundle("acme/Echo-v0")
    assert local is not None and local.parent.parent == config.cache_path()
    assert (local / "a.txt").read_text() == "alpha\n"
    assert (local / "sub" / "b.txt").read_text() == "beta\n"
    assert (local / "run.sh").stat().st_mode & 0o111
    assert hub.fetch_bundle("acme/Echo-v0", "1") == local  # cached: no second unpack
    assert hub.bundle_url("acme/Echo-v0").startswith("file://")


def test_a_tarball_bundle_is_stored_as_is(hub, tmp_path):
    archive = tmp_path / "tasks.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"payload\n"
        info = tarfile.TarInfo("task.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    record = hub.push(SPEC, bundle=archive)
    assert record.bundle_sha256 == sha256_file(archive)[0]
    assert (hub.fetch_bundle("acme/Echo-v0") / "task.txt").read_bytes() == b"payload\n"
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("hello")
    with pytest.raises(InvalidRequest):
        hub.push({**SPEC, "version": "2"}, bundle=not_tar)
    with pytest.raises(InvalidRequest):
        hub.push({**SPEC, "version": "2"}, bundle=tmp_path / "missing")


def test_delete_removes_metadata_and_only_unreferenced_bundles(hub, config, tmp_path):
    shared = _tree(tmp_path / "shared", {"x": "1"})
    own = _tree(tmp_path / "own", {"y": "2"})
    hub.push(SPEC, bundle=shared)
    hub.push({**SPEC, "version": "2"}, bundle=own)
    hub.push({**SPEC, "name": "acme/Other-v0"}, bundle=shared)
    assert len(_artifacts(config)) == 2

    removed = hub.delete("acme/Echo-v0", "2")
    assert [r.version for r in removed] == ["2"]
    assert len(_artifacts(config)) == 1  # "own" went; "shared" is still used
    assert hub.get("acme/Echo-v0").version == "1"

    hub.delete("acme/Echo-v0")
    assert len(_artifacts(config)) == 1  # still used by acme/Other-v0
    with pytest.raises(NotFound):
        hub.get("acme/Echo-v0")
    hub.delete("acme/Other-v0")
    assert _artifacts(config) == []
    assert hub.list() == []


def test_replacing_a_version_collects_its_old_bundle(hub, config, tmp_path):
    hub.push(SPEC, bundle=_tree(tmp_path / "a", {"x": "1"}))
    hub.push(SPEC, bundle=_tree(tmp_path / "b", {"x": "2"}), replace=True)
    assert len(_artifacts(config)) == 1
    assert (hub.fetch_bundle("acme/Echo-v0") / "x").read_text() == "2"


def test_a_corrupt_local_artifact_is_detected(hub, config, tmp_path):
    record = hub.push(SPEC, bundle=_tree(tmp_path / "t", {"x": "1"}))
    (blob,) = _artifacts(config)
    blob.write_bytes(b"tampered")
    with pytest.raises(ArtifactCorrupt) as info:
        hub.fetch_bundle("acme/Echo-v0")
    assert info.value.details["expected"] == record.bundle_sha256
    assert not (config.cache_path() / "bundles" / record.bundle_sha256).exists()
    blob.unlink()
    with pytest.raises(NotFound):
        hub.fetch_bundle("acme/Echo-v0")


def test_pack_is_deterministic_and_unpack_refuses_escapes(tmp_path):
    tree = _tree(tmp_path / "t", {"b": "2", "a/c": "3"})
    one = pack_bundle(tree, tmp_path / "one.tgz")
    (tree / "b").touch()  # a new mtime changes nothing
    two = pack_bundle(tree, tmp_path / "two.tgz")
    assert one == two

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(InvalidRequest):
        unpack_bundle(evil, tmp_path / "out1")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc"
        tar.addfile(info)
    with pytest.raises(InvalidRequest):
        unpack_bundle(link, tmp_path / "out2")
    assert not (tmp_path / "outside.txt").exists()


def test_local_store_basics(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    sha = store.put_bytes(b"hello")
    assert store.exists(sha)
    assert store.read_bytes(sha) == b"hello"
    assert store.put_bytes(b"hello") == sha  # idempotent
    store.delete(sha)
    store.delete(sha)  # missing is fine
    assert not store.exists(sha)
    with pytest.raises(NotFound):
        store.url(sha)
    with pytest.raises(InvalidRequest):
        store.exists("../../etc/passwd")


def test_concurrent_pushes_from_threads(hub):
    errors: list[BaseException] = []

    def push(i: int) -> None:
        try:
            hub.push({**SPEC, "version": str(i)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(hub.versions("acme/Echo-v0")) == 16


def test_metadata_survives_reopening(config):
    with EnvHub(config) as hub:
        hub.push(SPEC)
    with EnvHub(config) as hub:
        assert hub.get("acme/Echo-v0").entry_point == "acme.envs:Echo"


def test_upload_urls_need_s3(hub):
    with pytest.raises(InvalidRequest):
        hub.upload_url("0" * 64)


def test_async_hub_runs_off_the_loop(config, tmp_path):
    tree = _tree(tmp_path / "t", {"x": "1"})

    async def scenario() -> None:
        async with AsyncEnvHub(config) as hub:
            loop_thread = threading.get_ident()
            record = await hub.push(SPEC, bundle=tree)
            assert (await hub.get("acme/Echo-v0")) == record
            assert [r.name for r in await hub.list()] == ["acme/Echo-v0"]
            assert len(await hub.versions("acme/Echo-v0")) == 1
            path = await hub.fetch_bundle("acme/Echo-v0")
            assert path is not None and (path / "x").read_text() == "1"
            assert (await hub.bundle_url("acme/Echo-v0")).startswith("file://")
            results = await asyncio.gather(
                *(hub.push({**SPEC, "version": f"v{i}"}) for i in range(8))
            )
            assert len({r.version for r in results}) == 8
            await hub.delete("acme/Echo-v0")
            with pytest.raises(NotFound):
                await hub.get("acme/Echo-v0")
            assert threading.get_ident() == loop_thread

    asyncio.run(scenario())
