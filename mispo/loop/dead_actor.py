"""What a user reads when a process of the run dies and the run cannot continue (a learner lost to an OOM or a
preempted node): which role died and how, the last complete checkpoint, and the command that resumes from it,
instead of Ray's `ActorDiedError` traceback. The trainer first restarts dead learners from the last checkpoint
(`Trainer.restart_learners`, up to trainer.max_restarts); this is what the user reads past that."""

from __future__ import annotations

import re
from pathlib import Path

ROLES = {"PolicyWorker": "the policy learner", "CriticWorker": "the critic learner",
         "TeacherWorker": "a teacher model", "RolloutWorker": "a rollout engine"}


class RunStopped(RuntimeError):
    """The run stopped on a failure it cannot recover from; the message says what to do."""


def role_of(exc: BaseException) -> str | None:
    """The actor class whose death Ray reports in `exc` (PolicyWorker, ...), or that a CallTimedOut names;
    None when it names none."""
    if getattr(exc, "role", None):
        return exc.role
    found = re.search(r"class_name: (\w+)", str(exc))
    return found[1] if found else None


def what_died(exc: BaseException) -> str:
    """"the policy learner (pid 4242) died: <Ray's reason>", or "the policy learner hung: ..." for a call past
    its time limit (mispo.infra.call_timeout)."""
    text = str(exc)
    if getattr(exc, "role", None):
        return f"{ROLES.get(exc.role, exc.role)} hung: {text}"
    cls, pid = role_of(exc), re.search(r"pid[=:] ?(\d+)", text)
    why = re.search(r"Worker exit detail: ([^.\n]+)", text) or re.search(r"The actor is dead because ([^.\n]+)", text)
    role = ROLES.get(cls, cls) if cls else "a process of the run"
    return f"{role}{f' (pid {pid[1]})' if pid else ''} died: {why[1].strip() if why else text.splitlines()[0]}"


def describe(exc: BaseException, checkpoints: Path, resume_command: str) -> str:
    """One message for an actor's death: role, pid, Ray's reason, the last checkpoint and the resume command."""
    head = what_died(exc)
    from mispo.weights.checkpoint_store import CheckpointStore

    found = CheckpointStore(checkpoints).latest() if checkpoints.exists() else None
    if found is None:
        return (f"{head}. No checkpoint was saved yet ({checkpoints}), so there is nothing to resume; rerun the "
                "command (trainer.save_every sets how often a run saves)")
    folder, state = found
    return f"{head}. The last complete checkpoint is step {state['step']} ({folder}); continue with: {resume_command}"
