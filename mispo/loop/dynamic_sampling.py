"""DAPO's dynamic sampling: a group (the samples of one prompt) whose rewards are all equal has zero
group-relative advantage and teaches nothing; drop it and draw more prompts until the step holds
`target` groups again, with at most `max_refills` extra draws.

    rollouts, metrics = fill_batch(rollouts, target, max_refills, draw_more)

`draw_more(count, first_group)` generates and scores `count` more prompts (group ids from
`first_group` on) and returns them as [(domain, samples)].
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable


def informative(rollouts: list[tuple]) -> tuple[list[tuple], int]:
    """[(domain, samples)] without the groups whose samples all have the same reward; (kept, dropped groups)."""
    kept, dropped = [], 0
    for domain, samples in rollouts:
        groups: dict[int, list] = defaultdict(list)
        for s in samples:
            groups[s.group].append(s)
        live = {g for g, members in groups.items() if len({m.reward for m in members}) > 1}
        dropped += len(groups) - len(live)
        kept.append((domain, [s for s in samples if s.group in live]))
    return kept, dropped


def group_count(rollouts: list[tuple]) -> int:
    return len({s.group for _, samples in rollouts for s in samples})


def fill_batch(rollouts: list[tuple], target: int, max_refills: int,
               draw_more: Callable[[int, int], list[tuple]]) -> tuple[list[tuple], dict]:
    """Keep informative groups, refill up to `target` groups (extra groups of the last draw are cut,
    so a full step has exactly `target`); metrics: dropped groups, refills, the groups trained on, and
    dynamic_sampling/cap_reached = 1 when the step ends short of `target`."""
    kept, dropped = informative(rollouts)
    refills = 0
    while group_count(kept) < target and refills < max_refills:
        next_group = 1 + max((s.group for _, samples in rollouts for s in samples), default=-1)
        more = draw_more(target - group_count(kept), next_group)
        rollouts = rollouts + more
        fresh, lost = informative(more)
        dropped += lost
        kept = _merge(kept, fresh)
        refills += 1
    kept = _first_groups(kept, target)
    groups = group_count(kept)
    return kept, {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/refills": float(refills),
                  "dynamic_sampling/groups": float(groups), "dynamic_sampling/cap_reached": float(groups < target)}


def no_variance_streak(in_a_row: int, max_refills: int, limit: int = 3) -> str:
    """The warning for a step skipped because not one group, after all `max_refills` refills, had reward
    variance (the `in_a_row`-th such step in a row); at `limit` in a row it raises instead: the reward is
    constant or the task out of the policy's reach, and drawing more will not change that."""
    if in_a_row >= limit:
        raise RuntimeError(f"algorithm.dynamic_sampling: {in_a_row} steps in a row ({in_a_row * (max_refills + 1)} "
                           "draws, with algorithm.dynamic_sampling.max_refills refills each) found no prompt whose "
                           "samples got different rewards, so there is nothing to train on; the reward may be "
                           "constant (check reward.plugins on a few completions) or the task out of the policy's "
                           "reach (every answer wrong, or every answer right); fix: the reward or the data, or "
                           "algorithm.dynamic_sampling: null to train on every group")
    return (f"no group had reward variance after algorithm.dynamic_sampling.max_refills = {max_refills} refills; "
            f"the step is drawn again ({in_a_row} of {limit} such steps in a row before the run stops)")


def _merge(a: list[tuple], b: list[tuple]) -> list[tuple]:
    """Samples of the same domain together, domains in first-seen order."""
    out: dict = {}
    for domain, samples in a + b:
        out.setdefault(id(domain), (domain, []))[1].extend(samples)
    return list(out.values())


def _first_groups(rollouts: list[tuple], target: int) -> list[tuple]:
    """Only the first `target` groups (in the order they were drawn)."""
    order = sorted({s.group for _, samples in rollouts for s in samples})[:target]
    keep = set(order)
    return [(domain, [s for s in samples if s.group in keep]) for domain, samples in rollouts]
