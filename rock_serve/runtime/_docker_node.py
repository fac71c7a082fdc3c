"""What the docker runtime needs from its node: the interpreter, the keep-alive, /proc facts.

The daemon runs on the same node as the Worker (the rocklet is bind-mounted from it), so a
container's host pids and cgroups can be read here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from docker.types import Mount

__all__ = ["PYTHON_MOUNT", "cgroup_oom_kills", "exiting", "install_keepalive", "node_python"]

#: Where a distribution's interpreter appears in a container whose image has no python3.
PYTHON_MOUNT = "/.rock-python"
_PF_EXITING = 0x4

#: The container's main process (under Docker's init): blocks on its stdin, which the daemon
#: keeps open and nobody writes; SIGTERM (stop) ends it, and the container with it.
_KEEPALIVE = """#!/bin/sh
# rock-serve: keeps this sandbox's container alive; the rocklet runs beside it in an exec.
read -r _
"""


#: Prints what :func:`node_python` needs to know about an interpreter.
_DESCRIBE = (
    "import json, os, sys, sysconfig; print(json.dumps({"
    "'exe': os.path.realpath(getattr(sys, '_base_executable', None) or sys.executable), "
    "'prefix': os.path.realpath(sys.base_prefix), "
    "'stdlib': os.path.realpath(sysconfig.get_paths()['stdlib']), "
    "'version': '%d.%d' % sys.version_info[:2]}))"
)


def node_python(executable: str | None = None) -> tuple[str, list[Mount]]:
    """A node's interpreter as a container sees it, and the read-only mounts that give it.

    ``executable`` is a host interpreter (>= 3.8); None = the one running this code. A
    distribution's python (prefix ``/usr``): its binary goes to ``/.rock-python/bin/python3``
    and its standard library (with ``lib-dynload``) to ``/.rock-python/lib/pythonX.Y``, where
    the interpreter finds it from its own location; its shared libraries (glibc, libz,
    libexpat) must be in the image. A self-contained install (pyenv, uv,
    python-build-standalone, conda): its whole prefix, at the same path as on the node, so
    that an rpath to its ``libpython`` resolves; it needs only the image's glibc.

    Raises:
        OSError, subprocess.CalledProcessError: ``executable`` does not run.
    """
    if executable is None:
        info = json.loads(subprocess.check_output([sys.executable, "-I", "-c", _DESCRIBE]))
    else:
        info = json.loads(subprocess.check_output([executable, "-I", "-c", _DESCRIBE]))
    exe, prefix = str(info["exe"]), str(info["prefix"])
    if prefix not in ("/", "/usr", "/usr/local") and exe.startswith(prefix + "/"):
        return exe, [Mount(prefix, prefix, type="bind", read_only=True)]
    python = f"{PYTHON_MOUNT}/bin/python3"
    stdlib = f"{PYTHON_MOUNT}/lib/python{info['version']}"
    return python, [
        Mount(python, exe, type="bind", read_only=True),
        Mount(stdlib, str(info["stdlib"]), type="bind", read_only=True),
    ]


def install_keepalive(agent_dir: str) -> None:
    """Write the keep-alive script (``keepalive``, mode 755) into ``agent_dir``."""
    path = os.path.join(agent_dir, "keepalive")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(_KEEPALIVE)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def exiting(pid: int) -> bool:
    """True when host process ``pid`` is gone, a zombie, or exiting (``PF_EXITING``).

    A namespace's init stays in its exit, not yet a zombie, until the kernel has killed every
    other process of the namespace.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)


def cgroup_oom_kills(pid: int) -> int | None:
    """OOM kills the kernel counted in the memory cgroup of host ``pid``; None if unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path == "/":
            continue  # an exiting process has left its cgroups already
        if controllers == "":
            target, key = f"/sys/fs/cgroup{path}/memory.events", "oom_kill"
        elif "memory" in controllers.split(","):
            target, key = f"/sys/fs/cgroup/memory{path}/memory.oom_control", "oom_kill"
        else:
            continue
        try:
            with open(target) as f:
                for row in f:
                    parts = row.split()
                    if len(parts) == 2 and parts[0] == key:
                        return int(parts[1])
        except (OSError, ValueError):
            continue
    return None
