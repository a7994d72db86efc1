"""`mispo plan`: the memory plan of a recipe's roles on its cluster, without allocating the model.

    plan = plan_recipe(load_recipe("recipes/step3p5_flash/math_expert.yaml"))
    print_plan(plan)              # a rich table, one row per role, then each role's verdict and fixes
    plan.to_dict()                # what `mispo plan RECIPE --json` prints

The parameter count comes from the checkpoint's config.json (or builtin:tiny), instantiated on the meta
device. Per GPU, for each role (`resources` in the recipe says where each lives):

- actor: the policy learner (DeepSpeed, ZeRO stage `learner.zero_stage` over `resources.actor_gpus`
  data-parallel GPUs): weights, gradients, optimizer states, activations of one micro-batch (the fused log-prob
  head's chunk of logits, `memory.head_logprob_bytes`: never tokens x vocab), plus the frozen reference model's weights when
  `learner.reference` is on (it lives in the policy worker; 1/N of them under ZeRO-3). With
  `learner.expert_parallel` EP > 1 the routed experts are resident, num_experts / EP per GPU; for a MoE
  model the plan compares ZeRO alone with EP + ZeRO per training step (memory and communication per GPU).
- critic: the same backbone with a value head, same ZeRO stage, over `resources.critic_gpus`; no logits.
- rollout: one vLLM engine per `rollout_tensor_parallel x rollout_data_parallel` GPUs: its weights, a
  runtime reserve, and the KV cache that fills the rest of `rollout.gpu_memory_utilization`.

Bytes are GiB (2^30) throughout. A learner fits when its total is at most USABLE_FRACTION of the GPU
(the rest: CUDA context, NCCL buffers, allocator fragmentation); a CPU run (gpus_per_node = 0) is
measured against this machine's memory. These are estimates for choosing a layout, not guarantees.

    shape.py    the model's parameter counts and layer shapes (meta device, from config.json)
    memory.py   the per-GPU memory formulas (ZeRO states, expert-parallel states, activations and logits,
                KV cache, engine weights)
    comm.py     the policy learner's communication per GPU per step (ZeRO collectives, all-to-all)
    step_time.py  seconds per RL step (generation, log-probs, update, critic, refit) and tokens/s/GPU from
                FLOPs at a stated MFU, comm.py's bytes at link bandwidths and bandwidth-bound decode, with
                its calibration against NeMo-RL's published H100 throughput
    planner.py  the roles' plans, verdicts and fixes
    report.py   the rich table
    units.py    GiB and the number formats of the texts
"""

from mispo.plan.memory import (activation_bytes, expert_parallel_state_bytes, head_logprob_bytes,
                               host_memory_bytes, kv_bytes_per_sequence, kv_bytes_per_token, logits_bytes,
                               model_state_bytes, rollout_weight_bytes)
from mispo.plan.planner import Plan, RolePlan, load_for_plan, plan_file, plan_recipe
from mispo.plan.report import print_plan
from mispo.plan.shape import LayerShape, ModelShape, model_shape
from mispo.plan.step_time import Hardware, StepTimeInputs, shape_from_config
from mispo.plan.units import GiB

__all__ = [
    "GiB",
    "Hardware",
    "LayerShape",
    "ModelShape",
    "Plan",
    "RolePlan",
    "StepTimeInputs",
    "activation_bytes",
    "expert_parallel_state_bytes",
    "head_logprob_bytes",
    "host_memory_bytes",
    "kv_bytes_per_sequence",
    "kv_bytes_per_token",
    "load_for_plan",
    "logits_bytes",
    "model_shape",
    "model_state_bytes",
    "plan_file",
    "plan_recipe",
    "print_plan",
    "rollout_weight_bytes",
    "shape_from_config",
]
