"""Attacks on the kernel and on the rocklet from code inside a sandbox; each must fail.

What each attack got before the hardening (issue 11, default bwrap sandbox): sandbox root
was host root, 779 host sysctls were writable (core_pattern ran a script as host root),
``Seccomp: 0``, a full bounding set, ``unshare -U`` + mount worked and ptrace froze the
rocklet. Writes that would change the host are made with the value already there, so an
attack that wrongly succeeds changes nothing.
"""

from __future__ import annotations

import errno
import os

import pytest

from rock_serve.protocol import SandboxState

from .conftest import py, sh

#: Capabilities no sandbox may hold (bit numbers from linux/capability.h).
FORBIDDEN_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}


#: Runtimes with a kernel of their own (a user-space one): their /proc/sys, seccomp status and
#: syscall errors are that kernel's, not the host's.
OWN_KERNEL = {"gvisor"}


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


async def test_capabilities_seccomp_and_no_new_privs(sandbox):
    runtime, _, h = sandbox
    status = _status((await sh(h, "cat /proc/self/status")).stdout)
    if runtime.name not in OWN_KERNEL:  # gVisor filters the sentry; its /proc omits these
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
    eff, bnd = int(status["CapEff"], 16), int(status["CapBnd"], 16)
    assert bnd == eff, "the bounding set must not exceed the effective set"
    held = [name for name, bit in FORBIDDEN_CAPS.items() if bnd >> bit & 1]
    assert held == []


async def test_no_sysctl_is_writable(sandbox):
    runtime, _, h = sandbox
    if runtime.name in OWN_KERNEL:
        # The sentry's own sysctls: writable or not, they never reach the host kernel.
        with open("/proc/sys/kernel/core_pattern") as f:
            before = f.read()
        await sh(h, "echo core > /proc/sys/kernel/core_pattern")
        with open("/proc/sys/kernel/core_pattern") as f:
            assert f.read() == before
        return
    # access(W_OK) is false on a read-only mount: count what could be written at all.
    writable = await sh(h, "find /proc/sys -type f -writable 2>/dev/null | wc -l")
    assert writable.stdout.strip() == "0"
    for name in ("kernel/core_pattern", "kernel/panic", "vm/overcommit_memory", "fs/file-max"):
        attack = await sh(h, f'v=$(cat /proc/sys/{name}) && echo "$v" > /proc/sys/{name}')
        assert attack.exit_code != 0, name
        assert "Read-only file system" in attack.stderr or "denied" in attack.stderr, attack


async def test_sysrq_trigger_and_proc_dirs_are_read_only(sandbox):
    _, _, h = sandbox
    script = (
        "import os\n"
        "out = []\n"
        "for p in ('/proc/sysrq-trigger', '/proc/irq/default_smp_affinity'):\n"
        "    if not os.path.exists(p):\n"
        "        continue\n"
        "    try:\n"
        "        os.open(p, os.O_WRONLY)\n"
        "        out.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(out)\n"
    )
    assert (await py(h, script)).stdout == "[]\n"
    mounts = (await sh(h, "cat /proc/self/mountinfo")).stdout
    for path in ("/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs"):
        lines = [m for m in mounts.splitlines() if m.split()[4] == path]
        if lines:  # Docker leaves /proc/fs alone where the host has none
            assert all("ro" in m.split()[5].split(",") for m in lines), lines


async def test_masked_proc_files_show_nothing(sandbox):
    _, _, h = sandbox
    for path in ("/proc/keys", "/proc/timer_list", "/proc/kcore", "/proc/sched_debug"):
        out = await sh(h, f"test -e {path} || exit 0; cat {path} | head -c 100")
        assert out.stdout == "", (path, out)
    for path in ("/proc/acpi", "/proc/scsi", "/sys/firmware"):
        out = await sh(
            h, f"test -e {path} || {{ echo absent; exit 0; }}; ls -A {path}; touch {path}/x"
        )
        assert out.stdout == "absent\n" or (out.stdout == "" and out.exit_code != 0), (path, out)


SYSCALLS = {
    # name: (x86_64 number, args)
    "mount": (165, (0, 0, 0, 0, 0)),
    "umount2": (166, (0, 0)),
    "pivot_root": (155, (0, 0)),
    "unshare(CLONE_NEWUSER)": (272, (0x10000000,)),
    "unshare(CLONE_NEWNS)": (272, (0x00020000,)),
    "setns": (308, (0, 0)),
    "keyctl(GET_KEYRING_ID)": (250, (0, -3, 1)),
    "add_key": (248, (0, 0, 0, 0, 0)),
    "request_key": (249, (0, 0, 0, 0)),
    "bpf": (321, (0, 0, 0)),
    "perf_event_open": (298, (0, 0, -1, -1, 0)),
    "userfaultfd": (323, (0,)),
    "kexec_load": (246, (0, 0, 0, 0)),
    "init_module": (175, (0, 0, 0)),
    "finit_module": (313, (-1, 0, 0)),
    "delete_module": (176, (0, 0)),
    "open_by_handle_at": (304, (0, 0, 0)),
    "swapon": (167, (0, 0)),
    "swapoff": (168, (0,)),
    "reboot": (169, (0, 0, 0, 0)),
    "acct": (163, (0,)),
    "quotactl": (179, (0, 0, 0, 0)),
    "syslog(READ_ALL)": (103, (3, 0, 0)),
    "iopl": (172, (3,)),
}


async def test_dangerous_syscalls_fail_with_eperm(sandbox):
    runtime, _, h = sandbox
    if runtime.name in OWN_KERNEL:
        pytest.skip(
            "gVisor serves these in its user-space kernel (unshare and syslog succeed there, "
            "against the sentry; others fail with ENOSYS/EACCES/ENODEV): not the host's surface"
        )
    script = (
        "import ctypes, json, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "out = {}\n"
        "for name, (nr, args) in json.loads(sys.argv[1]).items():\n"
        "    ctypes.set_errno(0)\n"
        "    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])\n"
        "    out[name] = [rc, ctypes.get_errno()]\n"
        "print(json.dumps(out))\n"
    )
    import json

    from rock_serve.protocol import ExecRequest

    result = await h.exec(
        ExecRequest(command=["python3", "-c", script, json.dumps(SYSCALLS)], timeout=60)
    )
    assert result.exit_code == 0, result
    got = json.loads(result.stdout)
    wrong = {k: v for k, v in got.items() if v != [-1, errno.EPERM]}
    assert wrong == {}


async def test_unshare_user_namespace_then_mount(sandbox):
    _, _, h = sandbox
    attack = await sh(h, "unshare -U -r sh -c 'mount -t tmpfs none /mnt && echo mounted'")
    assert attack.exit_code != 0 and "mounted" not in attack.stdout, attack
    attack = await sh(h, "mkdir -p /mnt && mount -t tmpfs none /mnt && echo mounted")
    assert attack.exit_code != 0 and "mounted" not in attack.stdout, attack


async def test_rocklet_cannot_be_traced_or_read(sandbox):
    runtime, _, h = sandbox
    if runtime.name == "gvisor":
        pytest.xfail(
            "gVisor lets sandbox code PTRACE_ATTACH the (non-dumpable) rocklet and stop it: "
            "seen here: the next command hangs until its timeout (that sandbox only)"
        )
    pid = (await h.ping())["pid"]
    script = (
        "import ctypes, os, sys\n"
        "pid = int(sys.argv[1])\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.ptrace.restype = ctypes.c_long\n"
        "rc = libc.ptrace(16, pid, None, None)\n"  # PTRACE_ATTACH
        "print('attach', rc, ctypes.get_errno())\n"
        "for what in ('mem', 'environ', 'fd/0'):\n"
        "    try:\n"
        "        with open('/proc/%d/%s' % (pid, what), 'rb') as f:\n"
        "            f.read(1)\n"
        "        print(what, 'read')\n"
        "    except OSError as e:\n"
        "        print(what, e.errno)\n"
    )
    from rock_serve.protocol import ExecRequest

    result = await h.exec(ExecRequest(command=["python3", "-c", script, str(pid)], timeout=30))
    assert result.stdout.splitlines() == [
        f"attach -1 {errno.EPERM}",
        f"mem {errno.EACCES}",
        f"environ {errno.EACCES}",
        f"fd/0 {errno.EACCES}",
    ], result
    # The rocklet was not stopped: it still answers.
    assert (await sh(h, "echo alive")).stdout == "alive\n"


async def test_killing_the_rocklet_fails_the_sandbox_never_a_dead_running_one(sandbox):
    runtime, sid, h = sandbox
    pid = (await h.ping())["pid"]
    await sh(h, f"(sleep 0.2; kill -9 {pid}) >/dev/null 2>&1 &")
    await h.wait_closed()
    info = await runtime.inspect(sid)
    assert info.state == SandboxState.FAILED, info
    assert info.reason is not None


async def test_device_nodes_cannot_reach_host_disks(sandbox):
    _, _, h = sandbox
    disk = (await sh(h, "cat /proc/partitions")).stdout.split()
    attack = await sh(
        h,
        "mknod /root/blk b 8 0 2>/dev/null || mknod /root/blk b 253 0; "
        "head -c 512 /root/blk | wc -c",
    )
    assert attack.stdout.strip() in ("", "0"), (attack, disk[:8])


@pytest.mark.parametrize("path", ["/dev/mem", "/dev/kmsg", "/dev/sda", "/dev/vda"])
async def test_no_host_device_is_there(sandbox, path):
    _, _, h = sandbox
    assert (await sh(h, f"test -e {path}")).exit_code != 0


async def test_sandbox_root_is_not_host_root(runtime):
    """Each sandbox's ids map to a host range of its own; files keep their owners inside."""
    if runtime.name != "bwrap":
        pytest.skip("docker's default (no userns-remap) keeps container root = host uid 0")
    from rock_serve.protocol import SandboxSpec
    from rock_serve.runtime._state import read_meta

    from .conftest import new_id

    bases = []
    for _ in range(2):
        sid = new_id()
        await runtime.create(sid, SandboxSpec())
        h = await runtime.start(sid)
        base = read_meta(os.path.join(runtime.state_dir, sid)).uid_base
        assert base is not None and base >= 65536
        bases.append(base)
        inside = await sh(h, "id -u; stat -c %u /etc/passwd /usr/bin; echo x > /root/mine")
        assert inside.stdout.split() == ["0", "0", "0"], inside
        await sh(h, "sleep 30 >/dev/null 2>&1 &")
        # On the host, no process of the sandbox runs as root: all run in its range.
        uids = set()
        for pid in runtime._cgroup(sid).pids():
            with open(f"/proc/{pid}/status") as f:
                line = next(x for x in f if x.startswith("Uid:"))
            uids.update(int(u) for u in line.split()[1:])
        assert uids and all(base <= u < base + 65536 for u in uids), (base, uids)
        upper = os.path.join(runtime._rw_dir(os.path.join(runtime.state_dir, sid)), "upper")
        assert os.stat(os.path.join(upper, "root", "mine")).st_uid == base
    assert bases[0] != bases[1]
