"""Partial rollouts: single-turn generation in segments, so weight syncs land mid-generation.

    samples = generate_partial(group, requests, n=8, temperature=1.0, top_p=1.0, max_new_tokens=512,
                               segment_tokens=64, seed=step_seed)

With `rollout.partial_rollout_tokens: k`, every sequence is generated k tokens at a time: each segment is
one `RolloutGroup.generate` call over the sequences still running (prompt + the tokens so far, sent as
`continue_ids`, one sample each). Ray runs a worker's calls in the order they are submitted, so a weight
sync submitted while a segment runs is applied before the next one: the unfinished sequences continue
under the new weights (re-reading their tokens so far with them) instead of holding the sync back for a
whole generation or being thrown away.

Each token records the version of the weights that sampled it (`Sample.token_versions`) and its log-prob
under the distribution it was sampled from (`Sample.rollout_logprobs`): the behaviour policy of token t is
version token_versions[t], which is what the per-token corrections of MIS-PO, TIS and IcePop compare
pi_old against. `Sample.version` is the oldest token's version, so the staleness bound
(`mispo.loop.staleness`) holds for every token of a trained sample.

Seeds: segment k of sample j of the request with group g uses seed `seed + k * N + g * n + j` (N = the
call's requests x n), distinct per segment and sample, independent of how requests split over workers.
"""

from __future__ import annotations

from mispo.batch import Sample


def generate_partial(rollout, requests: list[dict], n: int, temperature: float, top_p: float, max_new_tokens: int,
                     segment_tokens: int, seed: int | None = None,
                     after_segment=None, max_model_len: int | None = None) -> list[Sample]:
    """n samples per request, request-major, generated `segment_tokens` at a time (module docstring).
    `after_segment(k)` is called after segment k returns (tests use it to sync weights in between).
    `max_model_len`: the engines' context (rollout.max_model_len); a sequence that fills it is finished
    ("length"), since the engine refuses a prompt that leaves no room for one more token."""
    if segment_tokens < 1:
        raise ValueError(f"rollout.partial_rollout_tokens = {segment_tokens} must be >= 1")
    # one running sequence per (request, sample): its sample id, tokens, log-probs, versions so far
    groups = [r.get("group", 0) for r in requests]
    running = [{"request": req, "id": g * n + j, "ids": [], "logprobs": [], "versions": [], "text": "",
                "finish": None} for req, g in zip(requests, groups) for j in range(n)]
    total = len(running)
    segment = 0
    while active := [s for s in running if s["finish"] is None]:
        budget = min(segment_tokens, max_new_tokens - len(active[0]["ids"]))  # every active one has the same count
        calls = [{**s["request"], "group": s["id"], "continue_ids": list(s["ids"])} for s in active]
        outs = rollout.generate(calls, n=1, temperature=temperature, top_p=top_p, max_new_tokens=budget,
                                seed=None if seed is None else seed + segment * total)
        for s, out in zip(active, outs):
            s["ids"] += out.response_ids
            s["logprobs"] += out.rollout_logprobs
            s["versions"] += [out.version] * len(out.response_ids)
            s["text"] = out.response_text
            if _finished(out, s, budget, max_new_tokens, max_model_len):
                s["finish"] = out.finish_reason
        if after_segment is not None:
            after_segment(segment)
        segment += 1
    return [_sample(s) for s in running]


def _finished(out: Sample, seq: dict, budget: int, max_new_tokens: int, max_model_len: int | None) -> bool:
    """Is `seq` done after this segment's `out`? The model stopped, max_new_tokens is spent, the engine's
    context ended the segment early, or it is full (prompt + response = max_model_len: another segment
    would be a prompt the engine rejects)."""
    length = len(seq["request"]["prompt_ids"]) + len(seq["ids"])
    return (out.finish_reason == "stop" or len(seq["ids"]) >= max_new_tokens or len(out.response_ids) < budget
            or (max_model_len is not None and length >= max_model_len))


def _sample(seq: dict) -> Sample:
    req = seq["request"]
    return Sample(prompt_ids=list(req["prompt_ids"]), response_ids=seq["ids"], rollout_logprobs=seq["logprobs"],
                  loss_mask=[1] * len(seq["ids"]), finish_reason=seq["finish"], group=req.get("group", 0),
                  row=req.get("row", {}), prompt_text=req.get("prompt_text", ""), response_text=seq["text"],
                  version=min(seq["versions"], default=0), token_versions=seq["versions"])

