"""The planner: each role's per-GPU memory against its budget, the verdict, and the changes that would
make a role fit (see the package docstring for the roles and the budgets)."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mispo.config import Recipe, RecipeError, load_recipe
from mispo.plan.comm import StepTraffic, all_to_all_bytes, expert_sync_bytes, forward_zero_bytes, zero_bytes
from mispo.plan.memory import (activation_bytes, expert_parallel_state_bytes, host_memory_bytes,
                               kv_bytes_per_sequence, kv_bytes_per_token, model_state_bytes, rollout_weight_bytes)
from mispo.plan.shape import ModelShape, load_model_config, model_shape
from mispo.plan.step_time import (DEFAULT_INPUTS, Engines, LearnerWork, StepTimeInputs, forward_flops,
                                  generation_seconds, learner_seconds, link_bandwidth, step_summary, train_flops)
from mispo.plan.units import GiB, fmt_count, fmt_gib, fmt_kib

USABLE_FRACTION = 0.9  # of a GPU's memory, for the learners
ROLLOUT_RESERVE_GIB = 2.0  # vLLM's activations, sampler and CUDA graphs (it profiles them at start-up)
MAX_GPUS_SEARCHED = 4096


@dataclass
class RolePlan:
    """One role's per-GPU memory (bytes), its budget, the verdict and what would fix it."""

    role: str
    gpus: int  # 0 = CPU run
    parts: dict[str, float]  # weights, ref_weights, grads, optimizer, activations, kv_cache
    budget: float
    fits: bool
    detail: str = ""
    fixes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    recipe: str | None
    model: dict[str, Any]
    resources: dict[str, Any]
    roles: list[RolePlan]
    notes: list[str]
    step_time: dict[str, Any] | None = None  # predicted seconds per step per layout (GPU runs; step_time.py)

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.roles)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: sizes in GiB (2^30 bytes) with the raw bytes alongside."""
        roles = []
        for r in self.roles:
            d = asdict(r)
            d["total"] = r.total
            d["parts_gib"] = {k: round(v / GiB, 3) for k, v in r.parts.items()}
            d["total_gib"], d["budget_gib"] = round(r.total / GiB, 3), round(r.budget / GiB, 3)
            roles.append(d)
        return {"recipe": self.recipe, "fits": self.fits, "model": self.model, "resources": self.resources,
                "roles": roles, "notes": self.notes, "step_time": self.step_time}


@dataclass
class _Ctx:
    """What the role planners share."""

    recipe: Recipe
    shape: ModelShape
    cpu_run: bool
    budget: float  # learner budget per GPU (or per machine on a CPU run)
    dtype_bytes: int
    seq_len: int
    tokens: int  # tokens in one packed micro-batch


def _learner_parts(ctx: _Ctx, params: int, gpus: int, zero_stage: int, offload: bool, checkpointing: bool,
                   logits: bool, ep: int = 1, expert_offload: bool | None = None) -> dict[str, float]:
    """Model states (ZeRO over `gpus`; with ep > 1 the routed experts resident, num_experts / ep per GPU, their
    optimizer sharded over the gpus / ep replicas and in host memory with `expert_offload`, None = the recipe's
    learner.expert_optimizer_offload) and the activations of one micro-batch."""
    r, shape = ctx.recipe, ctx.shape
    bf16, gpn = r.model.dtype == "bfloat16", r.resources.gpus_per_node
    if ep > 1:
        eo = r.learner.expert_optimizer_offload if expert_offload is None else expert_offload
        states = expert_parallel_state_bytes(params, shape.routed_params, shape.largest_dense_layer_params, gpus, ep,
                                             zero_stage, bf16, offload, gpn, expert_offload=eo)
    else:
        states = model_state_bytes(params, shape.largest_layer_params, gpus, zero_stage, bf16=bf16, offload=offload,
                                   gpus_per_node=gpn)
    states["activations"] = activation_bytes(ctx.shape, ctx.tokens, ctx.dtype_bytes, checkpointing, logits)
    return states


def _reference_bytes(ctx: _Ctx, gpus: int, zero_stage: int) -> float:
    """The frozen reference's weights on each actor GPU: P b, divided by N under ZeRO-3."""
    full = ctx.shape.learner_params * ctx.dtype_bytes
    return full / max(gpus, 1) if zero_stage == 3 else full


def _learner_total(ctx: _Ctx, role: str, gpus: int, zero_stage: int, offload: bool,
                   checkpointing: bool, ep: int = 1, expert_offload: bool | None = None) -> tuple[float, float]:
    """(GPU bytes per GPU, host bytes per node) of a learner role under the given settings."""
    parts = _learner_parts(ctx, _role_params(ctx, role), gpus, zero_stage, offload, checkpointing, role == "actor",
                           ep, expert_offload)
    host = parts.pop("host")
    extra = _reference_bytes(ctx, gpus, zero_stage) if role == "actor" and ctx.recipe.learner.reference else 0.0
    return sum(parts.values()) + extra, host


def _learner_fits(ctx: _Ctx, role: str, gpus: int, zero_stage: int, offload: bool, checkpointing: bool,
                  ep: int = 1, expert_offload: bool | None = None, fraction: float = 1.0) -> bool:
    """GPU total within `fraction` of the budget, and offloaded states within resources.cpu_memory_gb (when set)."""
    gpu, host = _learner_total(ctx, role, gpus, zero_stage, offload, checkpointing, ep, expert_offload)
    cpu = ctx.recipe.resources.cpu_memory_gb
    return gpu <= fraction * ctx.budget and not (cpu and host > cpu * GiB)


def _role_params(ctx: _Ctx, role: str) -> int:
    """Critic = the backbone (lm_head included) plus a Linear(hidden, 1) value head."""
    return ctx.shape.learner_params + (ctx.shape.hidden + 1 if role == "critic" else 0)


def _min_gpus(ctx: _Ctx, role: str, zero_stage: int, offload: bool, checkpointing: bool, ep: int = 1,
              expert_offload: bool | None = None) -> int | None:
    """Fewest GPUs (a multiple of ep, up to MAX_GPUS_SEARCHED) with which the role fits; None when none does.
    The total only falls as GPUs are added, so a binary search (over multiples of ep) finds it."""
    def fits(k: int) -> bool:
        return _learner_fits(ctx, role, k * ep, zero_stage, offload, checkpointing, ep, expert_offload)

    top = MAX_GPUS_SEARCHED // ep
    if not fits(top):
        return None
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo * ep


def _round_to_nodes(n: int, gpus_per_node: int, multiple: int = 1) -> int:
    """n rounded up to whole nodes (when it spans more than one) and to a multiple of `multiple`."""
    n = n if n <= gpus_per_node or not gpus_per_node else math.ceil(n / gpus_per_node) * gpus_per_node
    return math.ceil(n / multiple) * multiple


def _ep_options(ctx: _Ctx, role: str) -> list[int]:
    """Expert-parallel sizes the actor's fix search tries: with EP on, 1, the recipe's, and its 2x, 4x, 8x that
    divide the expert count (resident experts shrink only with a larger EP); with EP off, 1 only."""
    ep = ctx.recipe.learner.expert_parallel if role == "actor" else 1
    if ep == 1:
        return [1]
    return [1] + [ep * m for m in (1, 2, 4, 8) if ctx.shape.num_experts % (ep * m) == 0]


def learner_fixes(ctx: _Ctx, role: str, gpus: int) -> list[str]:
    """Up to three changes that make the role fit, fewest extra GPUs and fewest changed settings first:
    every combination of {ZeRO-3, gradient checkpointing, optimizer offload} (and, with expert parallelism,
    of expert-parallel sizes) with the fewest GPUs it needs."""
    r = ctx.recipe
    stage, ckpt, offload = r.learner.zero_stage, r.model.gradient_checkpointing, r.resources.offload_optimizer
    ep_now = r.learner.expert_parallel if role == "actor" else 1
    eo_now = r.learner.expert_optimizer_offload
    key = f"resources.{role}_gpus"
    if ctx.cpu_run:
        options = [] if ckpt else ["model.gradient_checkpointing=true"]
        return options + ["lower learner.micro_batch_tokens", "a GPU cluster (resources.gpus_per_node, "
                          f"{key}); run `mispo plan` again to size it"]
    found = []
    for s, c, o, e, x in itertools.product(sorted({stage, 3}), sorted({ckpt, True}), sorted({offload, True}),
                                           _ep_options(ctx, role), sorted({eo_now, True})):
        if e == 1 and x != eo_now:  # the experts' offload exists with expert parallelism only
            continue
        x = x and e > 1
        n = _min_gpus(ctx, role, s, o, c, e, x)
        if n is None:
            continue
        changes = ([f"learner.zero_stage={s}"] * (s != stage)
                   + ["model.gradient_checkpointing=true"] * (c != ckpt)
                   + ["resources.offload_optimizer=true"] * (o != offload)
                   + [f"learner.expert_parallel={e}"] * (e != ep_now)
                   + [f"learner.expert_optimizer_offload={str(x).lower()}"] * (x != eo_now))
        need = max(_round_to_nodes(n, r.resources.gpus_per_node, e), math.ceil(gpus / e) * e)
        if need > gpus:
            changes.append(f"{key}={need}")
        total = _learner_total(ctx, role, need, s, o, c, e, x)[0]
        found.append((need > gpus, need, len(changes), " + ".join(changes), total))
    found.sort()
    out = [f"{text}: {fmt_gib(total)} per GPU" for _, _, _, text, total in found[:3] if text]
    if not out:
        out.append(f"no layout up to {MAX_GPUS_SEARCHED} GPUs fits; lower learner.micro_batch_tokens (now "
                   f"{ctx.tokens} tokens per micro-batch) or use GPUs with more memory (resources.gpu_memory_gb)")
    return out


def step_traffic(ctx: _Ctx, gpus: int) -> StepTraffic:
    """The policy update's work per GPU per step: every sequence at max_model_len (an upper bound), packed
    micro_batch_tokens // max_model_len to a micro-batch, one epoch over learner.actor_mini_batches."""
    r = ctx.recipe
    sequences = math.ceil(r.rollout.prompts_per_step * r.rollout.n_samples / gpus)
    per_micro = max(ctx.tokens // ctx.seq_len, 1)
    return StepTraffic(gpus=gpus, micro_batches=math.ceil(sequences / per_micro), tokens=sequences * ctx.seq_len,
                       optimizer_steps=r.learner.actor_mini_batches,
                       passes=3 if r.model.gradient_checkpointing else 2, dtype_bytes=ctx.dtype_bytes)


EP_HEADROOM = 0.8  # an EP layout the planner proposes leaves 20% of the learner budget free: the all-to-all
# buffers of uneven routing (a hot expert's rank receives more than its share of tokens) and allocator fragmentation


def _ep_comm(ctx: _Ctx, t: StepTraffic, ep: int) -> dict[str, float]:
    """Bytes one actor GPU sends per step (mispo/plan/comm.py): ZeRO alone (ep 1) or EP + ZeRO."""
    shape, stage = ctx.shape, ctx.recipe.learner.zero_stage
    if ep == 1:
        return {"zero": zero_bytes(shape.learner_params, stage, t), "all_to_all": 0.0, "expert_sync": 0.0}
    moe = shape.moe_layers
    return {"zero": zero_bytes(shape.learner_params - shape.routed_params, stage, t),
            "all_to_all": all_to_all_bytes(shape.hidden, moe[0].top_k, len(moe), ep, t),
            "expert_sync": expert_sync_bytes(shape.routed_params, ep, t)}


def choose_ep_layout(ctx: _Ctx, gpus: int) -> dict[str, Any] | None:
    """The actor's expert-parallel layout the planner proposes (the recipe's ZeRO stage, checkpointing and
    resources.offload_optimizer kept): the fewest GPUs, from the recipe's actor GPUs up in whole nodes, at which
    an EP size that divides the expert count and the GPUs fits within EP_HEADROOM of the learner budget (and
    its offloaded states within resources.cpu_memory_gb); at that count, keeping the recipe's
    learner.expert_optimizer_offload first, then the least communication per GPU per step, then the smaller EP.
    The experts' sharded optimizer costs 16 routed / N bytes per GPU whatever EP is (`memory.
    expert_parallel_state_bytes`): more GPUs or the host offload shrink it, a larger EP shrinks the resident
    weights and gradients (4 routed / EP). {gpus, expert_parallel, expert_data_parallel, expert_offload,
    memory, comm}, or None when nothing up to MAX_GPUS_SEARCHED fits."""
    r, shape = ctx.recipe, ctx.shape
    stage, ckpt, offload = r.learner.zero_stage, r.model.gradient_checkpointing, r.resources.offload_optimizer
    now = r.learner.expert_optimizer_offload
    sizes = [e for e in range(2, shape.num_experts + 1) if shape.num_experts % e == 0]
    gpn = max(r.resources.gpus_per_node, 1)
    counts = [gpus] + list(range((gpus // gpn + 1) * gpn, MAX_GPUS_SEARCHED + 1, gpn))
    for n in counts:
        found = []
        for x in (now, not now):
            for e in sizes:
                if n % e or not _learner_fits(ctx, "actor", n, stage, offload, ckpt, e, x, EP_HEADROOM):
                    continue
                comm = _ep_comm(ctx, step_traffic(ctx, n), e)
                found.append((x != now, sum(comm.values()), e, x, comm))
        if found:
            _, _, e, x, comm = min(found, key=lambda f: f[:3])
            memory = _learner_total(ctx, "actor", n, stage, offload, ckpt, e, x)[0]
            return {"gpus": n, "expert_parallel": e, "expert_data_parallel": n // e, "expert_offload": x,
                    "memory": memory, "comm": comm}
    return None


def _layout_name(stage: int, ep: int, dp: int, offload: bool, gpus: int, recipe_gpus: int) -> str:
    if ep == 1:
        return f"ZeRO-{stage}"
    return (f"EP{ep} x EDP{dp} + ZeRO-{stage}" + (", expert optimizer on host" if offload else "")
            + (f", {gpus} GPUs" if gpus != recipe_gpus else ""))


def layout_comparison(ctx: _Ctx, gpus: int, ep: int) -> dict[str, Any]:
    """The actor with the recipe's ZeRO alone (EP 1), with the routed experts resident over `ep` ranks (EDP =
    expert data parallel, the gpus / ep replicas of each expert block sharing its optimizer states), and the
    layout `choose_ep_layout` proposes when it differs ("proposed": its own GPU count, EP size and experts'
    offload): memory per GPU and communication per GPU per training step (mispo/plan/comm.py)."""
    r, shape = ctx.recipe, ctx.shape
    stage, ckpt, offload = r.learner.zero_stage, r.model.gradient_checkpointing, r.resources.offload_optimizer
    now = r.learner.expert_optimizer_offload
    t = step_traffic(ctx, gpus)
    rows = []
    for e in (1, ep):
        x = now and e > 1
        total = _learner_total(ctx, "actor", gpus, stage, offload, ckpt, e, x)[0]
        comm = _ep_comm(ctx, t, e)
        rows.append({"expert_parallel": e, "layout": _layout_name(stage, e, gpus // e, x, gpus, gpus),
                     "configured": e == r.learner.expert_parallel, "memory_per_gpu": total,
                     "fits": total <= ctx.budget, "comm_per_gpu_step": sum(comm.values()), "comm": comm,
                     "experts_per_gpu": shape.num_experts // e if e > 1 else shape.num_experts,
                     "gpus": gpus, "expert_data_parallel": gpus // e, "expert_offload": x, "proposed": False})
    best = choose_ep_layout(ctx, gpus)
    if best and (best["expert_parallel"], best["gpus"], best["expert_offload"]) != (ep, gpus, now):
        e, n, x = best["expert_parallel"], best["gpus"], best["expert_offload"]
        rows.append({"expert_parallel": e, "layout": _layout_name(stage, e, n // e, x, n, gpus) + " (proposed)",
                     "configured": False, "memory_per_gpu": best["memory"], "fits": True,
                     "comm_per_gpu_step": sum(best["comm"].values()), "comm": best["comm"],
                     "experts_per_gpu": shape.num_experts // e, "gpus": n, "expert_data_parallel": n // e,
                     "expert_offload": x, "proposed": True})
    elif best:
        rows[-1]["proposed"] = True
    return {"traffic": asdict(t), "layouts": rows, "proposed": best}


def step_time_plan(ctx: _Ctx, layouts: list[dict[str, Any]], critic: bool,
                   inputs: StepTimeInputs = DEFAULT_INPUTS) -> dict[str, Any]:
    """Predicted seconds per RL step of the recipe for each actor layout (layout_comparison's rows: name,
    expert_parallel e (1 = the recipe's ZeRO alone, e > 1 = EP e + ZeRO), gpus, configured), from
    mispo/plan/step_time.py at `inputs` (H100 SXM constants; the recipe's gpus_per_node and gpu_memory_gb).
    Lengths: every sample = inputs.prompt_tokens + response_fraction x max_new_tokens (the recipe gives only
    caps). Phases: generation on the rollout engines (on the actor's
    GPUs with resources.colocate); the actor's forward-only passes (pi_old when actor_mini_batches > 1, the
    reference with learner.reference); the actor's update; the critic (values forward + update; the trainer runs
    it beside the actor's passes, so the learners take max(actor, critic) per phase); the refit (learner rank 0
    gathers the weights under ZeRO-3 and broadcasts them: 1-2 x P b over the link). The optimizer step (CPU
    Adam under resources.offload_optimizer) is not counted."""
    from dataclasses import replace

    r, res, shape = ctx.recipe, ctx.recipe.resources, ctx.shape
    hw = replace(inputs.hardware, gpus_per_node=res.gpus_per_node, memory_bytes=res.gpu_memory_gb * GiB)
    inputs = replace(inputs, hardware=hw)
    gpn, b = res.gpus_per_node, ctx.dtype_bytes
    prompt = min(inputs.prompt_tokens, max(ctx.seq_len - r.rollout.max_new_tokens, 1))
    max_response = min(r.rollout.max_new_tokens, ctx.seq_len - prompt)
    mean_response = inputs.response_fraction * max_response
    seq = prompt + mean_response
    sequences = r.rollout.prompts_per_step * r.rollout.n_samples
    tokens = sequences * seq
    stage, ckpt = r.learner.zero_stage, r.model.gradient_checkpointing

    def traffic(gpus: int, optimizer_steps: int, passes: int) -> StepTraffic:
        per_gpu = math.ceil(sequences / gpus)
        per_micro = max(ctx.tokens // math.ceil(seq), 1)
        return StepTraffic(gpus=gpus, micro_batches=math.ceil(per_gpu / per_micro), tokens=int(per_gpu * seq),
                           optimizer_steps=optimizer_steps, passes=passes, dtype_bytes=b)

    moe = shape.moe_layers
    # pi_old (the trainer fuses it into the update only with one mini-batch, no reference, no band filters)
    # and the reference: forward-only passes of the actor before its update
    fused = (r.learner.actor_mini_batches == 1 and not r.learner.reference
             and not r.algorithm.policy_loss.startswith("mispo"))
    fwd_passes = int(not fused) + int(r.learner.reference)
    rows = []
    for layout in layouts:
        e, n_a = layout["expert_parallel"], layout["gpus"]
        t_up = traffic(n_a, r.learner.actor_mini_batches, 3 if ckpt else 2)
        t_fwd = replace(t_up, passes=1)
        dense = shape.learner_params - (shape.routed_params if e > 1 else 0)
        a2a = all_to_all_bytes(shape.hidden, moe[0].top_k, len(moe), e, t_up) if e > 1 else 0.0
        update = LearnerWork(gpus=n_a, flops=train_flops(shape, tokens, seq, ckpt),
                                overlapped=[(zero_bytes(dense, stage, t_up), n_a)], all_to_all=[(a2a, e)],
                                serial=[(expert_sync_bytes(shape.routed_params, e, t_up) if e > 1 else 0.0,
                                         n_a // e)])
        fwd = LearnerWork(gpus=n_a, flops=forward_flops(shape, tokens, seq),
                             overlapped=[(forward_zero_bytes(dense, stage, t_fwd), n_a)],
                             all_to_all=[(all_to_all_bytes(shape.hidden, moe[0].top_k, len(moe), e, t_fwd)
                                          if e > 1 else 0.0, e)])
        up = learner_seconds(update, inputs, gpn)
        rows.append({"expert_parallel": e, "layout": layout["layout"], "configured": layout["configured"],
                     "actor_gpus": n_a, "update": up["total"], "update_parts": up,
                     "logprobs": fwd_passes * learner_seconds(fwd, inputs, gpn)["total"]})
    critic_s = values_s = 0.0
    if critic:
        n_c = res.critic_gpus
        t_c = traffic(n_c, r.learner.critic_mini_batches, 3 if ckpt else 2)
        no_head = 2 * shape.vocab * shape.hidden * tokens  # the value head replaces the lm_head
        params = _role_params(ctx, "critic")
        values = LearnerWork(gpus=n_c, flops=forward_flops(shape, tokens, seq) - no_head,
                                overlapped=[(forward_zero_bytes(params, stage, replace(t_c, passes=1)), n_c)])
        train = LearnerWork(gpus=n_c,
                               flops=train_flops(shape, tokens, seq, ckpt) - (4 if ckpt else 3) * no_head,
                               overlapped=[(zero_bytes(params, stage, t_c), n_c)])
        values_s = learner_seconds(values, inputs, gpn)["total"]
        critic_s = values_s + learner_seconds(train, inputs, gpn)["total"]
    tp, dp = res.rollout_tensor_parallel, res.rollout_data_parallel
    gen = None
    for row in rows:
        n_a = row["actor_gpus"]
        engine_gpus = n_a if res.colocate else res.rollout_gpus
        engines = Engines(count=max(engine_gpus // (tp * dp), 1), tp=tp, dp=dp,
                             expert_parallel=res.rollout_expert_parallel, sequences=sequences, prompt_tokens=prompt,
                             mean_response=mean_response, max_response=max_response,
                             memory_utilization=r.rollout.gpu_memory_utilization, dtype_bytes=b,
                             kv_bytes=_kv_dtype_bytes(r, b))
        gen = generation_seconds(shape, engines, inputs, gpn)
        sync_group = n_a + (0 if res.colocate else res.rollout_gpus)
        refit = (2 if stage == 3 else 1) * shape.total_params * b / link_bandwidth(sync_group, inputs, gpn)
        gpus = n_a + (res.critic_gpus if critic else 0) + (0 if res.colocate else res.rollout_gpus)
        overlap = r.trainer.mode == "async" and not res.colocate
        phases = {"generation": gen["seconds"], "logprobs": row["logprobs"], "update": row["update"],
                  "critic": critic_s, "refit": refit}
        # the trainer runs the actor's and the critic's forward passes together, then their updates together
        learner = max(row["logprobs"], values_s) + max(row["update"], critic_s - values_s)
        row |= step_summary(phases, tokens, gpus, overlap, learner)
    return {"inputs": {"hardware": hw.name, "peak_tflops": hw.peak_flops / 1e12, "train_mfu": inputs.train_mfu,
                       "hbm_tb_s": hw.hbm_bandwidth / 1e12, "decode_hbm_efficiency": inputs.decode_hbm_efficiency,
                       "nvlink_gb_s": hw.nvlink_bandwidth / 1e9, "ib_gb_s": hw.ib_bandwidth / 1e9,
                       "link_efficiency": inputs.link_efficiency},
            "sequences": sequences, "prompt_tokens": prompt, "mean_response": mean_response,
            "max_response": max_response, "tokens": tokens, "async": r.trainer.mode == "async" and not res.colocate,
            "can_overlap": not res.colocate,  # colocated engines share the learners' GPUs: no async overlap
            "generation": {k: gen[k] for k in ("decode_steps", "batch", "concurrency", "step", "prefill")},
            "layouts": rows}


def _ep_candidate(ctx: _Ctx, gpus: int) -> int:
    """The EP size to compare against when the recipe has none: the largest within one node that divides the
    expert count and the GPUs (0 when there is none)."""
    gpn, experts = ctx.recipe.resources.gpus_per_node, ctx.shape.num_experts
    return max((e for e in range(2, gpn + 1) if experts % e == 0 and gpus % e == 0), default=0)


def plan_learner(ctx: _Ctx, role: str) -> RolePlan:
    """The actor or critic learner: ZeRO model states + activations (+ the reference on the actor); the
    actor's routed experts resident over learner.expert_parallel ranks when that is > 1 (a GPU run)."""
    r = ctx.recipe
    gpus = 0 if ctx.cpu_run else (r.resources.actor_gpus if role == "actor" else r.resources.critic_gpus)
    stage, ckpt = r.learner.zero_stage, r.model.gradient_checkpointing
    offload = r.resources.offload_optimizer
    ep = r.learner.expert_parallel if role == "actor" and not ctx.cpu_run and gpus else 1
    parts = _learner_parts(ctx, _role_params(ctx, role), gpus, stage, offload, ckpt, role == "actor", ep)
    host = parts.pop("host")
    layers = activation_bytes(ctx.shape, ctx.tokens, ctx.dtype_bytes, ckpt, logits=False)
    if role == "actor" and r.learner.reference:
        parts["ref_weights"] = _reference_bytes(ctx, gpus, stage)
    where = "on CPU" if ctx.cpu_run else f"over {gpus} GPUs"
    eo = ep > 1 and r.learner.expert_optimizer_offload
    experts = (f" + {ctx.shape.num_experts // ep} of {ctx.shape.num_experts} routed experts resident per GPU "
               f"(EP{ep}; the {gpus // ep} GPUs holding the same experts share their optimizer states, 1/{gpus // ep} "
               f"each{', in host memory' if eo else ''})" if ep > 1 else "")
    detail = (f"ZeRO-{stage} {where}{experts}, {ctx.tokens} tokens per micro-batch, gradient checkpointing "
              f"{'on' if ckpt else 'off'}" + (", optimizer offloaded" + (f" (DeepSpeed's; the experts' {'too' if eo else 'stays on the GPU'})" if ep > 1 else "")
                                               if offload and stage >= 1 else "")
              + (", with the frozen reference" if "ref_weights" in parts else "")
              + f"; activations = {fmt_gib(layers)} layers" + (f" + {fmt_gib(parts['activations'] - layers)} log-prob head"
                                                          if role == "actor" else ""))
    plan = RolePlan(role, gpus, parts, ctx.budget, fits=False, detail=detail,
                    extra={"params": _role_params(ctx, role)})
    if not ctx.cpu_run and gpus == 0:
        plan.parts = {}
        plan.detail = "no GPUs assigned"
        plan.fixes = [f"resources.{role}_gpus = N (run `mispo plan` to size it)"]
        return plan
    plan.fits = plan.total <= ctx.budget
    compare = ep if ep > 1 else _ep_candidate(ctx, gpus)
    if role == "actor" and not ctx.cpu_run and ctx.shape.num_experts and compare:
        plan.extra["expert_parallel"] = layout_comparison(ctx, gpus, compare)
    if host:
        plan.extra["host_gib_per_node"] = round(host / GiB, 1)
        cpu = r.resources.cpu_memory_gb
        plan.detail += (f"; host memory for offload ~{host / GiB:,.0f} GiB per node (DeepSpeed's estimate"
                        + (" + the experts' sharded states, 16 bytes x routed / N per GPU)" if eo else ")"))
        if cpu and host > cpu * GiB:
            plan.fits = False
            plan.detail += f" > resources.cpu_memory_gb = {cpu:g}"
    if not plan.fits:
        plan.fixes = learner_fixes(ctx, role, gpus)
    return plan


def _kv_dtype_bytes(recipe: Recipe, dtype_bytes: int) -> int:
    kv = str(recipe.rollout.engine_kwargs.get("kv_cache_dtype", "auto"))
    return 1 if kv.startswith("fp8") else dtype_bytes


def _rollout_memory(ctx: _Ctx, tp: int, dp: int, ep: bool, util: float, gpu_bytes: float) -> dict[str, float]:
    """Per GPU: engine budget, weights, reserve, KV pool, sequences / tokens of KV it holds."""
    shape = ctx.shape
    budget = util * gpu_bytes
    weights = rollout_weight_bytes(shape, tp, dp, ep, ctx.dtype_bytes)
    reserve = min(ROLLOUT_RESERVE_GIB * GiB, 0.1 * budget) if ctx.cpu_run else ROLLOUT_RESERVE_GIB * GiB
    kv_pool = max(budget - weights - reserve, 0.0)
    kv_b = _kv_dtype_bytes(ctx.recipe, ctx.dtype_bytes)
    per_seq = kv_bytes_per_sequence(shape.layers, ctx.seq_len, tp, kv_b)
    sequences = int(kv_pool // per_seq) if per_seq else 0
    return {"budget": budget, "weights": weights, "reserve": reserve, "kv_pool": kv_pool, "per_seq": per_seq,
            "sequences": sequences, "tokens": sequences * ctx.seq_len,
            "uncapped_tokens": int(kv_pool // sum(kv_bytes_per_token(l, tp, kv_b) for l in shape.layers))}


def rollout_fixes(ctx: _Ctx, gpu_bytes: float) -> list[str]:
    """The two smallest engines (tensor x data parallel, experts sharded over both) that hold the weights and
    at least one sequence's KV; then a higher gpu_memory_utilization."""
    res, util = ctx.recipe.resources, ctx.recipe.rollout.gpu_memory_utilization
    heads = [layer.num_heads for layer in ctx.shape.layers]
    found = []
    for tp in (1, 2, 4, 8, 16, 32, 64):
        if any(h % tp for h in heads):
            continue
        for dp, ep in ((1, False), (1, True)):  # vllm.LLM (the rollout workers' engine) runs no data parallel
            m = _rollout_memory(ctx, tp, dp, ep, util, gpu_bytes)
            if m["sequences"] < 1:
                continue
            text = f"resources.rollout_tensor_parallel={tp}"
            if ep:
                text += f" + resources.rollout_data_parallel={dp} + resources.rollout_expert_parallel=true"
            per = "data-parallel rank" if dp > 1 else "engine"
            text += (f": weights {fmt_gib(m['weights'])} per GPU, KV room for {m['sequences']} sequences per {per} "
                     f"(rollout_gpus a multiple of {tp * dp})")
            found.append((tp * dp, ep, -m["sequences"], text))
    out = [text for *_, text in sorted(found)[:2]]
    if util < 0.9:
        m = _rollout_memory(ctx, res.rollout_tensor_parallel, res.rollout_data_parallel,
                            res.rollout_expert_parallel, 0.9, gpu_bytes)
        if m["sequences"] >= 1:
            out.append(f"rollout.gpu_memory_utilization=0.9: KV room for {m['sequences']} sequences")
    return out or ["more GPUs per engine than this search tried, or GPUs with more memory"]


def _kv_per_token_text(ctx: _Ctx, tp: int, kv_bytes: int) -> tuple[str, dict[str, float]]:
    """'KV per token per GPU: X on the full layers + Y on the sliding layers (capped at W)' and the numbers."""
    full = [layer for layer in ctx.shape.layers if not layer.window]
    swa = [layer for layer in ctx.shape.layers if layer.window]
    sums = {"full": sum(kv_bytes_per_token(layer, tp, kv_bytes) for layer in full),
            "sliding": sum(kv_bytes_per_token(layer, tp, kv_bytes) for layer in swa)}
    text = f"KV per token per {'worker' if ctx.cpu_run else 'GPU'}: {fmt_kib(sums['full'])} on {len(full)} full layers"
    if swa:
        text += f" + {fmt_kib(sums['sliding'])} on {len(swa)} sliding layers (capped at {swa[0].window} tokens)"
    return text, sums


def plan_rollout(ctx: _Ctx) -> RolePlan:
    """The rollout engines: weights per GPU, a runtime reserve, and the KV cache in what is left of
    gpu_memory_utilization x the GPU; fits when the KV pool holds at least one max_model_len sequence."""
    r, res = ctx.recipe, ctx.recipe.resources
    if ctx.cpu_run:
        tp, dp, ep, gpu_bytes = 1, 1, False, host_memory_bytes()
    else:
        tp, dp, ep = res.rollout_tensor_parallel, res.rollout_data_parallel, res.rollout_expert_parallel
        gpu_bytes = res.gpu_memory_gb * GiB
    m = _rollout_memory(ctx, tp, dp, ep, r.rollout.gpu_memory_utilization, gpu_bytes)
    engines = r.rollout.num_workers if ctx.cpu_run else res.rollout_gpus // (tp * dp)
    per_token, sums = _kv_per_token_text(ctx, tp, _kv_dtype_bytes(r, ctx.dtype_bytes))
    layout = "CPU" if ctx.cpu_run else f"TP{tp}" + (f" x DP{dp}" if dp > 1 else "") + (" +EP" if ep else "")
    detail = (f"{engines} engine(s), {layout}; {per_token}; one {ctx.seq_len}-token sequence = "
              f"{fmt_gib(m['per_seq'])}; KV holds {m['sequences']} such sequences = {m['tokens']:,} tokens per engine"
              + (" (per data-parallel rank)" if dp > 1 else ""))
    extra = {k: m[k] for k in ("per_seq", "sequences", "tokens", "uncapped_tokens")}
    extra |= {"engines": engines, "kv_bytes_per_token": sums}
    parts = {"weights": m["weights"], "activations": m["reserve"], "kv_cache": m["kv_pool"]}
    plan = RolePlan("rollout", 0 if ctx.cpu_run else res.rollout_gpus, parts, m["budget"],
                    fits=m["sequences"] >= 1, detail=detail, extra=extra)
    if not plan.fits:
        plan.fixes = rollout_fixes(ctx, gpu_bytes)
        return plan
    demand = math.ceil(r.rollout.prompts_per_step * r.rollout.n_samples / max(engines, 1))
    plan.extra["sequences_per_engine_per_step"] = demand
    if m["sequences"] * dp < demand:
        plan.detail += (f"; each engine gets {demand} sequences per step, so vLLM runs them in waves "
                        "(more rollout GPUs or engine_kwargs.kv_cache_dtype=fp8 raise concurrency)")
    return plan


def _notes(ctx: _Ctx, critic: bool) -> list[str]:
    r, res, shape = ctx.recipe, ctx.recipe.resources, ctx.shape
    notes = []
    if shape.mtp_params:
        notes.append(f"the learners hold the {fmt_count(shape.mtp_params)} MTP parameters too (counted); the "
                     "rollout engines serve the main model only")
    gather = 4 * shape.largest_layer_params
    if r.learner.zero_stage == 3 and gather > GiB:
        notes.append(f"ZeRO-3 gathers whole modules: the largest holds {fmt_count(shape.largest_layer_params)} "
                     f"parameters (4 bytes each in DeepSpeed's estimate: {fmt_gib(gather)} per GPU, in 'weights')")
    if r.learner.reference and not ctx.cpu_run and r.learner.zero_stage == 3:
        notes.append("the frozen reference is a ZeRO-3 inference engine: 1/N of its parameters per actor GPU "
                     "('+ref'), its modules gathered one at a time in its forward")
    if r.learner.expert_parallel > 1 and ctx.cpu_run:
        notes.append(f"learner.expert_parallel = {r.learner.expert_parallel} on a CPU run: the CPU plan counts "
                     "one process and ignores the expert split")
    if r.algorithm.kl_coef > 0 and not r.learner.reference:
        notes.append("algorithm.kl_coef > 0 needs learner.reference: true")
    if r.rollout.max_new_tokens > ctx.seq_len:
        notes.append(f"rollout.max_new_tokens = {r.rollout.max_new_tokens} exceeds the engine's max_model_len = "
                     f"{ctx.seq_len}; set rollout.max_model_len")
    if not ctx.cpu_run:
        engines = res.rollout_gpus // (res.rollout_tensor_parallel * res.rollout_data_parallel)
        if r.rollout.num_workers != engines:
            notes.append(f"rollout.num_workers = {r.rollout.num_workers} but the resources make {engines} engines")
        tp_kwarg = r.rollout.engine_kwargs.get("tensor_parallel_size")
        if tp_kwarg and tp_kwarg != res.rollout_tensor_parallel:
            notes.append(f"rollout.engine_kwargs.tensor_parallel_size = {tp_kwarg} differs from "
                         f"resources.rollout_tensor_parallel = {res.rollout_tensor_parallel}")
        if res.rollout_tensor_parallel * res.rollout_data_parallel > res.gpus_per_node:
            notes.append("one rollout engine spans nodes; keep tensor parallelism within a node")
        if critic is False and res.critic_gpus:
            notes.append(f"resources.critic_gpus = {res.critic_gpus} but the recipe trains no critic")
        unused = res.nodes * res.gpus_per_node - res.actor_gpus - res.critic_gpus - res.rollout_gpus
        if unused:
            notes.append(f"{unused} GPUs are not assigned to any role")
    return notes


def check_expert_parallel(recipe: Recipe, shape: ModelShape) -> None:
    """learner.expert_parallel must divide the model's routed experts and the policy learner's ranks
    (the rule of models/step3p5/expert_parallel.check_divides); RecipeError naming the field and the sizes that do."""
    from mispo.models.step3p5.expert_parallel import check_divides

    ep = recipe.learner.expert_parallel
    if ep == 1:
        return
    if not shape.num_experts:
        raise RecipeError(f"learner.expert_parallel = {ep} needs a model with routed experts; {shape.name} has none; "
                          "fix: remove learner.expert_parallel")
    gpu_run = recipe.resources.gpus_per_node > 0
    ranks, field_name = ((recipe.resources.actor_gpus, "resources.actor_gpus") if gpu_run
                         else (recipe.learner.ranks, "learner.ranks"))
    try:
        check_divides(shape.num_experts, ep, ranks)
    except ValueError as exc:
        valid = [e for e in range(1, min(shape.num_experts, max(ranks, 1)) + 1)
                 if shape.num_experts % e == 0 and ranks % e == 0]
        raise RecipeError(f"{exc}; sizes that divide both the {shape.num_experts} experts and {field_name} = {ranks}: "
                          f"{', '.join(map(str, valid))}") from None


def _colocated(ctx: _Ctx) -> _Ctx:
    """The learner's context on a GPU it shares with a rollout engine (`resources.colocate`): vLLM takes
    gpu_memory_utilization of the whole GPU first, the learner's budget is what remains usable."""
    from dataclasses import replace

    gpu = ctx.recipe.resources.gpu_memory_gb * GiB
    return replace(ctx, budget=ctx.budget - ctx.recipe.rollout.gpu_memory_utilization * gpu)


def default_context(config) -> int:
    """rollout.max_model_len left out: the model's own limit, capped as the trainer caps it."""
    from mispo.families.preflight import DEFAULT_CONTEXT_CAP

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return min(limit or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)


def plan_recipe(recipe: Recipe) -> Plan:
    """The memory plan of every role of the recipe (see the module docstring)."""
    shape = model_shape(recipe)
    check_expert_parallel(recipe, shape)
    res = recipe.resources
    cpu_run = res.gpus_per_node == 0
    budget = (host_memory_bytes() if cpu_run else res.gpu_memory_gb * GiB) * USABLE_FRACTION
    seq_len = recipe.rollout.max_model_len or default_context(load_model_config(recipe))
    ctx = _Ctx(recipe, shape, cpu_run, budget, 2 if recipe.model.dtype == "bfloat16" else 4, seq_len,
               tokens=max(recipe.learner.micro_batch_tokens, seq_len))
    critic = recipe.learner.critic is not None and recipe.algorithm.advantage == "gae"  # as the trainer decides
    actor = plan_learner(_colocated(ctx) if res.colocate and not cpu_run else ctx, "actor")
    if res.colocate and not cpu_run:
        actor.detail += (f"; shares its GPU with a rollout engine: budget = usable memory - "
                         f"rollout.gpu_memory_utilization ({recipe.rollout.gpu_memory_utilization:g}) x the GPU")
    roles = [actor] + ([plan_learner(ctx, "critic")] if critic else []) + [plan_rollout(ctx)]
    model = {"name": shape.name, "total_params": shape.total_params, "active_params": shape.active_params,
             "active_params_no_embeddings": shape.active_params_no_embeddings, "routed_params": shape.routed_params,
             "embedding_params": shape.embedding_params, "mtp_params": shape.mtp_params,
             "learner_params": shape.learner_params, "largest_layer_params": shape.largest_layer_params,
             "layers": len(shape.layers), "hidden_size": shape.hidden, "vocab_size": shape.vocab,
             "dtype": recipe.model.dtype}
    resources = res.model_dump() | {"cpu_run": cpu_run, "usable_fraction": USABLE_FRACTION,
                                    "micro_batch_tokens": ctx.tokens, "max_model_len": seq_len}
    step_time = None
    if not cpu_run and res.actor_gpus:
        comparison = actor.extra.get("expert_parallel")
        layouts = comparison["layouts"] if comparison else [
            {"expert_parallel": 1, "gpus": res.actor_gpus, "layout": f"ZeRO-{recipe.learner.zero_stage}",
             "configured": True}]
        step_time = step_time_plan(ctx, layouts, critic)
    return Plan(recipe.source, model, resources, roles, _notes(ctx, critic), step_time)


# The plan reads no data: data files named by a cluster recipe need not exist on the machine that plans it.
NO_DATA = ["data.train=builtin:arithmetic", "data.eval=null"]


def load_for_plan(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """load_recipe with the data paths replaced (not read by the plan); model.path must still exist."""
    return load_recipe(path, list(overrides) + NO_DATA)


MODEL_PATH_HINT = ("\nhint: the plan reads only config.json; e.g. a folder holding a copy of "
                   "mispo/models/step3p5/configs/step3p5_flash.json as config.json")


def plan_file(path: str | Path | None, overrides: list[str] = ()) -> Plan:
    """`mispo plan`: plan_recipe(load_for_plan(path, overrides)). An invalid recipe or checkpoint config
    (ConfigError) raises RecipeError; one naming model.path ends with MODEL_PATH_HINT."""
    from mispo.models.step3p5 import ConfigError

    try:
        return plan_recipe(load_for_plan(path, overrides))
    except (RecipeError, ConfigError) as exc:
        hint = MODEL_PATH_HINT if "model.path" in str(exc) else ""
        raise RecipeError(f"{exc}{hint}") from None
