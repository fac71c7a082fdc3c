"""What of the host a sandbox can see or name: nothing but system directories.

Before (issue 11): the default bwrap root was the host's ``/`` minus a deny-list (``/work``
with this checkout, ``/opt``, ``/var/lib/*``, ``/etc/machine-id`` were readable), and
``image`` accepted any host directory, another tenant's sandbox included.
"""

from __future__ import annotations

import os

import pytest

from rock_serve import errors
from rock_serve.protocol import SandboxSpec

from .conftest import new_id, sh

#: What a default bwrap root holds at its top level (host entries first, then its own).
BWRAP_TOP = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"} | {
    "etc",
    "root",
    "home",
    "tmp",
    "run",
    "var",
    "proc",
    "sys",
    "dev",
    ".rock",
}


#: Empty directories of the default bwrap root that have host namesakes.
SKELETON_DIRS = {"/var/cache", "/var/lib", "/var/log", "/var/tmp"}


def _host_children(limit: int = 20) -> list[str]:
    """Up to ``limit`` paths inside each host top-level directory a sandbox must not see."""
    out = []
    for top in sorted(os.listdir("/")):
        if top in BWRAP_TOP - {"etc", "root", "home", "var", "run", "tmp"}:
            continue
        path = os.path.join("/", top)
        if os.path.islink(path) or not os.path.isdir(path) or top in ("proc", "sys", "dev"):
            out.append(path)
            continue
        try:
            names = sorted(os.listdir(path))[:limit]
        except OSError:
            continue
        out += [os.path.join(path, n) for n in names]
    return out


async def test_host_top_level_is_not_visible(sandbox):
    runtime, _, h = sandbox
    host_only = [p for p in _host_children() if not p.startswith(("/proc/", "/sys/", "/dev/"))]
    script = 'for p in "$@"; do test -e "$p" -o -L "$p" && echo "$p"; done; true'
    from rock_serve.protocol import ExecRequest

    seen = await h.exec(ExecRequest(command=["bash", "-c", script, "x", *host_only]))
    visible = set(seen.stdout.split())
    if runtime.name == "bwrap" and getattr(runtime.config, "images", None) is not None:
        # The root is an image (the default one): it has its own standard top-level dirs;
        # only host-specific names would be a leak (/work, /opt and /srv contents are checked
        # by test_host_working_dirs_and_state_are_not_visible).
        own = {"bin", "boot", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt",
               "opt", "root", "run", "sbin", "srv", "tmp", "usr", "var", ".rock"}  # fmt: skip
        leaked = sorted(p for p in visible if p.split("/")[1] not in own)
    elif runtime.name == "bwrap":
        # Only allow-listed system dirs and the filtered /etc come from the host.
        etc = {f"/etc/{name}" for name in runtime.config.etc_allow}
        leaked = sorted(
            p
            for p in visible
            if p.split("/")[1] not in {"usr", "bin", "sbin", "lib", "lib64"}
            and p not in etc | SKELETON_DIRS
        )
        for path in SKELETON_DIRS & visible:
            assert (await sh(h, f"ls -A {path}")).stdout == "", path
        top = set((await sh(h, "ls -A /")).stdout.split())
        assert top <= BWRAP_TOP, top - BWRAP_TOP
    else:
        # An image has its own /etc, /var, /run...: only host-specific names count
        # (/.dockerenv is Docker's own marker file).
        own = {"etc", "var", "usr", "run", "root", ".dockerenv"}
        leaked = sorted(p for p in visible if p.split("/")[1] not in own)
        # And nothing of the host is mounted in but the rocklet and Docker's own files.
        mounts = (await sh(h, "cat /proc/self/mountinfo")).stdout.splitlines()
        binds = {m.split()[4] for m in mounts if m.split()[3] != "/"}
        docker_own = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/usr/sbin/docker-init"}
        assert binds <= {"/.rock"} | docker_own | {
            m.split()[4] for m in mounts if m.split()[4].startswith(("/proc", "/sys", "/dev"))
        }, binds
    assert leaked == []


async def test_host_working_dirs_and_state_are_not_visible(sandbox):
    runtime, _, h = sandbox
    state = getattr(runtime, "state_dir", "/var/lib/rock-serve")
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for path in (here, os.path.join(here, "pyproject.toml"), state, "/opt", "/work", "/srv"):
        if not os.path.exists(path):
            continue
        out = await sh(h, f"ls -A {path} 2>/dev/null")
        assert out.stdout == "", (path, out.stdout[:200])


async def test_etc_is_filtered_and_home_dirs_are_empty(sandbox):
    runtime, _, h = sandbox
    if runtime.name != "bwrap" or getattr(runtime.config, "images", None) is not None:
        pytest.skip("an image brings its own /etc and home directories")
    for path in ("/etc/shadow", "/etc/gshadow", "/etc/machine-id", "/etc/ssh", "/etc/sudoers"):
        assert (await sh(h, f"test -e {path}")).exit_code != 0, path
    for path in ("/root", "/home", "/var/lib", "/var/log", "/run"):
        assert (await sh(h, f"ls -A {path}")).stdout == "", path
    # What the system dirs need does work: a shell, python, name lookup config.
    out = await sh(h, "python3 -c 'import ssl, json; print(1)' && cat /etc/passwd | head -1")
    assert out.stdout.startswith("1\nroot:"), out


@pytest.mark.parametrize(
    "image",
    # ("relative/dir" is no host path: it is a registry reference now.)
    ["/", "/usr", "/etc", "/var/lib", "/nonexistent-dir", "/tmp/../usr"],
)
async def test_image_cannot_name_a_host_path(runtime, image):
    with pytest.raises(errors.RockError) as info:
        await runtime.create(new_id(), SandboxSpec(image=image))
    assert info.value.code in ("image_not_found", "invalid_request"), info.value
    assert await runtime.list() == []


async def test_image_cannot_name_another_sandbox(runtime):
    if runtime.name != "bwrap":
        pytest.skip("docker images are references, not directories")
    victim = new_id()
    await runtime.create(victim, SandboxSpec())
    merged = os.path.join(runtime.state_dir, victim, "merged")
    for image in (merged, runtime.state_dir, os.path.dirname(runtime.state_dir)):
        with pytest.raises(errors.ImageNotFound):
            await runtime.create(new_id(), SandboxSpec(image=image))


async def test_no_writable_clone_of_a_layer_or_the_host_root_stays_mounted(runtime, tmp_path):
    """A host ``rm -rf`` of a sandbox's state dir cannot delete its lower layers through it.

    Before: with userns each lower layer (an image's, or the host's ``/`` under the default
    root) stayed mounted read-write at ``<state>/<id>/lower<i>`` for the sandbox's life, so
    deleting a leftover state dir (pytest cleaning a basetemp after a killed run did) emptied
    the image store's bookworm layer through it, and could have reached the host's root.
    """
    if runtime.name != "bwrap" or runtime.slots is None:
        pytest.skip("idmapped lower layers are the bwrap runtime's (userns: true)")
    from rock_serve.runtime._state import read_meta
    from rock_serve.runtime._userns import idmapped_mount
    from rock_serve.runtime.bwrap import _MNT_DETACH, _sys_umount, mounts_under

    sid = new_id()
    await runtime.create(sid, SandboxSpec())
    h = await runtime.start(sid)
    path = os.path.join(runtime.state_dir, sid)
    # Only the sandbox's own upper side is mounted in its dir: the merged root (and a disk).
    left = {os.path.relpath(m, path) for m in mounts_under(path)}
    assert left <= {"merged", "disk"}, left
    assert (await sh(h, "test -x /usr/bin/env && echo ok")).stdout == "ok\n"  # still served
    # And an idmapped clone, while it exists, is read-only.
    layer, target = tmp_path / "layer", tmp_path / "clone"
    layer.mkdir()
    (layer / "canary").write_text("x")
    target.mkdir()
    meta = read_meta(path)
    assert meta is not None and meta.uid_base is not None
    idmapped_mount(str(layer), str(target), runtime._userns(meta.uid_base))
    try:
        with pytest.raises(OSError) as err:
            (target / "canary").unlink()
        assert err.value.errno == 30, err.value  # EROFS
        assert (layer / "canary").read_text() == "x"
    finally:
        _sys_umount(str(target), _MNT_DETACH)
