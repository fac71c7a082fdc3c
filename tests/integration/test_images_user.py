"""The image config's ``User`` (and a create's ``user``): names and groups resolved from the
image's own /etc/passwd and /etc/group; on docker through the container's user (bwrap's side
is in test_images.py, whose store has the Debian base unpacked already). The ``nonroot`` test
image (scripts/build-test-images) has User=agent (1000:1000, also in group staff=50).
"""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from rock_serve import errors
from rock_serve.protocol import ExecRequest, SandboxSpec
from rock_serve.runtime._image_user import ImageUser, resolve_user
from tests._registry import Registry, oci, registry_skip_reason
from tests.contract.conftest import REQUIRE_DOCKER, docker_config, docker_unavailable

_SKIP = registry_skip_reason()
needs_images = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
_NO_DOCKER = docker_unavailable()
if _NO_DOCKER is not None and REQUIRE_DOCKER:
    raise RuntimeError(f"ROCK_REQUIRE_DOCKER=1 but docker is unavailable: {_NO_DOCKER}")


# ---------------------------------------------------------------- resolution


def _layer(tmp_path, name: str, passwd: str | None, group: str | None = None) -> str:
    d = tmp_path / name
    (d / "etc").mkdir(parents=True)
    if passwd is not None:
        (d / "etc" / "passwd").write_text(passwd)
    if group is not None:
        (d / "etc" / "group").write_text(group)
    return str(d)


def test_user_forms_resolve_against_the_images_files(tmp_path):
    top = _layer(
        tmp_path,
        "top",
        "root:x:0:0::/root:/bin/sh\nagent:x:1000:1001:a:/home/agent:/bin/sh\n",
        "root:x:0:\nstaff:x:50:agent,bob\nagent:x:1001:\n",
    )
    base = _layer(tmp_path, "base", "ghost:x:7:7::/g:/bin/sh\n", "wheel:x:10:\n")
    lowers = [top, base]  # top first: base's passwd is hidden by top's
    assert resolve_user("agent", lowers) == ImageUser(1000, 1001, "/home/agent", (50,))
    assert resolve_user("1000", lowers) == ImageUser(1000, 1001, "/home/agent", (50,))
    assert resolve_user("agent:staff", lowers).gid == 50
    assert resolve_user("agent:7", lowers).gid == 7
    assert resolve_user("4242", lowers) == ImageUser(4242, 0, "/")  # Docker: gid 0, home /
    assert resolve_user("4242:4343", lowers) == ImageUser(4242, 4343, "/")
    assert resolve_user("", lowers).root and resolve_user("root", lowers).root
    with pytest.raises(errors.Conflict, match="ghost"):
        resolve_user("ghost", lowers)  # only in a lower layer's (hidden) passwd
    with pytest.raises(errors.Conflict, match="wheel"):
        resolve_user("agent:wheel", lowers)
    with pytest.raises(errors.Conflict, match="outside"):
        resolve_user("70000", lowers)


def test_a_whiteout_of_passwd_means_the_image_has_none(tmp_path):
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc" / "passwd", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    base = _layer(tmp_path, "base", "agent:x:1000:1000::/home/agent:/bin/sh\n")
    with pytest.raises(errors.Conflict, match="agent"):
        resolve_user("agent", [str(top), base])
    assert resolve_user("1000", [str(top), base]) == ImageUser(1000, 0, "/")


def test_user_field_is_validated_by_the_schema():
    from pydantic import ValidationError

    for bad in ("", "a b", "x:y:z", "-rf", "a" * 40):
        with pytest.raises(ValidationError):
            SandboxSpec(user=bad)
    assert SandboxSpec(user="1000:1000").user == "1000:1000"


# ---------------------------------------------------------------- docker


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if _SKIP is not None:
        pytest.skip(_SKIP)
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@needs_images
@pytest.mark.skipif(_NO_DOCKER is not None, reason=str(_NO_DOCKER))
async def test_docker_runs_the_sandbox_as_the_images_user(tmp_path, registry):
    ref = registry.push(oci("nonroot"), f"user/nonroot:{uuid.uuid4().hex[:8]}")
    rt = docker_config(str(tmp_path), pull="if-missing").build()
    try:
        sid = f"t-{uuid.uuid4().hex[:16]}"
        await rt.create(sid, SandboxSpec(image=ref, workdir="/home/agent"))
        h = await rt.start(sid)
        out = await h.exec(ExecRequest(command="id -u; id -g; id -G; echo $HOME"))
        lines = out.stdout.split("\n")
        assert lines[:2] == ["1000", "1000"] and sorted(lines[2].split()) == ["1000", "50"], out
        assert lines[3] == "/home/agent"
        sid2 = f"t-{uuid.uuid4().hex[:16]}"
        await rt.create(sid2, SandboxSpec(image=ref, user="nobody:staff", workdir="/"))
        h2 = await rt.start(sid2)
        out2 = await h2.exec(ExecRequest(command="id -u; id -g"))
        assert out2.stdout.split("\n")[:2] == ["65534", "50"], out2
    finally:
        for info in await rt.list():
            await rt.remove(info.id)
        await rt.close()
