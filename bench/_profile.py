"""py-spy profiles of the platform's processes while a bench row runs (``--profile DIR``).

Each profiled row records, with ``py-spy record --format raw`` (collapsed stacks, idle threads
left out), the bench process itself (the SDK side) and every Ray process of this run that
serves requests (the Worker actor, the Admin replica, the Scheduler, the Serve proxy), found
as descendants of this process whose title starts with ``ray::``. After the row, one summary
per process is printed: its busy share of the row's wall time and the frames with the most
self time, so "where does the time go" is a number, not a guess. Raw files stay in DIR (load
them in speedscope, or ``flamegraph.pl``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Process titles worth profiling (Ray workers set ``ray::<Class>[.<method>]``).
_WANTED = re.compile(r"^ray::(Worker|ServeReplica:[^ ]*|Scheduler|ProxyActor|RayGate)")


def _py_spy() -> str:
    # on PATH, next to this interpreter, or in the bin/ of a venv whose packages we share
    bins = [Path(sys.executable).parent] + [
        Path(p).parents[2] / "bin" for p in sys.path if p.endswith("site-packages")
    ]
    found = shutil.which("py-spy") or next(
        (str(b / "py-spy") for b in bins if (b / "py-spy").exists()), None
    )
    if found is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return found


def targets() -> dict[str, int]:
    """Title -> pid of this run's Ray processes that serve requests, and the bench itself."""
    import psutil

    out = {"bench (SDK)": os.getpid()}
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        m = _WANTED.match(title)
        if m and not title.startswith("ray::IDLE"):
            name = m.group(1).split(".")[0]
            out[name if name not in out else f"{name}#{child.pid}"] = child.pid
    return out


@dataclass
class Recording:
    """Running py-spy processes for one row."""

    label: str
    files: dict[str, Path]
    procs: list[subprocess.Popen[bytes]]
    cpu0: dict[str, float]
    pids: dict[str, int]
    rest0: Counter[str]

    def stop(self, wall: float, ops: int) -> None:
        for p in self.procs:
            p.send_signal(2)  # py-spy writes its file on SIGINT
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        cpu = _cpu(self.pids)
        print(f"\nprofile: {self.label} ({wall:.1f} s wall, py-spy 100 Hz, load {_load()})")
        for name, path in self.files.items():
            used = cpu.get(name, 0.0) - self.cpu0.get(name, 0.0)
            summarize(name, path, wall, used, ops)
        rest = _descendant_cpu()
        rest.subtract(self.rest0)
        for kind, used in rest.most_common(6):
            if used > 0.005:
                print(
                    f"  {kind} (all such processes): {used:.2f} s CPU, "
                    f"{used / max(ops, 1) * 1e3:.2f} ms per op"
                )


def start(out: Path, label: str) -> Recording:
    """Start one py-spy per target process; :meth:`Recording.stop` prints the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    files, procs = {}, []
    for name, pid in targets().items():  # noqa: B007
        path = out / f"{slug}.{re.sub(r'[^A-Za-z0-9]+', '-', name)}.txt"
        files[name] = path
        procs.append(
            subprocess.Popen(
                [
                    *(_py_spy(), "record", "--nonblocking", "--pid", str(pid)),
                    *("--format", "raw", "-o", str(path)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    pids = targets()
    return Recording(label, files, procs, _cpu(pids), pids, _descendant_cpu())


def _kind(proc: Any) -> str:
    """A group name for a process: rocklet, sandbox shell, or its executable's name."""
    cmd = proc.cmdline()
    if any("import agent" in c for c in cmd):
        return "rocklets"
    name = proc.name()
    if name.startswith("ray::"):
        return "other ray workers"
    return name


def _descendant_cpu() -> Counter[str]:
    """CPU seconds of this run's processes other than the profiled ones (and py-spy), by
    kind (a process's reaped children count as its own)."""
    import psutil

    skip = set(targets().values())
    total: Counter[str] = Counter()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in skip or child.name() == "py-spy":
                continue
            t = child.cpu_times()
            total[_kind(child)] += t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by each process."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[name] = t.user + t.system
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _frame(raw: str) -> str:
    # py-spy raw frames: "func (path/to/file.py:123)"
    m = re.match(r"(.*) \((.*):(\d+)\)$", raw.strip())
    if not m:
        return raw.strip()
    func, path = m.group(1), m.group(2)
    parts = Path(path).parts
    for anchor in ("site-packages", "rock_serve", "deployments", "sdk", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + (1 if anchor in ("site-packages", "lib") else 0) :]
            break
    return f"{func} ({'/'.join(parts[-3:])})"


#: Frames where a thread waits (in C, so py-spy's idle detection misses some): left out.
_IDLE = re.compile(
    r"^(Thread\.run|Condition\.wait|Event\.wait|Worker\.main_loop|_worker|sleep|select|"
    r"listen_error_messages|.*_run_.*event_loop|.*\.run_forever|_run_once|"
    r"BaseSelectorEventLoop\._(read|write)_to_self) "
)


def summarize(name: str, path: Path, wall: float, cpu: float, ops: int, top: int = 8) -> None:
    """CPU used, and the top self-time frames of one raw py-spy file (waits left out)."""
    if not path.exists():
        print(f"  {name}: no samples (process gone?)")
        return
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        # the thread name comes first ("thread (0x...)" / "process ..."): skip non-code frames
        frames = [f for f in frames if "(" in f and not f.startswith(("thread", "process"))]
        if not frames:
            continue
        if _IDLE.match(frames[-1]):
            continue
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(
        f"  {name}: {cpu:.2f} s CPU in {wall:.1f} s ({cpu / wall:.0%} of one core), "
        f"{cpu / max(ops, 1) * 1e3:.2f} ms per op; {total} Python samples off the wait frames"
    )
    for frame, n in self_time.most_common(top):
        print(f"    self {n / max(total, 1):6.1%}  {frame}")
    ours = [
        (f, n)
        for f, n in incl.most_common()
        if any(k in f for k in ("rock_serve/", "deployments/", "sdk/"))
    ]
    for frame, n in ours[:top]:
        print(f"    incl {n / max(total, 1):6.1%}  {frame}")
