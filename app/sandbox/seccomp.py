"""A seccomp-bpf filter for sandbox processes: no new processes, no exec, no sockets, no signals to others,
no file writes or creations, no namespace or privilege changes. Denied calls fail with EPERM.

Built by hand with ctypes (no libseccomp needed); x86_64 and aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

_COMMON_DENIED = (
    "clone clone3 execve execveat socket socketpair connect bind listen accept accept4 sendto sendmsg "
    "kill tkill tgkill ptrace process_vm_readv process_vm_writev mkdirat mknodat unlinkat symlinkat linkat "
    "renameat renameat2 fchmodat fchownat fchmod fchown truncate ftruncate mount umount2 pivot_root chroot "
    "unshare setns setuid setgid setreuid setregid setresuid setresgid setgroups reboot kexec_load "
    "init_module finit_module delete_module bpf perf_event_open io_uring_setup io_uring_enter "
    "io_uring_register personality keyctl add_key request_key userfaultfd openat2 memfd_create"
).split()

_SYSCALLS = {
    "x86_64": {
        "open": 2, "openat": 257, "creat": 85, "fork": 57, "vfork": 58, "clone": 56, "clone3": 435,
        "execve": 59, "execveat": 322, "socket": 41, "socketpair": 53, "connect": 42, "bind": 49,
        "listen": 50, "accept": 43, "accept4": 288, "sendto": 44, "sendmsg": 46, "kill": 62, "tkill": 200,
        "tgkill": 234, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "mkdir": 83,
        "rmdir": 84, "rename": 82, "link": 86, "unlink": 87, "symlink": 88, "chmod": 90, "chown": 92,
        "lchown": 94, "mknod": 133, "mkdirat": 258, "mknodat": 259, "fchownat": 260, "unlinkat": 263,
        "renameat": 264, "linkat": 265, "symlinkat": 266, "fchmodat": 268, "renameat2": 316, "fchmod": 91,
        "fchown": 93, "truncate": 76, "ftruncate": 77, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "unshare": 272, "setns": 308, "setuid": 105, "setgid": 106, "setreuid": 113,
        "setregid": 114, "setresuid": 117, "setresgid": 119, "setgroups": 116, "reboot": 169,
        "kexec_load": 246, "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
        "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "personality": 135, "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323,
        "openat2": 437, "memfd_create": 319,
    },
    "aarch64": {
        "openat": 56, "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "socket": 198,
        "socketpair": 199, "bind": 200, "listen": 201, "accept": 202, "connect": 203, "sendto": 206,
        "sendmsg": 211, "accept4": 242, "kill": 129, "tkill": 130, "tgkill": 131, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "mkdirat": 34, "mknodat": 33, "unlinkat": 35,
        "symlinkat": 36, "linkat": 37, "renameat": 38, "renameat2": 276, "fchmodat": 53, "fchownat": 54,
        "fchmod": 52, "fchown": 55, "truncate": 45, "ftruncate": 46, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268, "setuid": 146, "setgid": 144,
        "setreuid": 145, "setregid": 143, "setresuid": 147, "setresgid": 149, "setgroups": 159,
        "reboot": 142, "kexec_load": 104, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "bpf": 280, "perf_event_open": 241, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "personality": 92, "keyctl": 219, "add_key": 217, "request_key": 218,
        "userfaultfd": 282, "openat2": 437, "memfd_create": 279,
    },
}
_X86_ONLY_DENIED = "fork vfork creat mkdir rmdir rename link unlink symlink chmod chown lchown mknod".split()

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_EPERM = 0x00050000 | errno.EPERM
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def build_filter(machine: str) -> bytes:
    """The BPF program, as packed sock_filter structs, for a machine ("x86_64" or "aarch64")."""
    numbers = _SYSCALLS[machine]
    denied = list(_COMMON_DENIED) + (_X86_ONLY_DENIED if machine == "x86_64" else [])
    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":  # the x32 ABI would bypass every number below
        prog += [_insn(_JGE_K, 0, 1, 0x40000000), _insn(_RET_K, 0, 0, _RET_EPERM)]
    for name in denied:
        prog += [_insn(_JEQ_K, 0, 1, numbers[name]), _insn(_RET_K, 0, 0, _RET_EPERM)]
    # open/openat are allowed read-only: inspect the flags argument.
    flag_args = [("openat", 2)] + ([("open", 1)] if machine == "x86_64" else [])
    for name, arg in flag_args:
        prog += [
            _insn(_JEQ_K, 0, 4, numbers[name]),
            _insn(_LD_W_ABS, 0, 0, 16 + 8 * arg),  # low 32 bits of args[arg] (little endian)
            _insn(_JSET_K, 0, 1, _WRITE_FLAGS),
            _insn(_RET_K, 0, 0, _RET_EPERM),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
        ]
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter() -> bool:
    """Install the filter on the calling process (irreversible). False where the machine is unsupported."""
    machine = platform.machine()
    if machine not in _SYSCALLS:
        return False
    program = build_filter(machine)
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0)
