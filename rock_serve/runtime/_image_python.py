"""The node's interpreter for images that have no usable Python (none, < 3.8, or musl).

A bundle directory, made once per node: ``bin/python3`` (a copy of the node's interpreter
binary), ``lib/`` (the shared libraries it needs, glibc's loader among them, copied) and
``lib/pythonX.Y`` (a copy of the node's standard library without its tests, tkinter, idle
and site-packages: about 64 MB), all readable by a sandbox's own uid. The
sandbox sees it at :data:`PYTHON_MOUNT` and starts the rocklet through the bundled loader
(``ld-linux --library-path``), so neither the image's libc (busybox-static, musl) nor its
files matter; Python finds its stdlib from its own location. Nothing is put in the
environment, so the image's own programs are not affected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

__all__ = ["PYTHON_MOUNT", "NodePython", "node_python_bundle"]

#: Where the bundle appears inside a sandbox.
PYTHON_MOUNT = "/.rock-python"

_DESCRIBE = (
    "import json, os, sys, sysconfig; print(json.dumps({"
    "'exe': os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable), "
    "'stdlib': os.path.realpath(sysconfig.get_paths()['stdlib']), "
    "'version': '%d.%d' % sys.version_info[:2]}))"
)
_LIB = re.compile(r"(/\S+\.so[.\d]*)")
#: Shared libraries of lib-dynload modules the rocklet may import (others are left out).
_MODULES = (
    "_ctypes",
    "_json",
    "select",
    "fcntl",
    "_posixsubprocess",
    "termios",
    "zlib",
    "_struct",
    "math",
    "binascii",
    "_random",
    "_bisect",
    "_heapq",
    "array",
    "_socket",
    "_datetime",
    "unicodedata",
    "_contextvars",
    "_asyncio",
    "_opcode",
    "resource",
    "mmap",
    "grp",
    "_lzma",
    "_bz2",
    "_sha256",
    "_sha512",
    "_md5",
    "_sha1",
    "_blake2",
    "_queue",
)


class NodePython:
    """Where the bundle lives on the node and how the sandbox starts the rocklet with it."""

    def __init__(self, bundle: str, stdlib: str, version: str) -> None:
        self.bundle, self.stdlib, self.version = bundle, stdlib, version

    def mounts(self) -> list[tuple[str, str]]:
        """(host source, sandbox target) read-only bind mounts, in order."""
        return [(self.bundle, PYTHON_MOUNT)]

    def argv(self) -> list[str]:
        """The interpreter command (the loader, its library path, the binary)."""
        return [
            f"{PYTHON_MOUNT}/lib/{_loader_name()}",
            "--library-path",
            f"{PYTHON_MOUNT}/lib",
            f"{PYTHON_MOUNT}/bin/python3",
        ]


def _loader_name() -> str:
    return "ld-linux-x86-64.so.2" if os.uname().machine == "x86_64" else "ld-linux-aarch64.so.1"


def _ldd(path: str) -> set[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    return {m.group(1) for m in _LIB.finditer(out)}


def node_python_bundle(parent: str, executable: str | None = None) -> NodePython:
    """Make (or reuse) the bundle under ``parent`` for ``executable`` (default: this Python).

    Its name is a hash of what it holds, so a runtime never replaces one in use.
    """
    info = json.loads(
        subprocess.check_output([executable or sys.executable, "-I", "-c", _DESCRIBE])
    )
    exe, stdlib, version = str(info["exe"]), str(info["stdlib"]), str(info["version"])
    want = {"exe": exe, "stdlib": stdlib, "version": version, "layout": 2}
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
    target = os.path.join(parent, f".python-{key}")
    stamp = os.path.join(target, "bundle.json")
    os.makedirs(parent, exist_ok=True)
    try:
        with open(stamp) as f:
            if json.load(f) == want:
                return NodePython(target, stdlib, version)
    except (OSError, ValueError):
        pass
    tmp = f"{target}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "bin"))
    os.makedirs(os.path.join(tmp, "lib"))
    skip = shutil.ignore_patterns(
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "site-packages",
        "config-*",
    )
    shutil.copytree(stdlib, os.path.join(tmp, "lib", f"python{version}"), ignore=skip)
    shutil.copy2(exe, os.path.join(tmp, "bin", "python3"))
    libs = _ldd(exe)
    dynload = os.path.join(stdlib, "lib-dynload")
    if os.path.isdir(dynload):
        for name in os.listdir(dynload):
            if name.split(".", 1)[0] in _MODULES:
                libs |= _ldd(os.path.join(dynload, name))
    for lib in sorted(libs):
        if os.path.exists(lib):
            shutil.copy2(os.path.realpath(lib), os.path.join(tmp, "lib", os.path.basename(lib)))
    with open(os.path.join(tmp, "bundle.json"), "w") as f:
        json.dump(want, f)
    for dirpath, _dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)
    try:
        os.rename(tmp, target)
    except OSError:  # made meanwhile by another runtime: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return NodePython(target, stdlib, version)
