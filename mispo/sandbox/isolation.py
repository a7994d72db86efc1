"""Choose how sandboxed processes are isolated, and build the command line that starts one.

Backends, strongest first (``MISPO_SANDBOX=auto|bwrap|unshare|none`` overrides the choice):

- ``bwrap``   bubblewrap: new pid/net/ipc/uts(/user when not root) namespaces, an empty root with
              read-only binds of /usr, /etc and the Python installation only, tmpfs /sandbox,
              /tmp and /dev/shm of ``scratch_mb``, killed with its parent.
- ``unshare`` util-linux unshare: the same namespaces, the host filesystem visible but private
              tmpfs over /tmp, /var/tmp and /dev/shm; writes elsewhere are stopped only by the
              unprivileged uid (when root) or the user's own permissions.
- ``none``    no namespaces: rlimits, seccomp and (as root) an unprivileged uid only. Network and
              the filesystem are NOT isolated; chosen only with a loud warning.

Every backend then runs ``guest/boot.py``, which applies rlimits, no_new_privs, the uid drop
(when root) and seccomp before any untrusted code.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GUEST_DIR = str(Path(__file__).resolve().parent / "guest")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
BACKENDS = ("bwrap", "unshare", "none")


class SandboxUnavailable(RuntimeError):
    """The requested isolation backend does not work on this machine."""


@dataclass(frozen=True)
class Layout:
    """Where the guest sees its files: boot script, job files and writable working directory."""

    boot: str
    job: str
    cwd: str


def _python_roots() -> list[str]:
    roots = {sys.base_prefix, sys.prefix, sys.exec_prefix,
             str(Path(os.path.realpath(sys.executable)).parent.parent)}
    keep = []
    for root in sorted(roots):
        if any(root == d or root.startswith(d + "/") for d in SYSTEM_DIRS):
            continue
        if not any(root.startswith(k + "/") for k in keep):
            keep.append(root)
    return keep


def _bwrap_argv(job_dir: str, limits, as_root: bool) -> tuple[list[str], Layout]:
    scratch = str(limits.scratch_mb * 1024 * 1024)
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not as_root:
        argv.append("--unshare-user")
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    parents = set()
    for root in _python_roots():
        argv += ["--ro-bind", root, root]
        parent = os.path.dirname(root)
        while parent not in ("/", ""):
            parents.add(parent)
            parent = os.path.dirname(parent)
    for parent in sorted(parents):  # bwrap copies host modes of parents (e.g. /root 0700)
        argv += ["--chmod", "0755", parent]
    argv += ["--ro-bind", GUEST_DIR, "/sbx", "--ro-bind", job_dir, "/job",
             "--proc", "/proc", "--dev", "/dev"]
    for tmp in ("/sandbox", "/tmp", "/dev/shm"):
        argv += ["--size", scratch, "--perms", "1777", "--tmpfs", tmp]
    argv += ["--chdir", "/sandbox", "--"]
    return argv, Layout(boot="/sbx/boot.py", job="/job", cwd="/sandbox")


def _unshare_argv(job_dir: str, scratch_dir: str, as_root: bool) -> tuple[list[str], Layout]:
    argv = ["unshare", "--pid", "--net", "--ipc", "--uts", "--mount", "--fork", "--kill-child",
            "--mount-proc", "--propagation", "private"]
    if not as_root:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv, Layout(boot=os.path.join(GUEST_DIR, "boot.py"), job=job_dir, cwd="/tmp")


def guest_command(backend: str, cfg: dict, *, job_dir: str, scratch_dir: str, limits
                  ) -> list[str]:
    """Full argv for one guest. Fills ``cfg`` with the paths, uid and tmp mounts it needs."""
    as_root = os.geteuid() == 0
    if backend == "bwrap":
        prefix, layout = _bwrap_argv(job_dir, limits, as_root)
    elif backend == "unshare":
        prefix, layout = _unshare_argv(job_dir, scratch_dir, as_root)
        cfg["private_tmp"] = ["/tmp", "/var/tmp", "/dev/shm"]
    elif backend == "none":
        prefix, layout = [], Layout(boot=os.path.join(GUEST_DIR, "boot.py"), job=job_dir,
                                    cwd=scratch_dir)
    else:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")
    if as_root and backend != "bwrap" and not _world_readable(sys.base_prefix):
        cfg["preimport"] = PREIMPORT  # the unprivileged uid cannot read this Python install
    if as_root:
        # A fresh uid per process: RLIMIT_NPROC then counts only this sandbox's processes,
        # and sandboxes cannot signal or read each other.
        cfg.setdefault("uid", 1_000_000 + secrets.randbelow(1_000_000_000))
    cfg.update(job=layout.job, cwd=layout.cwd, limits=limits.to_guest(), site_paths=_site_paths())
    return prefix + [sys.executable, "-I", "-S", layout.boot, json.dumps(cfg)]


PREIMPORT = ("re", "math", "collections", "itertools", "functools", "heapq", "bisect", "string",
             "random", "typing", "fractions", "decimal", "statistics", "copy", "operator",
             "hashlib", "json", "datetime", "array", "io", "dataclasses", "enum", "contextlib")


def _world_readable(path: str) -> bool:
    """Whether every directory on the way to ``path`` lets others in."""
    p = os.path.realpath(path)
    while p not in ("/", ""):
        try:
            if not os.stat(p).st_mode & 0o001:
                return False
        except OSError:
            return False
        p = os.path.dirname(p)
    return True


def _site_paths() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def guest_env(cwd: str) -> dict[str, str]:
    """Minimal environment for guests (no host secrets, single-threaded numeric libraries)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": "/tmp",
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = "1"
    return env


def _probe(backend: str) -> str | None:
    """Run a trivial guest under ``backend``; return None if it works, else why not."""
    from mispo.sandbox.limits import Limits

    if backend == "bwrap" and not shutil.which("bwrap"):
        return "bwrap not found (apt-get install bubblewrap)"
    if backend == "unshare" and not shutil.which("unshare"):
        return "unshare not found (apt-get install util-linux)"
    with tempfile.TemporaryDirectory(prefix="mispo-probe-") as tmp:
        job = os.path.join(tmp, "job")
        scratch = os.path.join(tmp, "scratch")
        os.mkdir(job)
        os.mkdir(scratch)
        os.chmod(tmp, 0o755)
        os.chmod(job, 0o755)
        os.chmod(scratch, 0o1777)
        cfg = {"role": "probe", "seccomp": True}
        argv = guest_command(backend, cfg, job_dir=job, scratch_dir=scratch, limits=Limits())
        try:
            out = subprocess.run(argv, capture_output=True, timeout=30, env=guest_env("/tmp"),
                                 start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{type(exc).__name__}: {exc}"
        if out.returncode != 0:
            return (out.stderr.decode(errors="replace").strip() or f"exit {out.returncode}")[-500:]
        info = json.loads(out.stdout.decode().strip().splitlines()[-1])
        if os.geteuid() == 0 and info.get("uid") == 0:
            return "guest still ran as root"
    return None


_lock = threading.Lock()
_chosen: dict[str, str] = {}


def select_backend(requested: str | None = None) -> str:
    """The backend to use: ``requested`` or ``$MISPO_SANDBOX`` or the strongest that works.

    Raises SandboxUnavailable if an explicitly requested backend does not work. Falling back
    below ``bwrap`` logs and warns loudly (once per process).
    """
    want = (requested or os.environ.get("MISPO_SANDBOX") or "auto").strip().lower()
    if want not in BACKENDS + ("auto",):
        raise SandboxUnavailable(f"MISPO_SANDBOX={want!r} is not one of auto, {', '.join(BACKENDS)}")
    with _lock:
        if want in _chosen:
            return _chosen[want]
        if want != "auto":
            why = _probe(want)
            if why:
                raise SandboxUnavailable(f"sandbox backend '{want}' does not work here: {why}")
            _chosen[want] = want
            if want != "bwrap":
                _warn(want, {})
            return want
        reasons = {}
        for backend in BACKENDS:
            why = _probe(backend)
            if why is None:
                _chosen[want] = backend
                if backend != "bwrap":
                    _warn(backend, reasons)
                return backend
            reasons[backend] = why
        raise SandboxUnavailable(f"no sandbox backend works here: {reasons}")


def _warn(backend: str, reasons: dict) -> None:
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    what = ("the host filesystem is visible and only /tmp, /var/tmp, /dev/shm are private"
            if backend == "unshare" else
            "NO network or filesystem isolation, only rlimits/seccomp/uid")
    msg = (f"mispo sandbox: running untrusted code with the weaker '{backend}' backend ({what})"
           + (f" because {detail}" if detail else "")
           + ". Install bubblewrap (apt-get install bubblewrap) for full isolation.")
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
