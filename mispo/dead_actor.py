"""What a user reads when a process of the run dies and the run cannot continue (a learner lost to an OOM or a
preempted node): which role died and how, the last complete checkpoint, and the command that resumes from it,
instead of Ray's `ActorDiedError` traceback. (Restarting the role in place is not built: the run stops.)"""

from __future__ import annotations

import re
from pathlib import Path

ROLES = {"PolicyWorker": "the policy learner", "CriticWorker": "the critic learner",
         "TeacherWorker": "a teacher model", "RolloutWorker": "a rollout engine"}


class RunStopped(RuntimeError):
    """The run stopped on a failure it cannot recover from; the message says what to do."""


def describe(exc: BaseException, checkpoints: Path, resume_command: str) -> str:
    """One message for an actor's death: role, pid, Ray's reason, the last checkpoint and the resume command."""
    text = str(exc)
    cls = re.search(r"class_name: (\w+)", text)
    pid = re.search(r"pid[=:] ?(\d+)", text)
    why = re.search(r"(?:Worker exit detail|The actor is dead because)[: ]+([^\n]+)", text)
    role = ROLES.get(cls[1], cls[1]) if cls else "a process of the run"
    head = f"{role}{f' (pid {pid[1]})' if pid else ''} died: {why[1].strip() if why else text.splitlines()[0]}"
    from mispo.checkpoint_store import CheckpointStore

    found = CheckpointStore(checkpoints).latest() if checkpoints.exists() else None
    if found is None:
        return f"{head}. No checkpoint was saved yet ({checkpoints}), so there is nothing to resume; rerun the command " \
               "(trainer.save_every sets how often a run saves)"
    folder, state = found
    return f"{head}. The last complete checkpoint is step {state['step']} ({folder}); continue with: {resume_command}"
