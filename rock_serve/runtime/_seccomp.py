"""The default seccomp profile of sandboxes, compiled to BPF with libseccomp (through ctypes).

The profile matches what Docker's default profile refuses to a container with Docker's default
capabilities: everything is allowed except the syscalls below, which fail with ``EPERM``
(mount and the new mount API, module loading, kexec, keyrings, bpf, perf, userfaultfd,
swap, reboot, quotas, file handles, syslog, io_uring, namespace creation and joining:
``unshare``, ``setns`` and ``clone`` with any ``CLONE_NEW*`` flag), while ``clone3`` fails
with ``ENOSYS`` so that libc falls back to ``clone``, whose flags the filter can see (as
Docker does). ``ptrace`` stays allowed (as in Docker on kernels >= 4.8): the rocklet makes
itself non-dumpable, so sandbox code without ``CAP_SYS_PTRACE`` cannot trace it.
Syscalls of another architecture (32-bit ``int 0x80``, x32) kill the thread.

:func:`compile_profile` returns the raw ``struct sock_filter`` array that
``bwrap --seccomp FD`` loads; it is computed once per runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile

from rock_serve.errors import InvalidConfig

__all__ = ["BLOCKED_SYSCALLS", "CLONE_NAMESPACE_FLAGS", "compile_profile"]

#: Syscalls that fail with EPERM inside a sandbox (names unknown to this kernel are skipped).
BLOCKED_SYSCALLS: tuple[str, ...] = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pidfd_getfd",
    "pivot_root",
    "process_madvise",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
    "vm86",
    "vm86old",
)

#: ``clone`` flags that create namespaces (NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
#: NEWUSER, NEWPID, NEWNET): a ``clone`` with any of them fails with EPERM.
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x00000080,
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)

_ACT_ALLOW = 0x7FFF0000
_CMP_MASKED_EQ = 7


def _act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise InvalidConfig(
            f"seccomp: libseccomp is not installed ({exc}); apt-get install libseccomp2"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise InvalidConfig(f"seccomp: {what} failed: {os.strerror(-rc)}")


def compile_profile(blocked: tuple[str, ...] = BLOCKED_SYSCALLS) -> bytes:
    """Compile the default profile (``blocked`` fail with EPERM) to a BPF program.

    Raises:
        InvalidConfig: libseccomp is missing or refuses the filter.
    """
    lib = _load()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise InvalidConfig("seccomp: seccomp_init failed")
    try:
        none = ctypes.POINTER(_ArgCmp)()  # NULL: no argument filters
        for name in blocked:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall of this architecture
            _check(lib.seccomp_rule_add_array(ctx, _act_errno(errno.EPERM), nr, 0, none), name)
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in CLONE_NAMESPACE_FLAGS:
            cmp = _ArgCmp(0, _CMP_MASKED_EQ, flag, flag)
            _check(
                lib.seccomp_rule_add_array(
                    ctx, _act_errno(errno.EPERM), clone, 1, ctypes.byref(cmp)
                ),
                f"clone flag {flag:#x}",
            )
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _check(lib.seccomp_rule_add_array(ctx, _act_errno(errno.ENOSYS), clone3, 0, none), "")
        with tempfile.TemporaryFile() as out:
            _check(lib.seccomp_export_bpf(ctx, out.fileno()), "export")
            out.seek(0)
            program = out.read()
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8:
        raise InvalidConfig("seccomp: libseccomp produced no BPF program")
    return program
