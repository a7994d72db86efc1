"""DeepSpeed's compiled ops (the CPU shared-memory collective, CPU Adam): where they build, and a stale-lock check.

torch builds an extension under TORCH_EXTENSIONS_DIR holding a `lock` file while it compiles; a build
killed half-way (Ctrl-C, SIGKILL, OOM) leaves the lock behind and every later build waits on it forever,
silently. So, before a learner starts:
- builds go to a folder of this Python installation's own (two virtualenvs do not rebuild in turn);
- a lock older than STALE_LOCK_S (a build takes about 2 minutes) is an error naming the file.
`python -m mispo.learner.op_build` builds the op ahead of time (scripts/install.sh runs it).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

STALE_LOCK_S = 600.0


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR if set, else ~/.cache/torch_extensions/mispo-<hash of sys.prefix>."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path(os.path.expanduser("~/.cache/torch_extensions")) / f"mispo-{tag}"


def check_stale_locks(root: Path, max_age_s: float = STALE_LOCK_S, now: float | None = None) -> None:
    """Raise if an extension build lock under `root` is older than `max_age_s` (its build died)."""
    now = time.time() if now is None else now
    for lock in sorted(root.glob("**/lock")):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build beside us (another learner rank) finished and removed it
            continue
        if age > max_age_s:
            raise RuntimeError(f"a DeepSpeed op build lock is {age / 60:.0f} minutes old: {lock}. An earlier build "
                               f"was interrupted and every learner would wait on it forever; fix: if no build is "
                               f"running on this machine, delete that file (rm {lock})")


def prepare_extension_builds() -> Path:
    """Point torch's extension builds at this installation's folder and check it for stale locks."""
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    if root.exists():
        check_stale_locks(root)
    return root


def build_cpu_ops() -> None:
    """Compile DeepSpeed's CPU ops now (otherwise the first learner that needs one does): the shared-memory
    collective (every CPU learner) and CPU Adam (resources.offload_optimizer)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prepare_extension_builds()
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
    CPUAdamBuilder().load(verbose=False)


if __name__ == "__main__":
    build_cpu_ops()
    print(f"mispo: DeepSpeed CPU ops built in {extensions_dir()}")
