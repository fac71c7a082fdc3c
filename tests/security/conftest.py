"""The escape suite's fixtures: every attack runs against every isolating runtime here.

:data:`SECURE_RUNTIMES` is the contract suite's runtime list without ``local`` (which does not
isolate); a runtime added there (or appended here, e.g. ``gvisor``) is attacked too. Skips
follow the contract suite: bwrap when the machine cannot run it, docker unless
``ROCK_REQUIRE_DOCKER=1`` makes a missing engine an error.

``sandbox`` yields ``(runtime, sandbox_id, handle)`` for the module's ``sandbox_spec``
(default: the runtime's defaults) and always removes it. :func:`sh` and :func:`py` run code
inside, as an attacker would.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from rock_serve.protocol import ExecRequest, ExecResult, SandboxSpec
from tests.contract.conftest import RUNTIMES, make_config

#: Runtimes the escape suite attacks (append a ``pytest.param`` to add one).
SECURE_RUNTIMES: list[Any] = [p for p in RUNTIMES if p.id != "local"]


def new_id() -> str:
    """A fresh sandbox id, unique across concurrent test runs."""
    return f"s-{uuid.uuid4().hex[:16]}"


async def sh(handle: Any, command: str, timeout: float = 60) -> ExecResult:
    """Run ``command`` with bash inside the sandbox."""
    result: ExecResult = await handle.exec(ExecRequest(command=command, timeout=timeout))
    return result


async def py(handle: Any, code: str, timeout: float = 60) -> ExecResult:
    """Run Python ``code`` inside the sandbox (the image's python3)."""
    request = ExecRequest(command=["python3", "-c", code], timeout=timeout)
    result: ExecResult = await handle.exec(request)
    return result


@pytest.fixture(params=SECURE_RUNTIMES)
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
    """Override in a test module to change the attacked sandbox's spec."""
    return SandboxSpec(owner="escape-suite")


@pytest.fixture
async def sandbox(runtime, sandbox_spec):
    sandbox_id = new_id()
    await runtime.create(sandbox_id, sandbox_spec)
    try:
        handle = await runtime.start(sandbox_id)
        yield runtime, sandbox_id, handle
    finally:
        await runtime.remove(sandbox_id)
