"""Thin ctypes wrappers over the Linux primitives the sandbox needs.

Python 3.11 has no ``os.unshare``/``os.setns``/``mount``; these call libc (or the raw syscall
where glibc has no wrapper) and raise :class:`OSError` with the real errno on failure.

Also here: a hand-written seccomp-BPF filter (x86_64) that denies the syscalls a sandboxed
process has no business making (namespaces, mounts, ptrace, kernel modules, bpf, ...), with
``EPERM`` so innocent code gets an ordinary exception; a foreign syscall ABI (x32, i386 via
``int 0x80``) kills the process with ``SIGSYS``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "SECCOMP_SUPPORTED",
    "SeccompFilter",
    "drop_bounding_set",
    "fork_bare",
    "install_seccomp",
    "mount",
    "pivot_root",
    "prctl",
    "seccomp_program",
    "set_dumpable",
    "set_no_new_privs",
    "set_pdeathsig",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
_NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWTIME
)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

_MACHINE = platform.machine()
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(_MACHINE)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long
_libc.fork.argtypes = []
_libc.fork.restype = ctypes.c_int


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def fork_bare() -> int:
    """``fork(2)`` without Python's fork machinery: no ``os.register_at_fork`` callbacks run
    (threading's, logging's, random's reseed...) and the child's interpreter state is not
    re-initialised. In a forked child of a large warm interpreter those callbacks alone
    touch ~200 copy-on-write pages. Only sound in a process that has a single thread (so no
    lock can be held by another thread at the fork); the caller does what the child needs
    (reseeding ``random``). Returns the child's pid, 0 in the child.
    """
    pid = int(_libc.fork())
    _check(pid, "fork")
    return pid


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(38, f"pivot_root: unsupported machine {_MACHINE}")
    ret = _libc.syscall(
        ctypes.c_long(_SYS_PIVOT_ROOT),
        ctypes.c_char_p(os.fsencode(new_root)),
        ctypes.c_char_p(os.fsencode(put_old)),
    )
    _check(ret, "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = int(_libc.prctl(option, arg2, arg3, arg4, arg5))
    _check(ret, f"prctl({option})")
    return ret


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_dumpable(flag: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(flag))


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_bounding_set(last_cap: int) -> None:
    """Drop every capability from the bounding set (needs CAP_SETPCAP, i.e. still root)."""
    for cap in range(last_cap + 1):
        # EINVAL for a capability this kernel does not know is harmless.
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() != 22:
            _check(-1, f"PR_CAPBSET_DROP {cap}")


# --------------------------------------------------------------------------- seccomp

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_EPERM = 1
_ENOSYS = 38

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_NR_CLONE = 56
_NR_CLONE3 = 435
_NR_PRCTL = 157

# x86_64 syscall numbers answered with EPERM.
_DENIED_X86_64: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "modify_ldt": 154,
    "pivot_root": 155,
    "adjtimex": 159,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "create_module": 174,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
}

SECCOMP_SUPPORTED = _MACHINE == "x86_64"


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program() -> bytes:
    """The filter as raw ``struct sock_filter`` array bytes (x86_64)."""
    denied = sorted(set(_DENIED_X86_64.values()))
    # Layout: 0 ld arch; 1 jeq x86_64 ? skip : kill; 2 ret kill; 3 ld nr; 4 jge x32 -> deny;
    # 5 jeq clone -> clone_check; 6 jeq clone3 -> enosys; 7 jeq prctl -> prctl_check;
    # 8.. jeq denied_i -> deny; allow; deny; enosys; clone_check (4); prctl_check (4).
    # (Classic BPF jumps only forward, so each check block has its own returns.)
    head = 8
    allow = head + len(denied)
    deny = allow + 1
    enosys = deny + 1
    clone_check = enosys + 1
    prctl_check = clone_check + 4

    def rel(at: int, target: int) -> int:
        off = target - at - 1
        if not 0 <= off <= 255:
            raise ValueError("seccomp jump out of range")
        return off

    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, 0),
        _insn(_JGE_K, rel(4, deny), 0, _X32_SYSCALL_BIT),
        _insn(_JEQ_K, rel(5, clone_check), 0, _NR_CLONE),
        _insn(_JEQ_K, rel(6, enosys), 0, _NR_CLONE3),
        _insn(_JEQ_K, rel(7, prctl_check), 0, _NR_PRCTL),
    ]
    for i, nr in enumerate(denied):
        prog.append(_insn(_JEQ_K, rel(head + i, deny), 0, nr))
    prog += [
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        # clone3 cannot be inspected (flags live in user memory): ENOSYS makes glibc fall
        # back to clone, whose flags we can check.
        _insn(_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),
        # clone_check: the low 32 bits of args[0] (the flags) are at offset 16.
        _insn(_LD_W_ABS, 0, 0, 16),
        _insn(_JSET_K, 1, 0, _NAMESPACE_FLAGS),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        # prctl_check: no PR_SET_DUMPABLE (a non-dumpable process hides its uid in /proc).
        _insn(_LD_W_ABS, 0, 0, 16),
        _insn(_JEQ_K, 1, 0, PR_SET_DUMPABLE),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, _RET_ERRNO | _EPERM),
    ]
    assert len(prog) == prctl_check + 4
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompFilter:
    """A filter program ready to install, in as many processes as wanted (prepared once: a
    forked child then makes a single call)."""

    def __init__(self, program: bytes) -> None:
        if not SECCOMP_SUPPORTED:
            raise OSError(38, f"seccomp filter: unsupported machine {_MACHINE}")
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._address = ctypes.addressof(self._fprog)

    def install(self) -> None:
        """Install it for this process and its descendants (needs no_new_privs)."""
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._address, 0, 0), "seccomp")


def install_seccomp(program: bytes) -> None:
    """Install ``program`` for this process and its descendants (needs no_new_privs)."""
    SeccompFilter(program).install()
