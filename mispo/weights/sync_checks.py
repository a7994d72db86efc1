"""The name checks of every weight sync, on both sides of it (the probe that compares numbers is the loop's:
`mispo.loop.sync_guard`). A sync that leaves part of the engine at old weights raises no error in vLLM: names it
does not know are skipped, and layers that receive nothing keep their tensors.

1. Names (learner side, every sync): the tensors sent must be exactly the checkpoint's tensors, the ones the
   engine loaded at start-up, same names and shapes (`check_sent_names` against `checkpoint_shapes`).
2. Coverage (engine side, every sync, `rollout/weight_loader.py`) raises `WeightSyncError` too.
"""

from __future__ import annotations

from pathlib import Path


class WeightSyncError(RuntimeError):
    """A weight sync left (or would leave) the rollout engines with other weights than the learner's."""


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a checkpoint directory's safetensors files (headers only, no tensor is read)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def _few(names, count: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:count]) + (f" (and {len(names) - count} more)" if len(names) > count else "")


def check_sent_names(sent: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], family: str,
                     source: str) -> None:
    """Raise WeightSyncError unless `sent` ({name: shape} of one sync) has exactly the names and shapes of
    `expected` (the checkpoint the engines loaded, `source`)."""
    extra, missing = set(sent) - set(expected), set(expected) - set(sent)
    wrong = {n for n in set(sent) & set(expected) if tuple(sent[n]) != tuple(expected[n])}
    if not (extra or missing or wrong):
        return
    parts = []
    if extra:
        parts.append(f"{len(extra)} tensors the engine does not know: {_few(extra)}")
    if missing:
        parts.append(f"{len(missing)} checkpoint tensors not sent: {_few(missing)}")
    if wrong:
        parts.append("shapes differ: " + _few(f"{n} {tuple(sent[n])} vs {tuple(expected[n])}" for n in wrong))
    raise WeightSyncError(
        f"weight sync ({family} family): the learner's tensors are not the checkpoint's ({source}); "
        + "; ".join(parts) + ". vLLM would skip unknown names and keep those layers at their old weights; fix: "
        "the family's checkpoint_state must give the checkpoint's names (mispo.families)")
