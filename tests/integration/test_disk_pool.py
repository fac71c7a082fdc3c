"""The bwrap runtime's pool of pre-formatted disks, and loop mounts by ioctl."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rock_serve.runtime import _disk_pool
from rock_serve.runtime._disk_pool import DiskPool, loop_mount
from tests._wait import wait_until

MKFS = shutil.which("mkfs.ext4")
pytestmark = pytest.mark.skipif(MKFS is None, reason="needs mkfs.ext4 (e2fsprogs)")


def _is_ext4(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(1024 + 56)  # the superblock's s_magic
        return f.read(2) == b"\x53\xef"


def test_pool_hands_out_fresh_disks_once_and_refills(tmp_path: Path) -> None:
    assert MKFS is not None
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "8-half.img.tmp").write_bytes(b"x")  # an earlier instance's leftover
    pool = DiskPool(str(tmp_path / "pool"), 2, MKFS)
    try:
        assert not (tmp_path / "pool" / "8-half.img.tmp").exists()
        assert not pool.take(8, str(tmp_path / "a.img"))  # none ready yet: the caller makes one
        wait_until(lambda: pool.ready(8) == 1, what="one spare disk")  # as many as asked for
        taken = []
        for name in ("b.img", "c.img", "d.img"):
            wait_until(lambda: pool.ready(8) >= 1, what="a ready disk")
            assert pool.take(8, str(tmp_path / name))
            taken.append(os.stat(tmp_path / name).st_ino)
            assert _is_ext4(str(tmp_path / name))
            assert os.path.getsize(tmp_path / name) == 8 << 20
        assert len(set(taken)) == 3
        wait_until(lambda: pool.ready(8) == 2, what="the refill, up to per_size")
        left = {e.stat().st_ino for e in os.scandir(tmp_path / "pool")}
        assert not left & set(taken)  # a taken disk never comes back
        # Only the most recent MAX_SIZES sizes are kept.
        for size in range(9, 9 + _disk_pool.MAX_SIZES):
            pool.want(size)
        wait_until(lambda: pool.ready(9 + _disk_pool.MAX_SIZES - 1) == 1, what="other sizes")
        assert pool.ready(8) == 0
        assert not any(e.name.startswith("8-") for e in os.scandir(tmp_path / "pool"))
    finally:
        pool.close()
    # The ready ones stay for the next instance (never used, never mounted).
    again = DiskPool(str(tmp_path / "pool"), 2, MKFS)
    try:
        assert again.ready(9 + _disk_pool.MAX_SIZES - 1) >= 1
    finally:
        again.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_loop_mount_by_ioctl_frees_its_device_at_unmount(tmp_path: Path) -> None:
    assert MKFS is not None
    image, target = str(tmp_path / "d.img"), tmp_path / "mnt"
    _disk_pool.make_disk(image, 16, MKFS)
    target.mkdir()
    loop_mount(image, str(target), 2 | 4)  # nosuid, nodev
    try:
        (target / "f").write_text("data")
        attached = subprocess.run(["losetup", "-j", image], capture_output=True, text=True)
        assert "/dev/loop" in attached.stdout
        opts = [
            ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(target) in ln
        ]
        assert opts and "nosuid" in opts[0] and "nodev" in opts[0]
    finally:
        subprocess.run(["umount", str(target)], check=True)
    wait_until(
        lambda: not subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout,
        what="the loop device to clear",
    )
