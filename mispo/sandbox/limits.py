"""Resource limits of one sandboxed process, and the result of running one."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    """Per-process limits. ``wall_s`` is enforced by the host (kill of the whole tree); the rest
    are rlimits set inside the sandbox before any untrusted code runs."""

    wall_s: float = 10.0          # wall-clock time, then the process tree is killed
    cpu_s: float = 10.0           # RLIMIT_CPU (SIGXCPU / SIGKILL)
    memory_mb: int = 1024         # RLIMIT_AS, address space per process
    max_processes: int = 32       # RLIMIT_NPROC (processes + threads of the sandbox's uid)
    file_size_mb: int = 16        # RLIMIT_FSIZE: largest file written, stdout/stderr included
    open_files: int = 256         # RLIMIT_NOFILE
    scratch_mb: int = 64          # size of each writable tmpfs (/sandbox, /tmp, /dev/shm)
    max_output_bytes: int = 1 << 20  # how much stdout / stderr the host reads back

    def to_guest(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "Limits":
        return Limits(**{**asdict(self), **changes})


@dataclass
class RunResult:
    """Outcome of one sandboxed process. ``returncode`` < 0 means killed by that signal."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    backend: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out
