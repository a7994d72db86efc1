"""The memory formulas, per GPU: ZeRO model states (checked against DeepSpeed's own estimators),
activations of one packed micro-batch, the KV cache and the rollout engine's weights. Bytes throughout."""

from __future__ import annotations

import math
import os

from mispo.algorithms.head_logprobs import head_chunk
from mispo.algorithms.logits import LOGITS_CHUNK
from mispo.plan.shape import LayerShape, ModelShape
from mispo.plan.units import GiB


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


def expert_parallel_state_bytes(params: int, routed: int, largest_dense: int, gpus: int, expert_parallel: int,
                                zero_stage: int, bf16: bool, offload: bool = False,
                                gpus_per_node: int = 0, expert_offload: bool = False) -> dict[str, float]:
    """Per-GPU model states with the routed experts resident (learner.expert_parallel = EP over N = gpus ranks):
        non-expert P_o = params - routed:  model_state_bytes(P_o, L_o, N, zero_stage, ...)   (DeepSpeed's ZeRO over
                                           all N; L_o = the largest non-expert module, gathered whole at stage 3)
        experts P_e = routed / EP:         what `learner/expert_parallel.ShardedExperts` holds, its optimizer
                                           sharded over the expert-data-parallel group of D = N / EP replicas:
                   bf16:    weights 2 P_e, grads 2 P_e (whole, accumulated) + 4 P_e / D (the fp32 part at the
                            step), optimizer 12 P_e / D (fp32 master + moments of the rank's part)
                   float32: weights 4 P_e, grads 4 P_e, optimizer 8 P_e / D (+ 4 P_e / D of master when D > 1)
        expert_offload (learner.expert_optimizer_offload): the experts' optimizer and fp32 gradient part live in
        host memory: 'host' += (16 P_e / D) x the GPUs of a node; resources.offload_optimizer (`offload`) moves
        DeepSpeed's states only. The experts' total is 4 P_e + 16 P_e / D = 4 routed / EP + 16 routed / N (bf16):
        its sharded part depends on N alone, the resident weights and gradients on EP.
    """
    ranks = max(gpus, 1)
    dense = model_state_bytes(params - routed, largest_dense, ranks, zero_stage, bf16, offload, gpus_per_node)
    pe, d = routed / expert_parallel, max(ranks // expert_parallel, 1)
    if bf16:
        experts = {"weights": 2 * pe, "grads": 2 * pe + 4 * pe / d, "optimizer": 12 * pe / d}
    else:
        experts = {"weights": 4 * pe, "grads": 4 * pe, "optimizer": (8 + (4 if d > 1 else 0)) * pe / d}
    host = dense["host"]
    if expert_offload:
        moved = experts["optimizer"] + (4 * pe / d if bf16 else 0.0)
        experts["optimizer"], experts["grads"] = 0.0, experts["grads"] - (4 * pe / d if bf16 else 0.0)
        host += moved * _nodes_split(ranks, gpus_per_node)[1]
    return {k: dense[k] + experts[k] for k in ("weights", "grads", "optimizer")} | {"host": host}


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


# fp32 [chunk, V] tensors alive at the peak of ChunkedLogSoftmax's backward (mispo/algorithms/logits.py): log p
# (turned into the chunk's gradient in place) and p, + the p == 0 mask (1 byte). On CPU
# benchmarks/logprob_memory.py measures 1.75: the gradient's last chunk is not yet written (untouched pages).
LOGITS_CHUNK_TRANSIENTS = 2.25


def logits_bytes(tokens: int, vocab: int, dtype_bytes: int, chunk: int = LOGITS_CHUNK) -> float:
    """Peak bytes of one micro-batch's logits as the learner computes log-probs + entropy and their backward
    (`mispo.algorithms.logits`, chunked): T tokens, V vocabulary, b = the logits' dtype bytes, c = min(chunk, T):
        T V b                            the logits, held through the backward
        + T V b                          their gradient (the only one: learner.packing reads the logits as a
                                         [T, V] view, so autograd allocates no padded copy)
        + 2.25 c V 4                     the chunk's fp32 transients (LOGITS_CHUNK_TRANSIENTS)
    No fp32 [T, V] copy: a naive log_softmax(logits.float()) holds several (benchmarks/logprob_memory.py)."""
    tv_b = float(tokens) * vocab * dtype_bytes
    return 2 * tv_b + LOGITS_CHUNK_TRANSIENTS * min(chunk, tokens) * vocab * 4


def head_logprob_bytes(tokens: int, vocab: int, chunk: int | None = None) -> float:
    """Peak bytes of one micro-batch's log-probs + entropy and their backward on the fused head (what the
    learner runs for a plain lm_head: `mispo.algorithms.head_logprobs`, `mispo.learner.logprob_head`): the
    logits exist one chunk of c = min(head_chunk(V), T) positions at a time, in the forward and, recomputed,
    in the backward, so no T x V term:
        2.25 c V 4                       the chunk's fp32 transients (LOGITS_CHUNK_TRANSIENTS)
    (the lm-head's and the hidden states' gradients are the model's own, as in any layer). A model that
    transforms its logits (Gemma 2's soft-capping) keeps the logits path: `logits_bytes`."""
    c = min(chunk or head_chunk(vocab), tokens)
    return LOGITS_CHUNK_TRANSIENTS * c * vocab * 4


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool, logits: bool) -> float:
    """Peak activation bytes of one packed micro-batch of T tokens (b = dtype bytes, A_l = layer_activation_elems):
        without gradient checkpointing:  T b sum_l A_l
        with (one checkpoint per layer): T b (n_layers h + 2 max_l A_l)   (layer inputs kept; the layer being
                                         recomputed holds its activations and their gradients)
        + the policy's log-prob head:    head_logprob_bytes(T, V): O(chunk x V) fp32 transients, never T x V
                                         (the fused head); the critic reads 1 position.
    """
    per_layer = [layer_activation_elems(layer, shape.hidden) for layer in shape.layers]
    if checkpointing:
        body = tokens * dtype_bytes * (len(per_layer) * shape.hidden + 2 * max(per_layer))
    else:
        body = tokens * dtype_bytes * sum(per_layer)
    return float(body + (head_logprob_bytes(tokens, shape.vocab) if logits else 0))


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


def host_memory_bytes() -> float:
    """This machine's physical memory (the budget of a CPU run)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * GiB
