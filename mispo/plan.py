"""`mispo plan`: the memory plan of a recipe's roles on its cluster, without allocating the model.

    plan = plan_recipe(load_recipe("recipes/step3p5_flash/math_expert.yaml"))
    print_plan(plan)              # a rich table, one row per role, then each role's verdict and fixes
    plan.to_dict()                # what `mispo plan RECIPE --json` prints

The parameter count comes from the checkpoint's config.json (or builtin:tiny), instantiated on the meta
device. Per GPU, for each role (`resources` in the recipe says where each lives):

- actor: the policy learner (DeepSpeed, ZeRO stage `learner.zero_stage` over `resources.actor_gpus`
  data-parallel GPUs): weights, gradients, optimizer states, activations of one micro-batch, plus the
  frozen reference model's weights when `learner.reference` is on (it lives in the policy worker).
- critic: the same backbone with a value head, same ZeRO stage, over `resources.critic_gpus`; no logits.
- rollout: one vLLM engine per `rollout_tensor_parallel x rollout_data_parallel` GPUs: its weights, a
  runtime reserve, and the KV cache that fills the rest of `rollout.gpu_memory_utilization`.

Bytes are GiB (2^30) throughout. A learner fits when its total is at most USABLE_FRACTION of the GPU
(the rest: CUDA context, NCCL buffers, allocator fragmentation); a CPU run (gpus_per_node = 0) is
measured against this machine's memory. These are estimates for choosing a layout, not guarantees.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mispo.config import Recipe, RecipeError, resolve_path

GiB = 1024**3
USABLE_FRACTION = 0.9  # of a GPU's memory, for the learners
ROLLOUT_RESERVE_GIB = 2.0  # vLLM's activations, sampler and CUDA graphs (it profiles them at start-up)
MAX_GPUS_SEARCHED = 4096


# --------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: attention heads (this layer's), and a dense MLP (ffn > 0) or an MoE."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None  # sliding-window size; None = full attention
    ffn: int = 0  # dense MLP intermediate size (0 on MoE layers)
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # shared expert(s) intermediate size


@dataclass
class ModelShape:
    """Parameter counts (from a meta-device instance) and per-layer shapes of a causal LM."""

    name: str
    hidden: int
    vocab: int
    layers: list[LayerShape]
    total_params: int  # main model: embeddings, decoder layers, final norm, lm_head (MTP layers excluded)
    routed_params: int  # routed-expert weights (included in total_params)
    embedding_params: int  # input embedding + lm_head (included in total_params)
    mtp_params: int  # multi-token-prediction layers, held by the learners when the checkpoint has them
    largest_layer_params: int  # the largest module's own parameters (ZeRO-3 gathers it whole)

    @property
    def expert_active_fraction(self) -> float:
        """top_k / num_experts of the MoE layers (1.0 for a dense model)."""
        moe = [layer for layer in self.layers if layer.experts]
        return moe[0].top_k / moe[0].experts if moe else 1.0

    @property
    def active_params(self) -> int:
        """Parameters one token uses: total - routed * (1 - top_k / num_experts)."""
        return int(self.total_params - self.routed_params * (1 - self.expert_active_fraction))

    @property
    def active_params_no_embeddings(self) -> int:
        return self.active_params - self.embedding_params

    @property
    def learner_params(self) -> int:
        """What a learner's DeepSpeed engine holds: the main model plus the MTP layers."""
        return self.total_params + self.mtp_params


def load_model_config(recipe: Recipe):
    """The recipe's model config: tiny_config(**model.tiny) for builtin:tiny, else model.path/config.json."""
    from mispo.models.step3p5 import Step3p5Config  # (importing it registers model_type step3p5)
    from mispo.models.step3p5.tiny import tiny_config

    if recipe.model.path == "builtin:tiny":
        return tiny_config(**recipe.model.tiny)
    path = resolve_path(recipe, recipe.model.path)
    file = path / "config.json"
    if not file.exists():
        raise RecipeError(f"model.path = {recipe.model.path!r} ({recipe.source or 'command line'}): no config.json "
                          "there; fix: point model.path at a checkpoint directory (only config.json is read)")
    data = json.loads(file.read_text())
    if data.get("model_type") == "step3p5":
        config = Step3p5Config(**data)
        config.load_mtp_layers = _has_mtp_weights(path, config)
        return config
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def _has_mtp_weights(path: Path, config) -> bool:
    """As Step3p5ForCausalLM.from_pretrained decides: MTP layers load when the checkpoint has their tensors;
    a directory with config.json alone is taken to be the release (which has them)."""
    from mispo.models.step3p5.modeling_step3p5 import checkpoint_keys

    if not config.num_nextn_predict_layers:
        return False
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        return True
    return any(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in checkpoint_keys(path))


def _build_meta(config):
    """The model on the meta device: shapes, no memory."""
    import torch

    with torch.device("meta"):
        if getattr(config, "model_type", None) == "step3p5":
            from mispo.models.step3p5 import Step3p5ForCausalLM
            return Step3p5ForCausalLM(config)
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_config(config)


def _is_step3p5(config) -> bool:
    return getattr(config, "model_type", None) == "step3p5"


def layer_shapes(config) -> list[LayerShape]:
    """Per decoder layer (MTP layers excluded): attention heads, window, and dense / MoE sizes."""
    if _is_step3p5(config):
        out = []
        for i in range(config.num_hidden_layers):
            spec = config.attention_spec(i)
            attn = dict(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                        window=spec.window)
            if config.is_moe_layer(i):
                out.append(LayerShape(**attn, experts=config.moe_num_experts, top_k=config.moe_top_k,
                                      expert_ffn=config.moe_intermediate_size, shared_ffn=config.share_expert_dim))
            else:
                out.append(LayerShape(**attn, ffn=config.intermediate_size))
        return out
    # Any other Hugging Face config: the common field names (approximate for exotic layouts).
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
               or getattr(config, "n_routed_experts", None) or 0)
    out = []
    for i in range(config.num_hidden_layers):
        w = window if types[i] == "sliding_attention" else None
        if experts:
            out.append(LayerShape(heads, kv, head_dim, w, experts=experts, top_k=config.num_experts_per_tok,
                                  expert_ffn=getattr(config, "moe_intermediate_size", None)
                                  or config.intermediate_size,
                                  shared_ffn=getattr(config, "shared_expert_intermediate_size", 0) or 0))
        else:
            out.append(LayerShape(heads, kv, head_dim, w, ffn=config.intermediate_size))
    return out


def _is_routed_expert(name: str, step3p5: bool) -> bool:
    if step3p5:  # stacked release tensors model.layers.N.moe.{gate,up,down}_proj.weight (not the router moe.gate)
        return ".moe." in name and ".moe.gate." not in name
    return ".experts." in name


def model_shape(recipe: Recipe) -> ModelShape:
    """Count the recipe's model parameters on the meta device (no allocation, well under a second)."""
    config = load_model_config(recipe)
    model = _build_meta(config)
    step3p5 = _is_step3p5(config)
    n_layers = config.num_hidden_layers
    embeddings = {id(model.get_input_embeddings().weight)}
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        embeddings.add(id(out_emb.weight))
    total = routed = emb = mtp = 0
    for name, p in model.named_parameters():
        n = p.numel()
        parts = name.split(".")
        if step3p5 and parts[:2] == ["model", "layers"] and int(parts[2]) >= n_layers:
            mtp += n
            continue
        total += n
        routed += n if _is_routed_expert(name, step3p5) else 0
        emb += n if id(p) in embeddings else 0
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    name = recipe.model.path if recipe.model.path.startswith("builtin:") else Path(recipe.model.path).name
    return ModelShape(name=name, hidden=config.hidden_size, vocab=config.vocab_size, layers=layer_shapes(config),
                      total_params=total, routed_params=routed, embedding_params=emb, mtp_params=mtp,
                      largest_layer_params=largest)


# --------------------------------------------------------------------------- learner memory
def model_state_bytes(params: int, largest_layer: int, gpus: int, zero_stage: int, bf16: bool,
                      offload: bool = False, gpus_per_node: int = 0) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states for AdamW under ZeRO over `gpus` ranks.

    bf16 mixed precision (DeepSpeed's accounting, bytes per parameter P): bf16 weights 2, gradients
    2 (bf16) + 4 (fp32), optimizer 12 (fp32 master 4 + Adam moments 8). N = gpus.
        stage 0:  weights 2P       grads 6P            optimizer 12P
        stage 1:  weights 2P       grads 2P + 4P/N     optimizer 12P/N
        stage 2:  weights 2P       grads 6P/N          optimizer 12P/N    (total = DeepSpeed's
                  estimate_zero2_model_states_mem_needs: 2P + 18P/N)
        stage 3:  weights 2P/N + 4L grads 4P/N         optimizer 12P/N    (total = DeepSpeed's
                  estimate_zero3_model_states_mem_needs: 4L + 18P/N, L = largest layer, gathered whole)
    offload (ZeRO-Offload, stage >= 1): optimizer states and fp32 gradients live in host memory; the GPU
    keeps the weights (stage 3: 2P/N + 4L) and, at stage 1, the bf16 gradients.
    float32 (no mixed precision): weights 4, grads 4, optimizer 8 (moments only), partitioned alike.
    `host` is DeepSpeed's host-memory estimate per node (offload only).
    """
    P, N = float(params), max(gpus, 1)
    offload = offload and zero_stage >= 1
    if not bf16:
        w, g, o = 4 * P, 4 * P, 8 * P
        if zero_stage >= 1:
            o /= N
        if zero_stage >= 2:
            g /= N
        if zero_stage == 3:
            w = w / N + 8 * largest_layer
        if offload:
            o, g = 0.0, g if zero_stage == 1 else 0.0
        return {"weights": w, "grads": g, "optimizer": o, "host": 16 * P if offload else 0.0}
    if zero_stage in (0, 1):
        w, g, o = 2 * P, 6 * P, 12 * P
        if zero_stage == 1:
            g, o = 2 * P + (0.0 if offload else 4 * P / N), 0.0 if offload else 12 * P / N
        host = _deepspeed_zero2(params, gpus, gpus_per_node, True)[0] if offload else 0.0
        return {"weights": w, "grads": g, "optimizer": o, "host": host}
    if zero_stage == 2:
        host, total = _deepspeed_zero2(params, gpus, gpus_per_node, offload)
        w, o = 2 * P, 0.0 if offload else 12 * P / N
    else:
        host, total = _deepspeed_zero3(params, largest_layer, gpus, gpus_per_node, offload)
        w, o = 2 * P / N + 4 * largest_layer, 0.0 if offload else 12 * P / N
    return {"weights": w, "grads": max(total - w - o, 0.0), "optimizer": o, "host": host if offload else 0.0}


def _nodes_split(gpus: int, gpus_per_node: int) -> tuple[int, float]:
    """(nodes, gpus per node) of a role spanning `gpus` GPUs."""
    gpn = gpus_per_node or max(gpus, 1)
    nodes = max(1, math.ceil(gpus / gpn))
    return nodes, max(gpus, 1) / nodes


def _deepspeed_zero2(params: int, gpus: int, gpus_per_node: int, offload: bool) -> tuple[float, float]:
    """(host bytes per node, GPU bytes) from DeepSpeed's own ZeRO-2 estimator (takes counts, allocates nothing)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes, gpn = _nodes_split(gpus, gpus_per_node)
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpn, num_nodes=nodes,
                                                     cpu_offload=offload)
    return float(cpu), float(gpu)


def _deepspeed_zero3(params: int, largest: int, gpus: int, gpus_per_node: int, offload: bool) -> tuple[float, float]:
    """(host bytes per node, GPU bytes) from DeepSpeed's ZeRO-3 estimator (optimizer offload, not param offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    nodes, gpn = _nodes_split(gpus, gpus_per_node)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpn, num_nodes=nodes,
                                                        cpu_offload=offload, cpu_offload_params=False)
    return float(cpu), float(gpu)


def layer_activation_elems(layer: LayerShape, hidden: int) -> int:
    """Elements one token keeps for the backward pass of one decoder layer (h = hidden):
        attention:  2h (norm input, output) + 3 nq d (q, attention output, gated output) + 2 nkv d (k, v) + nq (gate)
        dense MLP:  2h + 4 I (gate, up, silu(gate), their product)
        MoE:        2h + 2E (fp32 router scores) + k (2h + 4 I_e) (per routed slot: the token's copy, the
                    expert's four intermediates, its weighted output) + 4 I_s (shared expert)
    """
    h, nq, nkv, d = hidden, layer.num_heads, layer.num_kv_heads, layer.head_dim
    attn = 2 * h + 3 * nq * d + 2 * nkv * d + nq
    if layer.experts:
        ffn = 2 * h + 2 * layer.experts + layer.top_k * (2 * h + 4 * layer.expert_ffn) + 4 * layer.shared_ffn
    else:
        ffn = 2 * h + 4 * layer.ffn
    return attn + ffn


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool, logits: bool) -> float:
    """Peak activation bytes of one packed micro-batch of T tokens (b = dtype bytes, A_l = layer_activation_elems):
        without gradient checkpointing:  T b sum_l A_l
        with (one checkpoint per layer): T b (n_layers h + 2 max_l A_l)   (layer inputs kept; the layer being
                                         recomputed holds its activations and their gradients)
        + the policy's logits:           T V (b + 16)   (bf16 logits, two fp32 copies the log-softmax backward
                                         keeps, two fp32 temporaries at its peak); the critic reads 1 position.
    """
    per_layer = [layer_activation_elems(layer, shape.hidden) for layer in shape.layers]
    if checkpointing:
        body = tokens * dtype_bytes * (len(per_layer) * shape.hidden + 2 * max(per_layer))
    else:
        body = tokens * dtype_bytes * sum(per_layer)
    return float(body + (tokens * shape.vocab * (dtype_bytes + 16) if logits else 0))


# --------------------------------------------------------------------------- rollout memory
def kv_heads_per_gpu(layer: LayerShape, tensor_parallel: int) -> float:
    """KV heads one GPU stores: nkv / tp, at least 1 (vLLM replicates KV heads when tp > nkv)."""
    return max(layer.num_kv_heads / tensor_parallel, 1.0)


def kv_bytes_per_token(layer: LayerShape, tensor_parallel: int = 1, kv_bytes: int = 2) -> float:
    """KV bytes of one token in one layer on one GPU: 2 (K and V) * kv heads * head_dim * bytes."""
    return 2 * kv_heads_per_gpu(layer, tensor_parallel) * layer.head_dim * kv_bytes


def kv_bytes_per_sequence(layers: list[LayerShape], seq_len: int, tensor_parallel: int = 1,
                          kv_bytes: int = 2) -> float:
    """KV bytes of one sequence of seq_len tokens on one GPU: sum over layers of kv_bytes_per_token times
    seq_len on full-attention layers and min(seq_len, window) on sliding-window layers."""
    return sum(kv_bytes_per_token(layer, tensor_parallel, kv_bytes) *
               (min(seq_len, layer.window) if layer.window else seq_len) for layer in layers)


def rollout_weight_bytes(shape: ModelShape, tensor_parallel: int, data_parallel: int, expert_parallel: bool,
                         dtype_bytes: int) -> float:
    """Engine weights per GPU: (non-expert / tp + routed / (tp * dp if expert parallel else tp)) * bytes.
    Attention, dense MLPs, embeddings and lm_head are split by tensor parallelism and replicated over data
    parallel ranks; routed experts are split over all tp x dp ranks with expert parallelism. The main model
    only (MTP layers load only for speculative decoding). Small replicated tensors (norms, router) ignored."""
    dense = shape.total_params - shape.routed_params
    expert_split = tensor_parallel * (data_parallel if expert_parallel else 1)
    return (dense / tensor_parallel + shape.routed_params / expert_split) * dtype_bytes


# --------------------------------------------------------------------------- the plan
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
                "roles": roles, "notes": self.notes}


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


def host_memory_bytes() -> float:
    """This machine's physical memory (the budget of a CPU run)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * GiB


def _learner_parts(ctx: _Ctx, params: int, gpus: int, zero_stage: int, offload: bool, checkpointing: bool,
                   logits: bool) -> dict[str, float]:
    r = ctx.recipe
    states = model_state_bytes(params, ctx.shape.largest_layer_params, gpus, zero_stage,
                               bf16=r.model.dtype == "bfloat16", offload=offload,
                               gpus_per_node=r.resources.gpus_per_node)
    states["activations"] = activation_bytes(ctx.shape, ctx.tokens, ctx.dtype_bytes, checkpointing, logits)
    return states


def _reference_bytes(ctx: _Ctx, gpus: int, zero_stage: int) -> float:
    """The frozen reference's weights on each actor GPU: P b, divided by N under ZeRO-3."""
    full = ctx.shape.learner_params * ctx.dtype_bytes
    return full / max(gpus, 1) if zero_stage == 3 else full


def _learner_total(ctx: _Ctx, role: str, gpus: int, zero_stage: int, offload: bool,
                   checkpointing: bool) -> tuple[float, float]:
    """(GPU bytes per GPU, host bytes per node) of a learner role under the given settings."""
    parts = _learner_parts(ctx, _role_params(ctx, role), gpus, zero_stage, offload, checkpointing, role == "actor")
    host = parts.pop("host")
    extra = _reference_bytes(ctx, gpus, zero_stage) if role == "actor" and ctx.recipe.learner.reference else 0.0
    return sum(parts.values()) + extra, host


def _learner_fits(ctx: _Ctx, role: str, gpus: int, zero_stage: int, offload: bool, checkpointing: bool) -> bool:
    """GPU total within the budget, and offloaded states within resources.cpu_memory_gb (when set)."""
    gpu, host = _learner_total(ctx, role, gpus, zero_stage, offload, checkpointing)
    cpu = ctx.recipe.resources.cpu_memory_gb
    return gpu <= ctx.budget and not (cpu and host > cpu * GiB)


def _role_params(ctx: _Ctx, role: str) -> int:
    """Critic = the backbone (lm_head included) plus a Linear(hidden, 1) value head."""
    return ctx.shape.learner_params + (ctx.shape.hidden + 1 if role == "critic" else 0)


def _min_gpus(ctx: _Ctx, role: str, zero_stage: int, offload: bool, checkpointing: bool) -> int | None:
    """Fewest GPUs (up to MAX_GPUS_SEARCHED) with which the role fits; None when none does.
    The total only falls as GPUs are added, so a binary search finds it."""
    def fits(n: int) -> bool:
        return _learner_fits(ctx, role, n, zero_stage, offload, checkpointing)

    if not fits(MAX_GPUS_SEARCHED):
        return None
    lo, hi = 1, MAX_GPUS_SEARCHED
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def _round_to_nodes(n: int, gpus_per_node: int) -> int:
    return n if n <= gpus_per_node or not gpus_per_node else math.ceil(n / gpus_per_node) * gpus_per_node


def learner_fixes(ctx: _Ctx, role: str, gpus: int) -> list[str]:
    """Up to three changes that make the role fit, fewest extra GPUs and fewest changed settings first:
    every combination of {ZeRO-3, gradient checkpointing, optimizer offload} with the fewest GPUs it needs."""
    r = ctx.recipe
    stage, ckpt, offload = r.learner.zero_stage, r.model.gradient_checkpointing, r.resources.offload_optimizer
    key = f"resources.{role}_gpus"
    if ctx.cpu_run:
        options = [] if ckpt else ["model.gradient_checkpointing=true"]
        return options + ["lower learner.micro_batch_tokens", "a GPU cluster (resources.gpus_per_node, "
                          f"{key}); run `mispo plan` again to size it"]
    found = []
    for s in sorted({stage, 3}):
        for c in sorted({ckpt, True}):
            for o in sorted({offload, True}):
                n = _min_gpus(ctx, role, s, o, c)
                if n is None:
                    continue
                changes = ([f"learner.zero_stage={s}"] * (s != stage)
                           + ["model.gradient_checkpointing=true"] * (c != ckpt)
                           + ["resources.offload_optimizer=true"] * (o != offload))
                need = max(_round_to_nodes(n, r.resources.gpus_per_node), gpus)
                if need > gpus:
                    changes.append(f"{key}={need}")
                total = _learner_total(ctx, role, need, s, o, c)[0]
                found.append((need > gpus, need, len(changes), " + ".join(changes), total))
    found.sort()
    out = [f"{text}: {_gib(total)} per GPU" for _, _, _, text, total in found[:3] if text]
    if not out:
        out.append(f"no layout up to {MAX_GPUS_SEARCHED} GPUs fits; lower learner.micro_batch_tokens (now "
                   f"{ctx.tokens} tokens per micro-batch) or use GPUs with more memory (resources.gpu_memory_gb)")
    return out


def plan_learner(ctx: _Ctx, role: str) -> RolePlan:
    """The actor or critic learner: ZeRO model states + activations (+ the reference on the actor)."""
    r = ctx.recipe
    gpus = 0 if ctx.cpu_run else (r.resources.actor_gpus if role == "actor" else r.resources.critic_gpus)
    stage, ckpt = r.learner.zero_stage, r.model.gradient_checkpointing
    offload = r.resources.offload_optimizer
    parts = _learner_parts(ctx, _role_params(ctx, role), gpus, stage, offload, ckpt, role == "actor")
    host = parts.pop("host")
    layers = activation_bytes(ctx.shape, ctx.tokens, ctx.dtype_bytes, ckpt, logits=False)
    if role == "actor" and r.learner.reference:
        parts["ref_weights"] = _reference_bytes(ctx, gpus, stage)
    where = "on CPU" if ctx.cpu_run else f"over {gpus} GPUs"
    detail = (f"ZeRO-{stage} {where}, {ctx.tokens} tokens per micro-batch, gradient checkpointing "
              f"{'on' if ckpt else 'off'}" + (", optimizer offloaded" if offload and stage >= 1 else "")
              + (", with the frozen reference" if "ref_weights" in parts else "")
              + f"; activations = {_gib(layers)} layers" + (f" + {_gib(parts['activations'] - layers)} logits"
                                                          if role == "actor" else ""))
    plan = RolePlan(role, gpus, parts, ctx.budget, fits=False, detail=detail,
                    extra={"params": _role_params(ctx, role)})
    if not ctx.cpu_run and gpus == 0:
        plan.parts = {}
        plan.detail = "no GPUs assigned"
        plan.fixes = [f"resources.{role}_gpus = N (run `mispo plan` to size it)"]
        return plan
    plan.fits = plan.total <= ctx.budget
    if host:
        plan.extra["host_gib_per_node"] = round(host / GiB, 1)
        cpu = r.resources.cpu_memory_gb
        plan.detail += f"; host memory for offload ~{host / GiB:,.0f} GiB per node (DeepSpeed's estimate)"
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
        for dp, ep in ((1, False), (2, True), (4, True), (8, True)):
            m = _rollout_memory(ctx, tp, dp, ep, util, gpu_bytes)
            if m["sequences"] < 1:
                continue
            text = f"resources.rollout_tensor_parallel={tp}"
            if ep:
                text += f" + resources.rollout_data_parallel={dp} + resources.rollout_expert_parallel=true"
            per = "data-parallel rank" if dp > 1 else "engine"
            text += (f": weights {_gib(m['weights'])} per GPU, KV room for {m['sequences']} sequences per {per} "
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
    text = f"KV per token per {'worker' if ctx.cpu_run else 'GPU'}: {_kib(sums['full'])} on {len(full)} full layers"
    if swa:
        text += f" + {_kib(sums['sliding'])} on {len(swa)} sliding layers (capped at {swa[0].window} tokens)"
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
    detail = (f"{engines} engine(s), {layout}; {per_token}; one {ctx.seq_len}-token sequence = {_gib(m['per_seq'])}; "
              f"KV holds {m['sequences']} such sequences = {m['tokens']:,} tokens per engine"
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
        notes.append(f"the learners hold the {_params(shape.mtp_params)} MTP parameters too (counted); the "
                     "rollout engines serve the main model only")
    gather = 4 * shape.largest_layer_params
    if r.learner.zero_stage == 3 and gather > GiB:
        notes.append(f"ZeRO-3 gathers whole modules: the largest holds {_params(shape.largest_layer_params)} "
                     f"parameters (4 bytes each in DeepSpeed's estimate: {_gib(gather)} per GPU, in 'weights')")
    if r.learner.reference and not ctx.cpu_run and r.learner.zero_stage == 3:
        notes.append("the reference is counted sharded like the actor (ZeRO-3); PolicyWorker loads it unsharded "
                     "today, which at this scale needs a ZeRO-3 inference engine")
    if r.algorithm.kl_coef > 0 and not r.learner.reference:
        notes.append("algorithm.kl_coef > 0 needs learner.reference: true")
    if r.resources.offload_optimizer and r.learner.zero_stage == 0:
        notes.append("resources.offload_optimizer needs learner.zero_stage >= 1; ignored")
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


def plan_recipe(recipe: Recipe) -> Plan:
    """The memory plan of every role of the recipe (see the module docstring)."""
    shape = model_shape(recipe)
    res = recipe.resources
    cpu_run = res.gpus_per_node == 0
    budget = (host_memory_bytes() if cpu_run else res.gpu_memory_gb * GiB) * USABLE_FRACTION
    seq_len = recipe.rollout.max_model_len
    ctx = _Ctx(recipe, shape, cpu_run, budget, 2 if recipe.model.dtype == "bfloat16" else 4, seq_len,
               tokens=max(recipe.learner.micro_batch_tokens, seq_len))
    critic = recipe.learner.critic is not None and recipe.algorithm.advantage == "gae"  # as the trainer decides
    roles = [plan_learner(ctx, "actor")] + ([plan_learner(ctx, "critic")] if critic else []) + [plan_rollout(ctx)]
    model = {"name": shape.name, "total_params": shape.total_params, "active_params": shape.active_params,
             "active_params_no_embeddings": shape.active_params_no_embeddings, "routed_params": shape.routed_params,
             "embedding_params": shape.embedding_params, "mtp_params": shape.mtp_params,
             "learner_params": shape.learner_params, "largest_layer_params": shape.largest_layer_params,
             "layers": len(shape.layers), "hidden_size": shape.hidden, "vocab_size": shape.vocab,
             "dtype": recipe.model.dtype}
    resources = res.model_dump() | {"cpu_run": cpu_run, "usable_fraction": USABLE_FRACTION,
                                    "micro_batch_tokens": ctx.tokens, "max_model_len": seq_len}
    return Plan(recipe.source, model, resources, roles, _notes(ctx, critic))


# --------------------------------------------------------------------------- output
def _gib(b: float) -> str:
    return f"{b / GiB:,.1f} GiB" if b >= GiB else f"{b / 2**20:,.1f} MiB"


def _kib(b: float) -> str:
    return f"{b / 1024:,.1f} KiB"


def _params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _row(r: RolePlan, res: dict) -> list[str]:
    """One table row: role, GPUs, weights, grads, optimizer, activations, KV cache, total, budget, verdict."""
    p = r.parts
    verdict = "[green]fits[/green]" if r.fits else "[red]does not fit[/red]"
    gpus = str(r.gpus) if r.gpus else ("CPU" if res["cpu_run"] else "0")
    if not p:
        return [r.role, gpus] + ["-"] * 6 + [_gib(r.budget), verdict]

    def cell(k: str) -> str:
        if k not in p:
            return "-"
        return "offloaded" if res["offload_optimizer"] and k in ("grads", "optimizer") and not p[k] else _gib(p[k])

    weights = _gib(p["weights"]) + (f" +ref {_gib(p['ref_weights'])}" if "ref_weights" in p else "")
    share = f"KV: {r.extra['sequences']} seqs" if r.role == "rollout" else f"{100 * r.total / r.budget:.0f}%"
    return [r.role, gpus, weights, cell("grads"), cell("optimizer"), cell("activations"), cell("kv_cache"),
            _gib(r.total), _gib(r.budget), f"{verdict} ({share})"]


def print_plan(plan: Plan, console=None) -> None:
    """The plan as a rich table (one row per role), then each role's detail, fixes, and the notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m, res = plan.model, plan.resources
    moe = f", {_params(m['active_params'])} active ({_params(m['active_params_no_embeddings'])} without embeddings)"
    console.print(f"[bold]{m['name']}[/bold]: {_params(m['total_params'])} parameters"
                  + (moe if m["routed_params"] else "")
                  + (f", +{_params(m['mtp_params'])} MTP" if m["mtp_params"] else "") + f"; {m['dtype']}")
    where = ("CPU run (this machine)" if res["cpu_run"] else
             f"{res['nodes']} nodes x {res['gpus_per_node']} GPUs x {res['gpu_memory_gb']:g} GB")
    table = Table(title=f"mispo plan: {plan.recipe or 'defaults'} — {where}", title_justify="left")
    total = "total / process" if res["cpu_run"] else "total / GPU"
    for col in ("role", "GPUs", "weights", "grads", "optimizer", "activations", "KV cache", total, "budget",
                "verdict"):
        table.add_column(col, justify="left" if col in ("role", "verdict") else "right")
    for r in plan.roles:
        table.add_row(*_row(r, res))
    console.print(table)
    for r in plan.roles:
        console.print(f"[bold]{r.role}[/bold]: {r.detail}")
        for fix in r.fixes:
            console.print(f"  fix: {fix}")
    budget = f"{res['usable_fraction']:.0%} of {'this machine' if res['cpu_run'] else 'the GPU'}"
    console.print(f"[dim]learner budget = {budget}; rollout budget = rollout.gpu_memory_utilization x memory "
                  f"(weights, {ROLLOUT_RESERVE_GIB:g} GiB runtime reserve in 'activations', the rest KV cache)[/dim]")
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


# The plan reads no data: data files named by a cluster recipe need not exist on the machine that plans it.
NO_DATA = ["data.train=builtin:arithmetic", "data.eval=null"]


def load_for_plan(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """load_recipe with the data paths replaced (not read by the plan); model.path must still exist."""
    from mispo.config import load_recipe

    return load_recipe(path, list(overrides) + NO_DATA)


def run(args) -> int:
    """`mispo plan RECIPE [key=value ...] [--json]`."""
    from rich.console import Console

    from mispo.models.step3p5 import ConfigError

    try:
        plan = plan_recipe(load_for_plan(args.recipe, args.overrides))
    except (RecipeError, ConfigError) as exc:
        hint = ("\nhint: the plan reads only config.json; e.g. a folder holding a copy of "
                "mispo/models/step3p5/configs/step3p5_flash.json as config.json") if "model.path" in str(exc) else ""
        Console(stderr=True).print(f"[red]error:[/red] {exc}{hint}", markup=True, highlight=False)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print_plan(plan, Console(width=max(Console().width, 150)))
    return 0
