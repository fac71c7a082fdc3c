"""``squash_layers`` against the kernel: a stack of overlay layers and its squash, each mounted
over the same "image" layer, show the same tree.

Needs root (overlay mounts, whiteouts are character devices, ``trusted.*`` xattrs).
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rock_serve.runtime._snapshot import squash_layers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")

OPAQUE = "trusted.overlay.opaque"


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, OPAQUE, b"y")


def _tree(root: Path) -> dict[str, object]:
    """Every path under ``root`` -> what it is (file contents, link target, dir, mode)."""
    out: dict[str, object] = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for merged in reversed(made):
        subprocess.run(["umount", str(merged)], check=False)


def _merged(tmp_path: Path, name: str, lowers_top_first: list[Path], mounts: list[Path]) -> Path:
    merged = tmp_path / name
    merged.mkdir()
    opts = "lowerdir=" + ":".join(str(p) for p in lowers_top_first)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    mounts.append(merged)
    return merged


def test_a_squash_shows_what_the_stack_showed(tmp_path: Path, mounts: list[Path]) -> None:
    image, low, mid, top = (tmp_path / n for n in ("image", "low", "mid", "top"))
    for d in (image, low, mid, top):
        d.mkdir()
    # The image: files each layer above deletes, replaces or hides.
    (image / "etc").mkdir()
    (image / "etc" / "os").write_text("image")
    (image / "etc" / "gone").write_text("deleted by low")
    (image / "var" / "cache").mkdir(parents=True)
    (image / "var" / "cache" / "old").write_text("hidden by mid's opaque dir")
    (image / "home").mkdir()
    (image / "home" / "x").write_text("image's x")
    # low: a new file, a whiteout of an image file, a directory of its own.
    (low / "etc").mkdir()
    _whiteout(low / "etc" / "gone")
    (low / "data").mkdir()
    (low / "data" / "a").write_text("from low")
    (low / "data" / "b").write_text("deleted by mid")
    (low / "home").mkdir()
    (low / "home" / "x").write_text("low's x")
    # mid: deletes low's file, makes an image dir opaque with new content, adds a symlink.
    (mid / "data").mkdir()
    _whiteout(mid / "data" / "b")
    _opaque(mid / "var" / "cache")
    (mid / "var" / "cache" / "new").write_text("mid's cache")
    os.symlink("/etc/os", mid / "link")
    (mid / "home").mkdir()
    _whiteout(mid / "home" / "x")  # deleted, then made again by top
    # top (the sandbox's upper): recreates a deleted file, replaces a dir by a file.
    (top / "home").mkdir()
    (top / "home" / "x").write_text("top's x")
    (top / "data").mkdir()
    (top / "data" / "a").write_text("top's a")
    os.chmod(top / "data" / "a", 0o600)
    (top / "etc").mkdir()
    (top / "etc" / "os").write_text("top's os")

    stacked = _merged(tmp_path, "stacked", [top, mid, low, image], mounts)
    squashed = tmp_path / "squashed"
    squash_layers([str(low), str(mid), str(top)], str(squashed), below=[str(image)])
    flat = _merged(tmp_path, "flat", [squashed, image], mounts)

    want = _tree(stacked)
    assert _tree(flat) == want
    assert "etc/gone" not in want and "var/cache/old" not in want and "data/b" not in want
    assert want["home/x"] == ("file", b"top's x", 0o644)
    assert want["data/a"] == ("file", b"top's a", 0o600)
    assert os.getxattr(squashed / "var" / "cache", OPAQUE) == b"y"
    # Whiteouts stay only where the image has the path: etc/gone; data/b hid only low's file.
    assert stat.S_ISCHR(os.lstat(squashed / "etc" / "gone").st_mode)
    assert not os.path.lexists(squashed / "data" / "b")
    # The inputs are untouched (they are other sandboxes' lowers).
    assert (low / "data" / "b").read_text() == "deleted by mid"


def test_a_failed_squash_leaves_nothing(tmp_path: Path) -> None:
    from rock_serve.errors import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable):
        squash_layers([str(tmp_path / "missing")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == []
