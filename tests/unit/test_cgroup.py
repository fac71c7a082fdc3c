"""Cgroup paths and limit files for v1 and v2, against fake trees in tmp_path."""

import pytest

from rock_serve import errors
from rock_serve.protocol import Resources
from rock_serve.runtime._cgroup import Cgroup, CgroupLayout, limit_writes

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_parse_v1_hybrid_prefers_v1():
    layout = CgroupLayout.parse(V1_MOUNTINFO)
    assert layout is not None and layout.version == 1
    assert layout.mounts == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
    }


def test_parse_v2():
    layout = CgroupLayout.parse(V2_MOUNTINFO)
    assert layout == CgroupLayout(2, {"": "/sys/fs/cgroup"})


def test_parse_nothing():
    assert CgroupLayout.parse("22 1 0:21 / /sys rw - sysfs sysfs rw\n") is None


def test_paths_v1():
    cg = Cgroup(CgroupLayout.parse(V1_MOUNTINFO), "/rock-serve/", "sb1")
    assert cg.dirs["memory"] == "/sys/fs/cgroup/memory/rock-serve/sb1"
    assert cg.dirs["cpu"] == cg.dirs["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct/rock-serve/sb1"
    # Co-mounted controllers share one directory: the pid is written once per hierarchy.
    assert cg.procs_files == [
        "/sys/fs/cgroup/cpu,cpuacct/rock-serve/sb1/cgroup.procs",
        "/sys/fs/cgroup/memory/rock-serve/sb1/cgroup.procs",
        "/sys/fs/cgroup/pids/rock-serve/sb1/cgroup.procs",
    ]


def test_paths_v2_nested_parent():
    cg = Cgroup(CgroupLayout.parse(V2_MOUNTINFO), "a/b", "sb1")
    assert cg.dirs == {"": "/sys/fs/cgroup/a/b/sb1"}
    assert cg.procs_files == ["/sys/fs/cgroup/a/b/sb1/cgroup.procs"]


@pytest.mark.parametrize("parent", ["", "/", "..", "a/../b"])
def test_bad_parent(parent):
    with pytest.raises(errors.InvalidConfig):
        Cgroup(CgroupLayout(2, {"": "/x"}), parent, "sb")


def test_limit_writes_v1():
    layout = CgroupLayout.parse(V1_MOUNTINFO)
    cg = Cgroup(layout, "rs", "s")
    writes = limit_writes(layout, cg.dirs, Resources(memory_mb=64, pids=100, cpus=1.5))
    m, c, p = (f"/sys/fs/cgroup/{x}/rs/s" for x in ("memory", "cpu,cpuacct", "pids"))
    assert writes == [
        (f"{m}/memory.limit_in_bytes", str(64 << 20)),
        (f"{m}/memory.memsw.limit_in_bytes", str(64 << 20)),
        (f"{p}/pids.max", "100"),
        (f"{c}/cpu.cfs_period_us", "100000"),
        (f"{c}/cpu.cfs_quota_us", "150000"),
    ]
    assert limit_writes(layout, cg.dirs, Resources()) == []


def test_limit_writes_v2():
    layout = CgroupLayout(2, {"": "/cg"})
    cg = Cgroup(layout, "rs", "s")
    writes = limit_writes(layout, cg.dirs, Resources(memory_mb=64, pids=100, cpus=0.25))
    assert writes == [
        ("/cg/rs/s/memory.max", str(64 << 20)),
        ("/cg/rs/s/memory.swap.max", "0"),
        ("/cg/rs/s/pids.max", "100"),
        ("/cg/rs/s/cpu.max", "25000 100000"),
    ]


def _fake_v2_root(tmp_path, controllers="cpuset cpu io memory pids"):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_create_v2_enables_controllers_and_writes_limits(tmp_path):
    root = _fake_v2_root(tmp_path)
    # In a real cgroupfs these files appear by themselves; a plain directory needs them.
    leaf = root / "rs" / "sb"
    leaf.mkdir(parents=True)
    (root / "rs" / "cgroup.subtree_control").write_text("")
    for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max"):
        (leaf / name).write_text("max\n")
    cg = Cgroup(CgroupLayout(2, {"": str(root)}), "rs", "sb")
    cg.create(Resources(memory_mb=32, pids=16, cpus=2))
    # Each "+ctrl" write replaces the regular file's content; a real cgroupfs accumulates.
    assert (root / "cgroup.subtree_control").read_text() == "+cpu"
    assert (root / "rs" / "cgroup.subtree_control").read_text() == "+cpu"
    assert (leaf / "memory.max").read_text() == str(32 << 20)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "pids.max").read_text() == "16"
    assert (leaf / "cpu.max").read_text() == "200000 100000"


def test_create_v2_without_memory_controller(tmp_path):
    root = _fake_v2_root(tmp_path, controllers="cpu io")
    cg = Cgroup(CgroupLayout(2, {"": str(root)}), "rs", "sb")
    with pytest.raises(errors.RuntimeUnavailable, match="memory"):
        cg.create(Resources())


def test_v1_missing_memsw_is_tolerated(tmp_path):
    mounts = {c: str(tmp_path / c) for c in ("memory", "pids")}
    cg = Cgroup(CgroupLayout(1, mounts), "rs", "sb")
    for d in cg.dirs.values():
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "memory" / "rs" / "sb" / "memory.limit_in_bytes").write_text("")
    (tmp_path / "pids" / "rs" / "sb" / "pids.max").write_text("")
    cg.create(Resources(memory_mb=16, pids=8))
    assert (tmp_path / "memory/rs/sb/memory.limit_in_bytes").read_text() == str(16 << 20)
    with pytest.raises(errors.InvalidConfig, match="cpu"):
        cg.create(Resources(cpus=1))


def test_oom_kills_and_pids_and_remove(tmp_path):
    v1 = Cgroup(
        CgroupLayout(1, {"memory": str(tmp_path / "m"), "pids": str(tmp_path / "p")}), "r", "s"
    )
    for d in v1.dirs.values():
        (tmp_path / d).mkdir(parents=True)
    assert v1.oom_kills() == 0
    (tmp_path / "m/r/s/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    )
    assert v1.oom_kills() == 3
    assert v1.pids() == []
    v2 = Cgroup(CgroupLayout(2, {"": str(tmp_path / "u")}), "r", "s")
    (tmp_path / "u/r/s").mkdir(parents=True)
    (tmp_path / "u/r/s/memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    assert v2.oom_kills() == 2
    (tmp_path / "u/r/s/memory.events").unlink()
    assert v2.exists()
    v2.remove()
    assert not v2.exists()
    v2.remove()  # idempotent
