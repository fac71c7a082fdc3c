"""Fixtures that run the contract suite against every runtime this machine has.

``runtime`` is parametrized over ``local`` (always), ``bwrap`` (when bubblewrap, root and
writable cgroups are available), ``docker`` (when a daemon answers and the test image built
by ``scripts/build-test-image`` is there) and ``gvisor`` (docker's conditions, plus runsc
registered with the daemon by ``scripts/start-dockerd``); an unavailable runtime is skipped
with the reason, except docker under ``ROCK_REQUIRE_DOCKER=1`` and gvisor under
``ROCK_REQUIRE_GVISOR=1`` (CI), where it is an error. ``sandbox`` creates and
starts one sandbox, yields ``(runtime, sandbox_id, handle)`` and always removes it.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid

import pytest

from rock_serve.config import (
    DOCKER_TEST_IMAGE,
    BwrapRuntimeConfig,
    DockerRuntimeConfig,
    GvisorRuntimeConfig,
    LocalRuntimeConfig,
)
from rock_serve.protocol import SandboxSpec
from rock_serve.runtime._cgroup import CgroupLayout

#: Cgroup parent used by tests, apart from a production worker's ``rock-serve``.
TEST_CGROUP_PARENT = "rock-serve-test"


def bwrap_unavailable() -> str | None:
    """Why the bwrap runtime cannot run here, or None when it can."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if os.geteuid() != 0:
        return "the bwrap runtime needs root (overlay mounts, cgroups)"
    layout = CgroupLayout.detect()
    if layout is None:
        return "no usable cgroup hierarchy"
    if not all(os.access(m, os.W_OK) for m in layout.mounts.values()):
        return "cgroups are not writable"
    return None


_BWRAP_SKIP = bwrap_unavailable()

#: Set (CI does) to make an unavailable Docker engine or test image an error, not a skip.
REQUIRE_DOCKER = os.environ.get("ROCK_REQUIRE_DOCKER") == "1"


def docker_unavailable() -> str | None:
    """Why the docker runtime cannot run here, or None when it can."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install 'rock-serve[docker]')"
    from rock_serve.runtime._docker_stream import DockerAddress

    address = DockerAddress.parse(None)
    if address.path is not None:  # the SDK would leak a socket for a failed connect
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(address.path)
        except OSError as exc:
            return f"no Docker daemon answers at {address.url} ({exc}); run scripts/start-dockerd"
    try:
        client = docker.APIClient(version="auto", timeout=10)
    except docker.errors.DockerException as exc:
        return f"no Docker daemon answers ({exc}); run scripts/start-dockerd"
    try:
        client.inspect_image(DOCKER_TEST_IMAGE)
    except docker.errors.NotFound:
        return f"the test image {DOCKER_TEST_IMAGE} is missing; run scripts/build-test-image"
    except docker.errors.DockerException as exc:
        return f"the Docker daemon fails ({exc})"
    finally:
        client.close()
    return None


_DOCKER_SKIP = docker_unavailable()

#: Set (CI does) to make a missing runsc (or docker) for the gvisor runtime an error.
REQUIRE_GVISOR = os.environ.get("ROCK_REQUIRE_GVISOR") == "1"


def gvisor_unavailable() -> str | None:
    """Why the gvisor runtime cannot run here, or None when it can."""
    if _DOCKER_SKIP is not None:
        return _DOCKER_SKIP
    import docker

    wanted = GvisorRuntimeConfig.model_fields["oci_runtime"].default
    client = docker.APIClient(version="auto", timeout=10)
    try:
        runtimes = client.info().get("Runtimes") or {}
    except docker.errors.DockerException as exc:
        return f"the Docker daemon fails ({exc})"
    finally:
        client.close()
    if wanted not in runtimes:
        return f"the Docker daemon has no runtime {wanted!r}; run scripts/start-dockerd"
    return None


_GVISOR_SKIP = gvisor_unavailable()

RUNTIMES = [
    pytest.param("local", id="local"),
    pytest.param(
        "bwrap",
        id="bwrap",
        marks=[
            pytest.mark.bwrap,
            pytest.mark.skipif(_BWRAP_SKIP is not None, reason=str(_BWRAP_SKIP)),
        ],
    ),
    pytest.param(
        "docker",
        id="docker",
        marks=[
            pytest.mark.docker,
            pytest.mark.skipif(
                _DOCKER_SKIP is not None and not REQUIRE_DOCKER, reason=str(_DOCKER_SKIP)
            ),
        ],
    ),
    pytest.param(
        "gvisor",
        id="gvisor",
        marks=[
            pytest.mark.docker,
            pytest.mark.gvisor,
            pytest.mark.skipif(
                _GVISOR_SKIP is not None and not REQUIRE_GVISOR, reason=str(_GVISOR_SKIP)
            ),
        ],
    ),
]


def require_docker() -> None:
    """Fail (under ROCK_REQUIRE_DOCKER=1) or skip when the docker runtime cannot run here."""
    if _DOCKER_SKIP is not None:
        if REQUIRE_DOCKER:
            pytest.fail(f"ROCK_REQUIRE_DOCKER=1 but {_DOCKER_SKIP}", pytrace=False)
        pytest.skip(_DOCKER_SKIP)


def require_gvisor() -> None:
    """Fail (under ROCK_REQUIRE_GVISOR=1) or skip when the gvisor runtime cannot run here."""
    if _GVISOR_SKIP is not None:
        if REQUIRE_GVISOR:
            pytest.fail(f"ROCK_REQUIRE_GVISOR=1 but {_GVISOR_SKIP}", pytrace=False)
        pytest.skip(_GVISOR_SKIP)


def gvisor_config(state_dir: str, **kwargs) -> GvisorRuntimeConfig:
    """A gvisor runtime config of its own scope on the local test image (never pulled)."""
    fields = {
        "image": DOCKER_TEST_IMAGE,
        "pull": "never",
        "scope": f"t-{uuid.uuid4().hex[:12]}",
        "agent_dir": os.path.join(state_dir, "agent"),
        "stop_timeout_seconds": 1,
        **kwargs,
    }
    return GvisorRuntimeConfig.model_validate(fields)


def docker_config(state_dir: str, **kwargs) -> DockerRuntimeConfig:
    """A docker runtime config of its own scope (so parallel runs never see each other's
    containers) on the local test image, which is never pulled."""
    fields = {
        "image": DOCKER_TEST_IMAGE,
        "pull": "never",
        "scope": f"t-{uuid.uuid4().hex[:12]}",
        "agent_dir": os.path.join(state_dir, "agent"),
        "stop_timeout_seconds": 1,
        **kwargs,
    }
    return DockerRuntimeConfig.model_validate(fields)


def make_config(
    kind: str, state_dir: str
) -> LocalRuntimeConfig | BwrapRuntimeConfig | DockerRuntimeConfig | GvisorRuntimeConfig:
    """A runtime config of ``kind`` that keeps its state in ``state_dir``."""
    if kind == "local":
        return LocalRuntimeConfig(state_dir=state_dir)
    if kind == "bwrap":
        # Tests build rootfs trees next to the state dir (the state dir itself is refused).
        return BwrapRuntimeConfig(
            state_dir=state_dir,
            cgroup_parent=TEST_CGROUP_PARENT,
            rootfs_allow=[os.path.dirname(state_dir)],
        )
    if kind == "docker":
        require_docker()
        return docker_config(state_dir)
    if kind == "gvisor":
        require_gvisor()
        return gvisor_config(state_dir)
    raise AssertionError(kind)


def new_id() -> str:
    """A fresh sandbox id, unique across concurrent test runs."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=RUNTIMES)
def runtime_config(request, tmp_path):
    return make_config(request.param, str(tmp_path / "state"))


@pytest.fixture
async def runtime(runtime_config):
    rt = runtime_config.build()
    try:
        yield rt
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()


@pytest.fixture
def sandbox_spec() -> SandboxSpec:
    """Override in a test module (or parametrize) to change the sandbox's spec."""
    return SandboxSpec(owner="contract-tests", labels={"suite": "contract"})


@pytest.fixture
async def sandbox(runtime, sandbox_spec):
    sandbox_id = new_id()
    await runtime.create(sandbox_id, sandbox_spec)
    try:
        handle = await runtime.start(sandbox_id)
        yield runtime, sandbox_id, handle
    finally:
        await runtime.remove(sandbox_id)
