"""First code to run inside a sandbox: lock the process down, then start the guest role.

Run as ``python -I boot.py '<json config>'``. In order: optional private tmpfs mounts (when the
backend gave us a mount namespace but no bind setup), resource limits, no_new_privs, dropping to
an unprivileged uid when started as root, a seccomp filter; then the role (``program``: run a
script as __main__; ``serve``: expose a function over RPC; ``check``: run tests against it).
Fails closed: if a requested protection cannot be applied, exit with status 121 and a message.

This file runs with only the standard library; it must not import mispo.
"""

import ctypes
import ctypes.util
import json
import os
import resource
import sys

GUEST_DIR = os.path.dirname(os.path.abspath(__file__))
EXIT_SETUP_FAILED = 121


def _die(msg):
    sys.stderr.write("sandbox setup failed: %s\n" % msg)
    sys.stderr.flush()
    os._exit(EXIT_SETUP_FAILED)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mount_private_tmp(paths, size_bytes):
    """Mount a fresh size-limited tmpfs on each of ``paths`` (needs a private mount namespace)."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    # Stop mount events propagating back to the host: MS_REC | MS_PRIVATE on /.
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
        _die("cannot make mounts private: errno %d" % ctypes.get_errno())
    for path in paths:
        if not os.path.isdir(path):
            continue
        opts = ("size=%d,mode=1777" % size_bytes).encode()
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0x2 | 0x4 | 0x8, opts) != 0:  # nosuid,nodev,noexec
            _die("cannot mount tmpfs on %s: errno %d" % (path, ctypes.get_errno()))


def set_limits(lim):
    """Apply rlimits; as root both soft and hard limits, so the guest cannot raise them."""
    mb = 1024 * 1024
    cpu = int(lim["cpu_s"] + 0.999)
    pairs = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_FSIZE, (lim["file_size_mb"] * mb,) * 2),
        (resource.RLIMIT_NPROC, (lim["max_processes"],) * 2),
        (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    for res, (soft, hard) in pairs:
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError) as exc:
            _die("setrlimit(%s): %s" % (res, exc))


def no_new_privs():
    if _libc().prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        _die("prctl(PR_SET_NO_NEW_PRIVS) failed")


def drop_root(uid):
    """Become ``uid`` (no supplementary groups); verify that no capability is left."""
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as exc:
        _die("cannot drop to uid %d: %s" % (uid, exc))
    if os.getuid() == 0 or os.geteuid() == 0:
        _die("still root after setuid")
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:") and int(line.split()[1], 16) != 0:
                _die("capabilities remain after dropping root: " + line.strip())


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "unshare", "setns",
    "pivot_root", "chroot", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "userfaultfd", "acct", "quotactl", "name_to_handle_at", "open_by_handle_at",
    "iopl", "ioperm", "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree", "personality",
    "mount_setattr", "syslog", "settimeofday", "clock_settime", "sethostname", "setdomainname",
)
CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                  0x40000000)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET


def install_seccomp():
    """Deny kernel interfaces sandboxed code never needs; only AF_UNIX sockets. Needs libseccomp."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        name = ctypes.util.find_library("seccomp")  # slow: runs ldconfig
        try:
            lib = ctypes.CDLL(name or "libseccomp.so", use_errno=True)
        except OSError:
            _die("libseccomp not found (apt-get install libseccomp2, or seccomp=False)")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ctx = lib.seccomp_init(allow)
    if not ctx:
        _die("seccomp_init failed")

    def rule(action, sysname, *cmps):
        nr = lib.seccomp_syscall_resolve_name(sysname.encode())
        if nr < 0:
            return  # not on this architecture / libseccomp version
        arr = (_ArgCmp * len(cmps))(*cmps) if cmps else None
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc != 0:
            _die("seccomp rule for %s failed (%d)" % (sysname, rc))

    for sysname in DENY:
        rule(eperm, sysname)
    rule(eperm, "socket", _ArgCmp(0, 1, 1, 0))  # socket(domain != AF_UNIX) -> EPERM
    rule(eperm, "socketpair", _ArgCmp(0, 1, 1, 0))
    for flag in CLONE_NS_FLAGS:  # no new namespaces from clone(); clone3 hides its flags: ENOSYS
        rule(eperm, "clone", _ArgCmp(0, 7, flag, flag))
    rule(enosys, "clone3")
    if lib.seccomp_load(ctx) != 0:
        _die("seccomp_load failed")
    lib.seccomp_release(ctx)


def harden(cfg):
    if cfg.get("private_tmp"):
        mount_private_tmp(cfg["private_tmp"], cfg["limits"]["scratch_mb"] * 1024 * 1024)
    set_limits(cfg["limits"])
    no_new_privs()
    if cfg.get("uid") is not None and os.getuid() == 0:
        drop_root(cfg["uid"])
    if cfg.get("seccomp"):
        install_seccomp()
    os.umask(0o077)
    if cfg.get("cwd"):
        os.chdir(cfg["cwd"])


def main():
    cfg = json.loads(sys.argv[1])
    # Started with -I -S: add site-packages by hand, without running .pth files.
    sys.path.extend(p for p in cfg.get("site_paths", ()) if p not in sys.path)
    job = cfg.get("job")
    # Read the job's files before hardening: some backends hide the host's /tmp afterwards.
    cfg["files"] = {}
    if job:
        for name in os.listdir(job):
            with open(os.path.join(job, name), encoding="utf-8") as fh:
                cfg["files"][name] = fh.read()
    # Import our own guest code (and, where the uid drop may hide the Python install, common
    # standard modules) while still able to read it; untrusted code runs only after harden().
    sys.path.insert(0, GUEST_DIR)
    import roles  # noqa: E402

    sys.path.remove(GUEST_DIR)
    for name in cfg.get("preimport", ()):
        try:
            __import__(name)
        except ImportError:
            pass
    harden(cfg)
    if cfg["role"] == "probe":
        print(json.dumps({"uid": os.getuid(), "pid": os.getpid()}))
        return
    sys.set_int_max_str_digits(0)
    roles.run(cfg)


if __name__ == "__main__":
    main()
