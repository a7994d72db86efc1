"""Seconds per RL step, from FLOPs, bytes on the links and decode bandwidth (a model, not a measurement).

Every constant is a named field of `Hardware` or `StepTimeInputs` (frozen dataclasses, overridable with
dataclasses.replace), with its source beside it. The phases of one step:

    generation   prefill: forward FLOPs of the prompts at train_mfu; decode: memory-bandwidth bound, each
                 decode step reads the engine's weights (the routed experts a batch of b tokens touches:
                 1 - (1 - k/E)^b of them) and the live sequences' KV once, at hbm_bandwidth x
                 decode_hbm_efficiency, plus 2 tensor-parallel all-reduces per layer (latency + bytes);
                 steps = max(longest response, tokens to generate / concurrency the KV pool allows)
    log-probs    forward-only passes (pi_old, the reference, the critic's values): 2 N_a T FLOPs + attention
    update       forward + backward: 6 N_a T (+ 2 N_a T when gradient checkpointing recomputes the forward)
                 + attention, at train_mfu over the learner's GPUs, times the pipeline bubble
                 (1 + (pp - 1) / micro-batches); ZeRO / data-parallel collectives overlap the compute
                 (max), all-to-all and the expert-gradient sync are serial (added)
    refit        the new weights to the engines: the engine's weight bytes per GPU over the link (NeMo-RL's
                 colocated refit); mispo's broadcast from learner rank 0: planner.step_time_plan

Not counted: the optimizer step (CPU Adam under offload), offload / onload between colocated phases,
context-parallel and pipeline point-to-point traffic, and the frameworks' fixed per-step costs (scheduling,
sampling, Python), so the model is optimistic where those matter (see the DeepSeek-V3 row below).

N_a = active parameters that multiply (MoE: top-k of the experts; the input embedding lookup excluded),
T = tokens. A collective over g ranks crosses nodes when g > gpus_per_node; it then runs at the
InfiniBand bandwidth per GPU, else at NVLink's (comm.py gives the bytes each GPU sends).

A synchronous step runs the phases one after another: generation + learners + refit, where the learners'
time is log-probs + update (+ critic) in NeMo-RL, and max(actor's, critic's) per phase in mispo (its trainer
submits the policy's and the critic's work together, then waits for both). Asynchronous (trainer.mode:
async, generation on its own GPUs) overlaps generation with the learners: max(generation, learners) + refit.
tokens/s/GPU = (prompt + response tokens of the step) / (step seconds x every GPU of the run), NeMo-RL's
definition, so the calibration rows compare like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mispo.plan.shape import LayerShape, ModelShape


# --------------------------------------------------------------------------- constants
@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Defaults: NVIDIA H100 SXM5 80 GB in a DGX H100 node."""

    name: str = "H100 SXM"
    peak_flops: float = 989e12  # bf16 dense tensor-core FLOP/s (NVIDIA H100 datasheet: 1,979 TFLOP/s with sparsity)
    hbm_bandwidth: float = 3.35e12  # bytes/s, HBM3 (NVIDIA H100 SXM datasheet)
    memory_bytes: float = 80 * 2**30  # 80 GB of HBM3 (the planner's gpu_memory_gb x GiB convention)
    nvlink_bandwidth: float = 450e9  # bytes/s per GPU per direction (NVLink 4: 900 GB/s bidirectional, datasheet)
    ib_bandwidth: float = 50e9  # bytes/s per GPU: one ConnectX-7 400 Gb/s NDR NIC per GPU (DGX H100 user guide)
    gpus_per_node: int = 8  # DGX H100


H100_SXM = Hardware()


@dataclass(frozen=True)
class StepTimeInputs:
    """The model's assumptions. The efficiencies are not fitted to the calibration rows: they are stated
    a priori (sources below) and the calibration checks the result."""

    hardware: Hardware = H100_SXM
    # Achieved / peak FLOP/s of the learners' forward and backward (and of prefill). Source: NeMo AutoModel's
    # H100 BF16 pre-training table (docs/performance-summary.md): Qwen3 MoE 30B 277 model TFLOP/s/GPU (28%),
    # DeepSeek V3 250 (25%); Megatron-Bridge's MoE rows are in the same band. RL micro-batches are smaller,
    # so the lower end, 25%.
    train_mfu: float = 0.25
    # Achieved / peak HBM bandwidth of a decode step (paged-attention and grouped-GEMM kernels at small
    # batch). Assumed: memory-bound inference kernels typically reach 50-70% of peak; 50% (no fit).
    decode_hbm_efficiency: float = 0.5
    # Achieved / peak bandwidth of a large collective (assumed: nccl-tests bus bandwidth on DGX H100 is
    # ~80% of the link's peak for large messages).
    link_efficiency: float = 0.8
    # Fixed cost of one small collective (assumed, typical nccl-tests small-message all-reduce latency):
    nvlink_latency_s: float = 10e-6  # inside a node
    ib_latency_s: float = 30e-6  # across nodes
    # A recipe names lengths only as caps; the plan's step time assumes (stated, not measured):
    prompt_tokens: int = 256  # mean prompt length
    response_fraction: float = 0.75  # mean response / max_new_tokens (NeMo-RL's Qwen3 runs: 0.69-0.77)
    runtime_reserve_bytes: float = 2 * 2**30  # vLLM activations + CUDA graphs (planner.ROLLOUT_RESERVE_GIB)


DEFAULT_INPUTS = StepTimeInputs()


# --------------------------------------------------------------------------- shapes from a config dict
def shape_from_config(cfg: dict, name: str | None = None) -> ModelShape:
    """A ModelShape counted analytically from a Hugging Face config.json dict (no torch, no meta device):
    Llama / Qwen3 / Qwen3-MoE style GQA layers, and DeepSeek-V3's MLA. Per layer:
        GQA attention  h nq d + 2 h nkv d + nq d h (+ 2 d q/k norms for qwen3)
        MLA attention  h q_r + q_r nq (d_nope + d_rope) + h (kv_r + d_rope) + kv_r nq (d_nope + d_v) + nq d_v h;
                       cached per token: kv_r + d_rope elements, shared by the heads (LayerShape: 1 KV head of
                       (kv_r + d_rope) / 2, so that 2 x heads x head_dim is the cached width, replicated by TP)
        dense MLP      3 h I;   MoE: router h E + E 3 h I_e (+ shared experts 3 h I_s)
    plus 2 h norms a layer, embedding V h, lm_head V h (unless tied), final norm h."""
    h, V, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nq = cfg["num_attention_heads"]
    experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0
    top_k = cfg.get("num_experts_per_tok", 0)
    moe_ffn = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    mla = "kv_lora_rank" in cfg
    if mla:
        q_r, kv_r, rope = cfg.get("q_lora_rank") or 0, cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        nope, dv = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        q = (h * q_r + q_r + q_r * nq * (nope + rope)) if q_r else h * nq * (nope + rope)
        attn_params = q + h * (kv_r + rope) + kv_r + kv_r * nq * (nope + dv) + nq * dv * h
        heads = dict(num_heads=nq, num_kv_heads=1, head_dim=(kv_r + rope) // 2, window=None)
    else:
        nkv = cfg.get("num_key_value_heads") or nq
        d = cfg.get("head_dim") or h // nq
        attn_params = h * nq * d + 2 * h * nkv * d + nq * d * h + (2 * d if "qwen3" in cfg.get("model_type", "") else 0)
        heads = dict(num_heads=nq, num_kv_heads=nkv, head_dim=d, window=None)
    shared = (cfg.get("n_shared_experts") or 0) * moe_ffn + (cfg.get("shared_expert_intermediate_size") or 0)
    first_dense = cfg.get("first_k_dense_replace", 0)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    layers, routed, largest, largest_dense = [], 0, 0, 0
    total = 0
    for i in range(n):
        if experts and i >= first_dense and i not in dense_only:
            layer = LayerShape(**heads, experts=experts, top_k=top_k, expert_ffn=moe_ffn, shared_ffn=shared)
            r = experts * 3 * h * moe_ffn
            mlp = h * experts + r + 3 * h * shared
            routed += r
            largest = max(largest, r)
        else:
            layer = LayerShape(**heads, ffn=cfg["intermediate_size"])
            mlp = 3 * h * cfg["intermediate_size"]
            largest = max(largest, mlp)
        layers.append(layer)
        total += attn_params + mlp + 2 * h
        largest_dense = max(largest_dense, attn_params, mlp if not layer.experts else h * experts + 3 * h * shared)
    tied = cfg.get("tie_word_embeddings", False)
    emb = V * h * (1 if tied else 2)
    total += emb + h
    return ModelShape(name=name or cfg.get("_name_or_path") or cfg.get("model_type", "model"), hidden=h, vocab=V,
                      layers=layers, total_params=total, routed_params=routed, embedding_params=emb, mtp_params=0,
                      largest_layer_params=max(largest, V * h), largest_dense_layer_params=max(largest_dense, V * h))


# --------------------------------------------------------------------------- FLOPs
def flop_params(shape: ModelShape) -> int:
    """Parameters one token multiplies: active_params minus the input embedding (a lookup, no FLOPs) when
    the lm_head is a separate matrix."""
    untied_input = shape.embedding_params - shape.vocab * shape.hidden
    return shape.active_params - untied_input


def attention_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Forward FLOPs of the score and value matmuls for one token of a causal sequence of seq_len tokens:
    sum over layers of 4 nq d c, c = the mean causal context (seq_len / 2, or the window on a
    sliding-window layer when shorter)."""
    out = 0.0
    for layer in shape.layers:
        ctx = seq_len / 2 if not layer.window else min(seq_len / 2, layer.window)
        out += 4 * layer.num_heads * layer.head_dim * ctx
    return out


def forward_flops(shape: ModelShape, tokens: float, seq_len: float) -> float:
    """One forward pass over `tokens` tokens in sequences of seq_len: 2 N_a T + attention."""
    return tokens * (2 * flop_params(shape) + attention_flops_per_token(shape, seq_len))


def train_flops(shape: ModelShape, tokens: float, seq_len: float, checkpointing: bool) -> float:
    """Forward + backward (backward = 2 x forward): 3 x forward = 6 N_a T + attention; 4 x with gradient
    checkpointing (the forward runs again in the backward)."""
    return (4 if checkpointing else 3) * forward_flops(shape, tokens, seq_len)


def compute_seconds(flops: float, gpus: int, inputs: StepTimeInputs = DEFAULT_INPUTS) -> float:
    """flops / (gpus x peak x train_mfu)."""
    return flops / (max(gpus, 1) * inputs.hardware.peak_flops * inputs.train_mfu)


# --------------------------------------------------------------------------- links
def crosses_nodes(group: int, gpus_per_node: int) -> bool:
    """A collective over `group` consecutive ranks leaves the node when the group is larger than one node."""
    return group > max(gpus_per_node, 1)


def link_bandwidth(group: int, inputs: StepTimeInputs = DEFAULT_INPUTS, gpus_per_node: int | None = None) -> float:
    """Bytes/s one GPU achieves in a collective over `group` ranks: InfiniBand when it crosses nodes (a ring's
    slowest hop), else NVLink; times link_efficiency."""
    hw = inputs.hardware
    gpn = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    bw = hw.ib_bandwidth if crosses_nodes(group, gpn) else hw.nvlink_bandwidth
    return bw * inputs.link_efficiency


def collective_seconds(bytes_sent: float, group: int, inputs: StepTimeInputs = DEFAULT_INPUTS,
                       gpus_per_node: int | None = None, count: int = 0) -> float:
    """bytes / link_bandwidth + count x latency (the latency of the link the group uses); 0 for one rank."""
    if group <= 1 or bytes_sent <= 0:
        return 0.0
    gpn = inputs.hardware.gpus_per_node if gpus_per_node is None else gpus_per_node
    alpha = inputs.ib_latency_s if crosses_nodes(group, gpn) else inputs.nvlink_latency_s
    return bytes_sent / link_bandwidth(group, inputs, gpn) + count * alpha


def all_to_all_seconds(bytes_sent: float, group: int, inputs: StepTimeInputs = DEFAULT_INPUTS,
                       gpus_per_node: int | None = None) -> float:
    """An all-to-all sends (g - q)/(g - 1) of its bytes to other nodes (q = the group's ranks per node) and the
    rest over NVLink, concurrently: max(remote / IB, local / NVLink), each times link_efficiency."""
    if group <= 1 or bytes_sent <= 0:
        return 0.0
    hw = inputs.hardware
    gpn = hw.gpus_per_node if gpus_per_node is None else gpus_per_node
    q = min(group, max(gpn, 1))
    remote = bytes_sent * (group - q) / (group - 1)
    local = bytes_sent - remote
    return max(remote / hw.ib_bandwidth, local / hw.nvlink_bandwidth) / inputs.link_efficiency


# --------------------------------------------------------------------------- the learners
@dataclass(frozen=True)
class LearnerWork:
    """One learner phase on its GPUs: FLOPs, and the bytes each GPU sends by kind with the collective's
    group size. overlapped: data-parallel / ZeRO collectives (prefetched, bucketed: hidden under compute up to
    the compute time); serial: all-to-all and collectives between phases (added)."""

    gpus: int
    flops: float
    overlapped: list[tuple[float, int]] = field(default_factory=list)  # (bytes, group)
    all_to_all: list[tuple[float, int]] = field(default_factory=list)
    serial: list[tuple[float, int]] = field(default_factory=list)
    pipeline: int = 1
    micro_batches: int = 1  # per pipeline (per data-parallel rank per optimizer step)


def learner_seconds(work: LearnerWork, inputs: StepTimeInputs = DEFAULT_INPUTS,
                    gpus_per_node: int | None = None) -> dict[str, float]:
    """{"compute", "comm_overlapped", "comm_serial", "total"}: compute = flops / (gpus peak mfu) x
    (1 + (pp - 1) / micro_batches); total = max(compute, overlapped) + all-to-all + serial."""
    bubble = 1 + (work.pipeline - 1) / max(work.micro_batches, 1)
    compute = compute_seconds(work.flops, work.gpus, inputs) * bubble
    over = sum(collective_seconds(b, g, inputs, gpus_per_node) for b, g in work.overlapped)
    serial = (sum(all_to_all_seconds(b, g, inputs, gpus_per_node) for b, g in work.all_to_all)
              + sum(collective_seconds(b, g, inputs, gpus_per_node) for b, g in work.serial))
    return {"compute": compute, "comm_overlapped": over, "comm_serial": serial,
            "total": max(compute, over) + serial}


# --------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Engines:
    """The rollout engines: `count` engines of tp GPUs (x dp with experts sharded over tp x dp when
    expert_parallel), and the step's sequences and lengths."""

    count: int
    tp: int
    sequences: int  # samples generated per step, all engines together
    prompt_tokens: float  # mean
    mean_response: float
    max_response: float  # the longest response (the batch's decode steps, at least)
    memory_utilization: float  # vLLM gpu_memory_utilization
    dp: int = 1
    expert_parallel: bool = False
    dtype_bytes: int = 2
    kv_bytes: int = 2


def experts_touched(batch: float, top_k: int, experts: int) -> float:
    """Fraction of a layer's routed experts a batch of `batch` tokens reads, uniform routing: 1 - (1 - k/E)^b."""
    if not experts:
        return 1.0
    return 1 - (1 - top_k / experts) ** max(batch, 1.0)


def _kv_bytes_per_gpu(shape: ModelShape, context: float, tp: int, kv_bytes: int) -> float:
    """KV bytes of one sequence of `context` tokens on one GPU (sliding layers capped at the window; heads
    split by tp, at least one per GPU: memory.kv_bytes_per_sequence's rule)."""
    from mispo.plan.memory import kv_bytes_per_token

    return sum(kv_bytes_per_token(layer, tp, kv_bytes) * (min(context, layer.window) if layer.window else context)
               for layer in shape.layers)


def engine_weight_bytes(shape: ModelShape, e: Engines, batch: float = float("inf")) -> float:
    """Weight bytes one GPU reads per decode step: dense / tp + routed / split x experts_touched(batch)
    (split = tp, or tp x dp under expert parallelism); batch = inf gives the whole shard (memory.
    rollout_weight_bytes)."""
    moe = shape.moe_layers
    touched = experts_touched(batch * (e.dp if e.expert_parallel else 1), moe[0].top_k, moe[0].experts) if moe \
        else 1.0
    split = e.tp * (e.dp if e.expert_parallel else 1)
    dense = shape.total_params - shape.routed_params
    return (dense / e.tp + shape.routed_params / split * touched) * e.dtype_bytes


def decode_step_seconds(shape: ModelShape, e: Engines, batch: float, context: float,
                        inputs: StepTimeInputs = DEFAULT_INPUTS, gpus_per_node: int | None = None) -> dict[str, float]:
    """One decode step of `batch` live sequences of mean context `context` on one engine rank:
        memory  (weights read + batch x KV(context)) / (hbm_bandwidth x decode_hbm_efficiency)
        compute batch (2 N_a + attention at context) / tp / peak          (the roofline: max of the two)
        tp      2 all-reduces per layer of batch x h x b bytes: 2 (tp-1)/tp of them sent + latency each"""
    hw = inputs.hardware
    weights = engine_weight_bytes(shape, e, batch)
    kv = batch * _kv_bytes_per_gpu(shape, context, e.tp, e.kv_bytes)
    memory = (weights + kv) / (hw.hbm_bandwidth * inputs.decode_hbm_efficiency)
    compute = batch * (2 * flop_params(shape) + attention_flops_per_token(shape, 2 * context)) / e.tp / hw.peak_flops
    per_reduce = 2 * (e.tp - 1) / e.tp * batch * shape.hidden * e.dtype_bytes
    n_reduce = 2 * len(shape.layers)
    tp = collective_seconds(per_reduce * n_reduce, e.tp, inputs, gpus_per_node, count=n_reduce)
    return {"memory": memory, "compute": compute, "tp": tp, "total": max(memory, compute) + tp,
            "weights": weights, "kv": kv}


def generation_seconds(shape: ModelShape, e: Engines, inputs: StepTimeInputs = DEFAULT_INPUTS,
                       gpus_per_node: int | None = None) -> dict[str, float]:
    """One step's generation on `e.count` engines working in parallel (per engine: n = sequences / count):
        KV pool per GPU = memory_utilization x memory - weights - reserve
        concurrency c  = min(n, pool / KV(prompt + mean response))   (sequences whose KV fits at once)
        decode steps S = max(max_response, n x mean_response / c)    (the longest answer, or waves)
        mean batch   b = n x mean_response / S,  context = prompt + mean_response / 2
        seconds        = prefill (2 N_a + attention) n prompt / (tp peak mfu) + S x decode_step(b, context)."""
    hw = inputs.hardware
    n = math.ceil(e.sequences / max(e.count, 1))
    pool = e.memory_utilization * hw.memory_bytes - engine_weight_bytes(shape, e) - inputs.runtime_reserve_bytes
    full = _kv_bytes_per_gpu(shape, e.prompt_tokens + e.mean_response, e.tp, e.kv_bytes)
    concurrency = max(1.0, min(n, pool / full)) if pool > 0 else 1.0
    steps = max(e.max_response, n * e.mean_response / concurrency)
    batch = n * e.mean_response / steps
    context = e.prompt_tokens + e.mean_response / 2
    step = decode_step_seconds(shape, e, batch, context, inputs, gpus_per_node)
    prefill = compute_seconds(forward_flops(shape, n * e.prompt_tokens, e.prompt_tokens), e.tp * e.dp, inputs)
    return {"seconds": prefill + steps * step["total"], "prefill": prefill, "decode_steps": steps,
            "batch": batch, "concurrency": concurrency, "step": step["total"], "step_memory": step["memory"],
            "step_tp": step["tp"], "kv_pool": pool}


def refit_seconds(shape: ModelShape, e: Engines, inputs: StepTimeInputs = DEFAULT_INPUTS,
                  gpus_per_node: int | None = None, group: int | None = None) -> float:
    """New weights into every engine GPU: its shard (engine_weight_bytes) over the link of a `group`-rank
    transfer (default: the engine's own GPUs; a broadcast from another node passes group > gpus_per_node)."""
    g = group or e.tp * e.dp
    return engine_weight_bytes(shape, e) / link_bandwidth(max(g, 2), inputs, gpus_per_node)


# --------------------------------------------------------------------------- the step
def step_summary(phases: dict[str, float], tokens: float, gpus: int, overlap: bool = False,
                 learner: float | None = None) -> dict[str, float]:
    """phases = {"generation", "logprobs", "update", "critic", "refit"} seconds. learner = the learners'
    critical path (default: logprobs + update + critic, one after another). Sync step = generation + learner
    + refit; async step = max(generation, learner) + refit (the engines generate the next step's samples
    while the learners train); tokens/s/GPU = tokens / (step x gpus) for each; `overlap` picks which is "step"."""
    learn = learner if learner is not None else (phases.get("logprobs", 0.0) + phases.get("update", 0.0)
                                                 + phases.get("critic", 0.0))
    sync = phases.get("generation", 0.0) + learn + phases.get("refit", 0.0)
    asyn = max(phases.get("generation", 0.0), learn) + phases.get("refit", 0.0)
    step = asyn if overlap else sync
    return {**phases, "learner": learn, "step_sync": sync, "step_async": asyn, "step": step,
            "tokens": tokens, "gpus": gpus, "tokens_per_s_per_gpu": tokens / (step * max(gpus, 1)),
            "tokens_per_s_per_gpu_sync": tokens / (sync * max(gpus, 1)),
            "tokens_per_s_per_gpu_async": tokens / (asyn * max(gpus, 1))}


# --------------------------------------------------------------------------- calibration: NeMo-RL v0.6
# The public configs (config.json on the Hugging Face hub: Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B,
# deepseek-ai/DeepSeek-V3), the fields shape_from_config reads.
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 768, "intermediate_size": 6144, "vocab_size": 151936,
                 "tie_word_embeddings": False, "_name_or_path": "Qwen3-30B-A3B"}
QWEN3_235B_A22B = {"model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
                   "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                   "moe_intermediate_size": 1536, "intermediate_size": 12288, "vocab_size": 151936,
                   "tie_word_embeddings": False, "_name_or_path": "Qwen3-235B-A22B"}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
               "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False, "_name_or_path": "DeepSeek-V3"}


@dataclass(frozen=True)
class PublishedRun:
    """One row of NeMo-RL v0.6's H100 BF16 GRPO table (docs/about/performance-summary.md, "NeMo RL v0.6")
    and the layout of its recipe (examples/configs/recipes/llm/performance/<recipe>.yaml at tag v0.6.0,
    defaults from examples/configs/grpo_math_1B.yaml). All runs: on-policy, generation colocated with
    training on the same GPUs (policy.generation.colocated.enabled: true), vLLM gpu_memory_utilization 0.6,
    train_global_batch_size 512 with micro-batch 1, GRPO with a reference KL (reference_policy_kl_penalty
    0.01, so a reference log-prob pass) and the prev-log-prob pass, Megatron-Core with token-dropless MoE."""

    name: str
    recipe: str
    config: dict
    gpus: int
    sequences: int  # G-GBS = num_prompts_per_step x num_generations_per_prompt
    mean_seq_len: float  # G-Average Seq len (prompt + response), published
    max_seq_len: int  # T-Max Sequence Length (max_total_sequence_length = vLLM max_model_len)
    gen_tp: int  # Generation [TP, PP]
    tp: int  # Training [TP, CP, EP, PP]
    cp: int
    ep: int
    pp: int
    checkpointing: bool  # megatron_cfg.activation_checkpointing
    published_tokens_per_s_per_gpu: float
    published_step_s: float
    train_gbs: int = 512
    prompt_tokens: float = 150  # assumed: OpenMathInstruct-2 problems with the chat template (not published)
    memory_utilization: float = 0.6


NEMO_RL_V06 = [
    PublishedRun("Qwen3-30B-A3B", "grpo-qwen3-30ba3b-4n8g", QWEN3_30B_A3B, gpus=32, sequences=64 * 32,
                 mean_seq_len=3203, max_seq_len=4096, gen_tp=2, tp=1, cp=1, ep=8, pp=1, checkpointing=False,
                 published_tokens_per_s_per_gpu=1102, published_step_s=192),
    PublishedRun("Qwen3-235B-A22B", "grpo-qwen3-235b-16n8g", QWEN3_235B_A22B, gpus=128, sequences=16 * 32,
                 mean_seq_len=5698, max_seq_len=8192, gen_tp=16, tp=2, cp=2, ep=16, pp=8, checkpointing=True,
                 published_tokens_per_s_per_gpu=58.9, published_step_s=395),
    # Optional row, outside 2x (the model is ~4x optimistic): at 512 GPUs each GPU's share of the work is
    # small and NeMo-RL's fixed per-step costs dominate (its own table: 256 -> 512 GPUs cuts the step only from
    # 134 to 111 s). The model counts the refit as bytes over NVLink / IB (~1 s); NeMo-RL PR #638 (July 2025)
    # measured DeepSeek-V3's colocated refit at 55 s, ~20 s of it offload. A 4-node TP32 engine's per-step
    # latencies are likely larger than ib_latency_s too.
    PublishedRun("DeepSeek-V3", "grpo-deepseek-v3-64n8g", DEEPSEEK_V3, gpus=512, sequences=32 * 16,
                 mean_seq_len=697, max_seq_len=1536, gen_tp=32, tp=1, cp=1, ep=32, pp=16, checkpointing=True,
                 published_tokens_per_s_per_gpu=7.24, published_step_s=111),
]


def predict_published(run: PublishedRun, inputs: StepTimeInputs = DEFAULT_INPUTS) -> dict[str, float]:
    """The step-time model on a NeMo-RL run (Megatron TP / CP / EP / PP learner, colocated vLLM), phases summed
    (on-policy). Megatron's collectives, per GPU, bf16:
        all-to-all   comm.all_to_all_bytes over the EP group (a stage's N / pp GPUs hold T pp / N tokens each,
                     moe_layers / pp layers a stage), each pass
        TP (+SP)     4 collectives a layer a pass, each sending (tp-1)/tp of T / (dp cp) tokens x h x 2 bytes
        gradients    distributed optimizer: reduce-scatter + all-gather per optimizer step of the dense
                     parameters / (tp pp) over dp x cp ranks and the experts / (ep pp) over N / (ep pp) ranks
                     (overlapped with the backward)
    CP's KV exchange and PP's point-to-point activations are not counted (small next to these)."""
    from mispo.plan.comm import StepTraffic, all_to_all_bytes

    shape = shape_from_config(run.config, run.name)
    hw, n = inputs.hardware, run.gpus
    gpn = hw.gpus_per_node
    tokens = run.sequences * run.mean_seq_len
    dp = n // (run.tp * run.cp * run.pp)
    stage = n // run.pp
    moe = shape.moe_layers
    optimizer_steps = max(run.sequences // run.train_gbs, 1)
    micro = run.train_gbs // dp  # per pipeline per optimizer step (micro-batch 1)

    def megatron_work(flops: float, passes: int, grads: bool, micro_batches: int) -> LearnerWork:
        t = StepTraffic(gpus=stage, micro_batches=1, tokens=tokens * run.pp / n, optimizer_steps=optimizer_steps,
                        passes=passes, dtype_bytes=2)
        a2a = all_to_all_bytes(shape.hidden, moe[0].top_k, len(moe) / run.pp, run.ep, t) if moe else 0.0
        tp_bytes = passes * 4 * (run.tp - 1) / run.tp * tokens / (dp * run.cp) * shape.hidden * 2 \
            * len(shape.layers) / run.pp
        overlapped = []
        if grads:
            dense = (shape.total_params - shape.routed_params) / (run.tp * run.pp)
            experts = shape.routed_params / (run.ep * run.pp)
            for params, group in ((dense, dp * run.cp), (experts, n // (run.ep * run.pp))):
                overlapped.append((optimizer_steps * 2 * (group - 1) / group * params * 2, group))
        return LearnerWork(gpus=n, flops=flops, overlapped=overlapped, all_to_all=[(a2a, run.ep)],
                           serial=[(tp_bytes, run.tp)], pipeline=run.pp, micro_batches=micro_batches)

    update = learner_seconds(megatron_work(train_flops(shape, tokens, run.mean_seq_len, run.checkpointing),
                                           3 if run.checkpointing else 2, True, micro), inputs, gpn)
    # prev log-probs and reference log-probs: two forward passes over the step's sequences
    fwd = megatron_work(forward_flops(shape, tokens, run.mean_seq_len), 1, False, run.sequences // dp)
    logprobs = 2 * learner_seconds(fwd, inputs, gpn)["total"]
    engines = Engines(count=n // run.gen_tp, tp=run.gen_tp, sequences=run.sequences, prompt_tokens=run.prompt_tokens,
                      mean_response=run.mean_seq_len - run.prompt_tokens,
                      max_response=run.max_seq_len - run.prompt_tokens, memory_utilization=run.memory_utilization)
    gen = generation_seconds(shape, engines, inputs, gpn)
    phases = {"generation": gen["seconds"], "logprobs": logprobs, "update": update["total"], "critic": 0.0,
              "refit": refit_seconds(shape, engines, inputs, gpn)}
    out = step_summary(phases, tokens, n)
    out |= {"published_tokens_per_s_per_gpu": run.published_tokens_per_s_per_gpu,
            "published_step_s": run.published_step_s,
            "ratio": out["tokens_per_s_per_gpu"] / run.published_tokens_per_s_per_gpu,
            "active_params": shape.active_params, "total_params": shape.total_params,
            "decode_steps": gen["decode_steps"], "decode_batch": gen["batch"], "decode_step_s": gen["step"]}
    return out
