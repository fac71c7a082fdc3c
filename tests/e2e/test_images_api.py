"""Images through the platform (Ray Serve, bwrap): prepull, list, create from a private
registry with per-create credentials, remove; the CLI's ``rock image``; typed errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rock_serve import errors
from rock_serve.protocol import CreateSandboxRequest, RegistryAuth
from rock_serve.sdk import Client
from tests._registry import Registry, SilentRegistry, oci, registry_skip_reason
from tests._wait import wait_until
from tests.unit.test_image_ref_backtracking import FUZZED

_SKIP = registry_skip_reason()
pytestmark = [pytest.mark.ray, pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))]

USER, PASSWORD = "bob", "pw-" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry"), auth=(USER, PASSWORD)).start()
    try:
        yield reg
    finally:
        reg.stop()


def _rock(url: str, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rock_serve.sdk.cli", *args],
        env={**os.environ, "ROCK_BASE_URL": url, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def test_prepull_list_create_and_remove(bwrap_platform, registry):
    ref = registry.push(oci("nopython"), f"private/np:{uuid.uuid4().hex[:8]}")
    url = bwrap_platform.url
    # prepull over REST (NDJSON progress), with credentials
    with Client(url) as client:
        events = list(
            client.pull_images([ref], auth=RegistryAuth(username=USER, password=PASSWORD))
        )
        assert events[-1].phase == "done", events
        assert events[-1].node and events[-1].digest and events[-1].size_bytes
        listed = client.list_images()
        mine = [i for i in listed.images if ref in i.refs]
        assert len(mine) == 1 and mine[0].id == events[-1].digest
        assert listed.disk_bytes[mine[0].node] >= mine[0].size_bytes
        # a create with the same image: already on the node, its own python is absent
        rec = client.create_sandbox(
            image=ref, registry_auth=RegistryAuth(username=USER, password=PASSWORD)
        )
        try:
            out = client.exec(rec.id, "cat /etc/os-release; ls /usr/lib")
            assert "rock-nopython" in out.stdout
            raw = client._http.get(f"/v1/sandboxes/{rec.id}").text
            assert PASSWORD not in raw and ref in raw
            in_use = [i for i in client.list_images().images if ref in i.refs]
            assert in_use[0].in_use == 1
            with pytest.raises(errors.Conflict):
                client.remove_image(ref)
        finally:
            client.delete_sandbox(rec.id)
    # the CLI: ls shows it, rm removes it, ls no longer does
    assert ref in _rock(url, "image", "ls").stdout
    _rock(url, "image", "rm", ref)
    assert ref not in _rock(url, "image", "ls").stdout
    missing = _rock(url, "image", "rm", ref, check=False)
    assert missing.returncode == 1 and "image_not_found" in missing.stderr
    # CLI pull: the password from the environment, never argv
    pulled = _rock(url, "image", "pull", ref, "--username", USER, ROCK_REGISTRY_PASSWORD=PASSWORD)
    assert "done sha256:" in pulled.stdout
    refused = _rock(
        url, "image", "pull", ref, "--username", USER, check=False, ROCK_REGISTRY_PASSWORD="x"
    )
    # already held: a prepull checks the registry again, which refuses the bad password
    assert refused.returncode == 1 and "registry_unauthorized" in refused.stderr
    _rock(url, "image", "rm", ref)


def test_create_errors_are_typed(bwrap_platform, registry):
    ref = registry.push(oci("nopython"), "private/err:v1")
    with Client(bwrap_platform.url) as client:
        # not retried: tests/integration/test_images.py counts the store's skopeo runs
        with pytest.raises(errors.ImageNotFound):
            client.create_sandbox(
                image=registry.ref("private/none:v1"),
                registry_auth=RegistryAuth(username=USER, password=PASSWORD),
            )
        with pytest.raises(errors.RegistryUnauthorized):
            client.create_sandbox(image=ref)
        with pytest.raises(errors.RegistryUnauthorized):
            client.create_sandbox(
                image=ref, registry_auth=RegistryAuth(username=USER, password="nope")
            )
        assert client.list_sandboxes() == []


BAD = "Bad Ref!"


def test_malformed_references_are_422_everywhere(bwrap_platform):
    """A malformed image reference is 422 ``invalid_image_reference`` on every route that takes
    one (the schema documents it there), a typed exception in the SDK (built client side or
    answered by the server), on the CLI and over the Ray transport's gate."""
    url = bwrap_platform.url
    with Client(url) as client:
        for method, path, body, where in [
            ("POST", "/v1/sandboxes", {"image": BAD}, "body.image"),
            ("POST", "/v1/images/pull", {"images": ["busybox", BAD]}, "body.images.1"),
            ("POST", "/v1/images/push", {"image": BAD, "destination": "a/b:c"}, "body.image"),
            ("POST", "/v1/images/push", {"image": "a/b:c", "destination": BAD}, "body.dest"),
            # the fuzzer's: once minutes of regex backtracking in the Admin's event loop
            # (tests/unit/test_image_ref_backtracking.py)
            ("POST", "/v1/images/push", {"image": FUZZED, "destination": "a/b:c"}, "body.image"),
            ("POST", "/v1/sandboxes/sb-x/commit", {"image": "UPPER/case"}, "body.image"),
            ("DELETE", "/v1/images/Bad%20Ref!", None, "path.ref"),
        ]:
            resp = client._http.request(method, path, json=body)
            assert resp.status_code == 422, (path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_image_reference", resp.text
            assert where in resp.json()["error"]["message"], resp.text
        # any other schema violation stays 400 invalid_request
        resp = client._http.post("/v1/sandboxes", json={"image": 5})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
        schema = client._http.get("/openapi.json").json()["paths"]
        for path, method in [
            ("/v1/sandboxes", "post"),
            ("/v1/images/pull", "post"),
            ("/v1/images/push", "post"),
            ("/v1/images/{ref}", "delete"),
            ("/v1/sandboxes/{sandbox_id}/commit", "post"),
        ]:
            documented = schema[path][method]["responses"]["422"]
            assert documented["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorBody"
            ), documented
        # the SDK: typed whether it refuses the request itself or the server does
        with pytest.raises(errors.InvalidImageReference):
            client.create_sandbox(image=BAD)
        with pytest.raises(errors.InvalidImageReference):  # model_copy: the server refuses
            client.create_sandbox(CreateSandboxRequest(), image=BAD)
        with pytest.raises(errors.InvalidImageReference):
            list(client.pull_images(["busybox", BAD]))
        with pytest.raises(errors.InvalidImageReference):
            client.push_image("a/b:c", BAD)
        with pytest.raises(errors.InvalidImageReference):
            client.remove_image(BAD)
        with pytest.raises(errors.InvalidImageReference):
            client.commit_sandbox("sb-x", "UPPER/case")
        assert client.list_sandboxes() == []
    # the CLI prints the code
    for argv in (["image", "rm", BAD], ["sandbox", "create", "--image", BAD]):
        refused = _rock(url, *argv, check=False)
        assert refused.returncode == 1 and "invalid_image_reference" in refused.stderr, refused
    # the Ray transport: the gate checks a request that skipped its validators (model_copy)
    from rock_serve.deployments.client import RayClient

    with RayClient("rock-e2e-bwrap") as ray_client:
        with pytest.raises(errors.InvalidImageReference):
            ray_client.create_sandbox(CreateSandboxRequest(), image=BAD)
        with pytest.raises(errors.InvalidImageReference):
            ray_client.create_sandbox(image=BAD)
        assert ray_client.list_sandboxes() == []


def test_commit_over_rest_then_create_from_it(bwrap_platform):
    ref = f"e2e/committed:{uuid.uuid4().hex[:8]}"
    with Client(bwrap_platform.url) as client:
        rec = client.create_sandbox()
        try:
            client.exec(rec.id, "echo from-commit > /root/marker")
            result = client.commit_sandbox(rec.id, ref)
            assert result.image == f"docker.io/{ref}" and result.node == rec.worker
        finally:
            client.delete_sandbox(rec.id)
        child = client.create_sandbox(image=ref)
        try:
            assert child.worker == rec.worker  # only that node holds it
            assert client.exec(child.id, "cat /root/marker").stdout == "from-commit\n"
        finally:
            client.delete_sandbox(child.id)
        client.remove_image(ref)
        resp = client._http.post(f"/v1/sandboxes/{rec.id}/commit", json={"image": "x:y"})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "sandbox_not_found"


def test_commit_push_over_the_cli_then_create_from_the_registry(bwrap_platform, registry):
    base = registry.push(oci("nopython"), f"private/base:{uuid.uuid4().hex[:8]}")
    auth = RegistryAuth(username=USER, password=PASSWORD)
    committed = f"e2e/pushme:{uuid.uuid4().hex[:8]}"
    dest = registry.ref(f"private/pushed:{uuid.uuid4().hex[:8]}")
    url = bwrap_platform.url
    with Client(url) as client:
        rec = client.create_sandbox(image=base, registry_auth=auth)
        try:
            client.exec(rec.id, "echo via-registry > /root/marker")
            client.commit_sandbox(rec.id, committed)
        finally:
            client.delete_sandbox(rec.id)
        # the CLI: the password from the environment only; a wrong one is typed
        wrong = _rock(
            url, "image", "push", committed, dest, "--username", USER,
            check=False, ROCK_REGISTRY_PASSWORD="nope",
        )  # fmt: skip
        assert wrong.returncode == 1 and "registry_unauthorized" in wrong.stderr
        done = _rock(
            url, "image", "push", committed, dest, "--username", USER,
            ROCK_REGISTRY_PASSWORD=PASSWORD,
        )  # fmt: skip
        assert f"pushed {dest}@sha256:" in done.stdout and PASSWORD not in done.stdout
        # gone from the store: a create must pull it back from the registry
        client.remove_image(committed)
        child = client.create_sandbox(image=dest, registry_auth=auth)
        try:
            assert client.exec(child.id, "cat /root/marker").stdout == "via-registry\n"
        finally:
            client.delete_sandbox(child.id)
        for ref in (dest, base):
            client.remove_image(ref)


def test_a_push_to_a_registry_that_does_not_answer_never_holds_up_listing(bwrap_platform):
    # Found by the fuzzer: such a push held its request for the whole transfer timeout and
    # GET /v1/images waited behind it. Now: the listing answers while the push waits on the
    # registry; once the registry goes away the push is 502 registry_unavailable (a registry
    # that stays silent: tests/integration/test_images.py, the bounded wait).
    ref = oci("nopython")
    with Client(bwrap_platform.url) as client:
        assert list(client.pull_images([ref]))[-1].phase == "done"
    with (
        SilentRegistry() as silent,
        httpx.Client(base_url=bwrap_platform.url, timeout=120) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        body = {"image": ref, "destination": silent.ref("held/img:v1")}
        pushing = pool.submit(http.post, "/v1/images/push", json=body)
        wait_until(lambda: silent.accepted, what="the push to reach the registry")
        listed = http.get("/v1/images")
        assert listed.status_code == 200 and any(ref in i["refs"] for i in listed.json()["images"])
        assert not pushing.done()  # the listing did not wait for the push
        silent.release()
        resp = pushing.result(timeout=120)
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "registry_unavailable"
