"""Fixtures that run the contract suite against every runtime this machine has.

``runtime`` is parametrized over ``local`` (always) and ``bwrap`` (when bubblewrap, root and
writable cgroups are available; skipped with the reason otherwise). ``sandbox`` creates and
starts one sandbox, yields ``(runtime, sandbox_id, handle)`` and always removes it.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from rock_serve.config import BwrapRuntimeConfig, LocalRuntimeConfig
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
]


def make_config(kind: str, state_dir: str) -> LocalRuntimeConfig | BwrapRuntimeConfig:
    """A runtime config of ``kind`` that keeps its state in ``state_dir``."""
    if kind == "local":
        return LocalRuntimeConfig(state_dir=state_dir)
    if kind == "bwrap":
        return BwrapRuntimeConfig(state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)
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
