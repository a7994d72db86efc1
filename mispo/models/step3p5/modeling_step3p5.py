"""Step 3.5 Flash in PyTorch, readable top to bottom.

    h   = x + Attn(input_layernorm(x))
    out = h + FFN(post_attention_layernorm(h))        FFN = dense SwiGLU, or MoE + shared expert

Module and parameter names are the release checkpoint's key names (`model.layers.N.moe.gate_proj.weight`
is a stacked [E, I, H] tensor, ...), so `save_pretrained` / `from_pretrained` read and write the
release format with no renaming. MTP layers live at `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .backends import get_attention_backend, get_experts_backend
from .configuration_step3p5 import AttentionSpec, ConfigError, Step3p5Config
from .layout import SequenceLayout
from .reference_ops import swiglu


# --------------------------------------------------------------------------- building blocks
class ZeroCenteredRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32; the stored weight is (gamma - 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return y.to(x.dtype)


def rope_inv_freq(spec: AttentionSpec) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/rotary_dim), with llama3 frequency scaling when the layer has it."""
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.rotary_dim, 2, dtype=torch.float64) / spec.rotary_dim))
    s = spec.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return inv_freq.float()
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low) if low != high else torch.zeros_like(inv_freq)
    scaled = torch.where(
        wavelen < orig / high, inv_freq,
        torch.where(wavelen > orig / low, inv_freq / factor, (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return scaled.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX rotate-half on the first rotary_dim dims of each head. x [B, T, H, D]; cos/sin [B, T, rotary_dim/2]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


class SwiGLUMLP(nn.Module):
    """down(SwiGLU(gate(x), up(x))), clamped when limit > 0. Dense layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


# --------------------------------------------------------------------------- attention
class Step3p5Attention(nn.Module):
    """GQA with per-head q/k RMSNorm before partial NeoX RoPE, optional sliding window, head-wise gate.

    out = o_proj( attn_h * sigmoid(g_proj(x))_h ), where g_proj reads the same normed input as q/k/v.
    """

    def __init__(self, config: Step3p5Config, layer_idx: int):
        super().__init__()
        self.spec = spec = config.attention_spec(layer_idx)
        self.layer_idx = layer_idx
        self.config = config
        hidden, hq, hkv, d = config.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(hidden, hq * d, bias=False)
        self.k_proj = nn.Linear(hidden, hkv * d, bias=False)
        self.v_proj = nn.Linear(hidden, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, hidden, bias=False)
        self.g_proj = nn.Linear(hidden, hq, bias=False) if config.use_head_wise_attn_gate else None
        self.q_norm = ZeroCenteredRMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = ZeroCenteredRMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        b, t, _ = x.shape
        spec = self.spec
        q = self.q_proj(x).view(b, t, spec.num_heads, spec.head_dim)
        k = self.k_proj(x).view(b, t, spec.num_kv_heads, spec.head_dim)
        v = self.v_proj(x).view(b, t, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.use_rope:
            angles = layout.position_ids[..., None].float() * self.inv_freq.float()
            cos, sin = angles.cos(), angles.sin()
            q, k = apply_rope(q, cos, sin, spec.rotary_dim), apply_rope(k, cos, sin, spec.rotary_dim)
        attn = get_attention_backend(self.config.attn_backend, x.device)
        out = attn(q, k, v, layout, spec.window, spec.head_dim ** -0.5)  # [B, T, Hq, D]
        if self.g_proj is not None:
            out = out * torch.sigmoid(self.g_proj(x))[..., None].to(out.dtype)
        return self.o_proj(out.reshape(b, t, spec.num_heads * spec.head_dim))


# --------------------------------------------------------------------------- MoE
class StackedExpertWeight(nn.Module):
    """One [E, out, in] tensor holding a projection of every expert (the release's stacked format)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


@dataclass
class Routing:
    """What the router decided for N tokens; kept on the module for losses and statistics."""

    scores: torch.Tensor  # [N, E] fp32 unbiased sigmoid (or softmax) scores
    topk_ids: torch.Tensor  # [N, K]
    topk_weights: torch.Tensor  # [N, K] renormalised, scaled
    replay_mismatch: float | None = None  # R3: fraction of replayed tokens whose own top-K set differs


class Step3p5MoE(nn.Module):
    """Routed experts with an fp32 router; selection by score + router_bias, weights from unbiased scores.

    s = sigmoid(x.float() @ gate.weight.float().T); ids = topk(s + router_bias, K);
    w = s[ids] / sum(s[ids]) * moe_router_scaling_factor; out = sum_k w_k * Expert_{ids_k}(x).
    router_bias is an fp32 buffer: loss-free balancing moves it, gradients never do.
    Expert parallel (`expert_parallel.py`): the experts are this rank's block and tokens move by all-to-all.
    Routing replay (`routing_replay.py`): `replay_ids` replaces the selection, w = s[replayed ids] normalised.
    """

    def __init__(self, config: Step3p5Config, layer_idx: int):
        super().__init__()
        e, h, i = config.moe_num_experts, config.hidden_size, config.moe_intermediate_size
        self.config = config
        self.top_k = config.moe_top_k
        self.limit = config.swiglu_limit(layer_idx, shared=False)
        self.gate = nn.Linear(h, e, bias=False)
        self.register_buffer("router_bias", torch.zeros(e, dtype=torch.float32))
        self.gate_proj = StackedExpertWeight(e, i, h)
        self.up_proj = StackedExpertWeight(e, i, h)
        self.down_proj = StackedExpertWeight(e, h, i)
        self.layer_idx = layer_idx
        self.last_routing: Routing | None = None
        self.replay_ids: torch.Tensor | None = None  # routing replay (R3): [N, K] expert ids, -1 = route freely
        self.expert_shard = None  # set by expert_parallel.shard_moe: this rank's experts, outside parameters()

    def route(self, x: torch.Tensor) -> Routing:
        logits = x.float() @ self.gate.weight.float().T
        if self.config.moe_router_activation == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        choice = scores + self.router_bias.float() if self.config.use_moe_router_bias else scores
        topk_ids = torch.topk(choice.detach(), self.top_k, dim=-1).indices
        mismatch = None
        if self.replay_ids is not None:  # R3: the experts the rollout engine chose; weights stay this model's
            replay = self.replay_ids.to(topk_ids.device).long()
            recorded = replay[:, 0] >= 0
            differs = (replay.sort(-1).values != topk_ids.sort(-1).values).any(-1) & recorded
            mismatch = float(differs.sum()) / max(int(recorded.sum()), 1)
            topk_ids = torch.where(recorded[:, None], replay, topk_ids)
        weights = scores.gather(-1, topk_ids)
        if self.config.norm_expert_weight:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
        return Routing(scores, topk_ids, weights * self.config.moe_router_scaling_factor, mismatch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(flat)
        self.last_routing = routing
        experts = get_experts_backend(self.config.moe_backend, x.device)
        if self.expert_shard is not None:  # expert parallel: tokens travel to the ranks holding their experts
            from .expert_parallel import expert_parallel_experts
            out = expert_parallel_experts(flat, routing.topk_ids, routing.topk_weights, self.expert_shard,
                                          experts, self.limit)
        else:
            out = experts(flat, routing.topk_ids, routing.topk_weights, self.gate_proj.weight,
                          self.up_proj.weight, self.down_proj.weight, self.limit)
        return out.reshape(shape)


# --------------------------------------------------------------------------- layers
class Step3p5DecoderLayer(nn.Module):
    """h = x + Attn(norm(x)); out = h + FFN(norm(h)). FFN: MoE + shared expert, or a dense SwiGLU."""

    def __init__(self, config: Step3p5Config, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = ZeroCenteredRMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(h, config.rms_norm_eps)
        self.self_attn = Step3p5Attention(config, layer_idx)
        shared_limit = config.swiglu_limit(layer_idx, shared=True)
        if config.is_moe_layer(layer_idx):
            self.moe = Step3p5MoE(config, layer_idx)
            self.share_expert = SwiGLUMLP(h, config.share_expert_dim, shared_limit)
        else:
            self.mlp = SwiGLUMLP(h, config.intermediate_size, shared_limit)

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), layout)
        y = self.post_attention_layernorm(h)
        ffn = self.moe(y) + self.share_expert(y) if hasattr(self, "moe") else self.mlp(y)
        return h + ffn


class SharedHead(nn.Module):
    def __init__(self, config: Step3p5Config):
        super().__init__()
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPHeadWrapper(nn.Module):
    """Holds `transformer.shared_head` so the keys read `model.layers.N.transformer.shared_head.*`."""

    def __init__(self, config: Step3p5Config):
        super().__init__()
        self.shared_head = SharedHead(config)


class Step3p5MTPLayer(Step3p5DecoderLayer):
    """Multi-token prediction head k: x = eh_proj([enorm(embed(tok_{t+1+k})), hnorm(h_prev_t)]),
    one decoder layer (dense MLP), logits = shared_head.output(shared_head.norm(.)); predicts tok_{t+2+k}.
    """

    def __init__(self, config: Step3p5Config, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.enorm = ZeroCenteredRMSNorm(h, config.rms_norm_eps)
        self.hnorm = ZeroCenteredRMSNorm(h, config.rms_norm_eps)
        self.transformer = MTPHeadWrapper(config)

    def predict(self, next_embeds: torch.Tensor, h_prev: torch.Tensor, layout: SequenceLayout):
        """Returns (hidden state for the next head, logits)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h_prev)], dim=-1))
        h = self(x, layout)
        head = self.transformer.shared_head
        return h, head.output(head.norm(h))


# --------------------------------------------------------------------------- models
class Step3p5PreTrainedModel(PreTrainedModel):
    config_class = Step3p5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Step3p5DecoderLayer", "Step3p5MTPLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"\.inv_freq$"]

    def __init__(self, config: Step3p5Config, *args, **kwargs):
        if not isinstance(config, Step3p5Config):
            raise ConfigError(
                f"{type(self).__name__} needs mispo's Step3p5Config, got {type(config).__module__}."
                f"{type(config).__name__} (vLLM registers its own class for model_type step3p5); read the "
                "checkpoint with mispo.models.step3p5.Step3p5Config.from_pretrained(path) or load the model with "
                "from_pretrained(path)")
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a release-format checkpoint. MTP layers load when the checkpoint has them; a checkpoint
        without them loads with `load_mtp_layers=False` instead of random MTP weights. A config of another
        library's Step3p5Config class (what `AutoConfig` returns once vLLM has loaded a step3p5 checkpoint
        in this process) is replaced by mispo's, read from the checkpoint's config.json."""
        config = kwargs.get("config")
        if config is not None and not isinstance(config, Step3p5Config):
            if getattr(config, "model_type", None) != "step3p5":
                raise ConfigError(f"config: model_type {getattr(config, 'model_type', None)!r} is not a Step3p5 "
                                  "config; pass a mispo Step3p5Config or none")
            kwargs.pop("config")
        path = Path(pretrained_model_name_or_path)
        if kwargs.get("config") is None and path.is_dir() and (path / "config.json").exists():
            config = Step3p5Config.from_pretrained(path)
            n = config.num_hidden_layers
            if config.num_nextn_predict_layers and not any(
                    k.startswith(f"model.layers.{n}.") for k in checkpoint_keys(path)):
                config.load_mtp_layers = False
            kwargs["config"] = config
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, StackedExpertWeight)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, ZeroCenteredRMSNorm):
            module.weight.zero_()
        elif isinstance(module, Step3p5MoE):
            module.router_bias.zero_()
        elif isinstance(module, Step3p5Attention):
            module.inv_freq.copy_(rope_inv_freq(module.spec))


def sequence_layout(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> SequenceLayout:
    """The batch's `SequenceLayout` from Hugging Face inputs: exactly one of input_ids [B, T] /
    inputs_embeds [B, T, H]; attention_mask [B, T] (1 = token, 0 = padding, left or right); position_ids
    [B, T] (None: counted over real tokens from 0; restarting at 0 marks packed sequences)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    shape = tuple(ref.shape[:2])
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; Step3p5 takes a 2-D [batch, length] = {shape} "
                             f"{name} (no 4-D masks: padding comes as a 2-D mask, packing as position_ids)")
    return SequenceLayout.build(shape, ref.device, attention_mask, position_ids)


def check_no_cache(past_key_values, output_attentions: bool | None) -> None:
    """Step3p5 keeps no KV cache and its attention backends return no attention weights."""
    if past_key_values is not None and (not hasattr(past_key_values, "get_seq_length")
                                        or past_key_values.get_seq_length() > 0):
        raise ValueError("past_key_values: Step3p5 keeps no KV cache; pass the whole sequence (prefix and new "
                         "tokens) with past_key_values=None (generate does this itself)")
    if output_attentions:
        raise ValueError("output_attentions=True: Step3p5's attention backends do not return attention weights")


@dataclass
class Step3p5ModelOutput(BaseModelOutputWithPast):
    """last_hidden_state is after the final norm (the Hugging Face convention); hidden_states_pre_norm before it."""

    hidden_states_pre_norm: torch.Tensor | None = None


class Step3p5Model(Step3p5PreTrainedModel):
    """Embeddings, decoder layers (then MTP layers in the same list), final norm."""

    def __init__(self, config: Step3p5Config):
        super().__init__(config)
        n_mtp = config.num_nextn_predict_layers if config.load_mtp_layers else 0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = [Step3p5DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        layers += [Step3p5MTPLayer(config, config.num_hidden_layers + k) for k in range(n_mtp)]
        self.layers = nn.ModuleList(layers)
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def decoder_layers(self) -> list[Step3p5DecoderLayer]:
        return list(self.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[Step3p5MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers:])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, layout: SequenceLayout | None = None,
                **kwargs) -> Step3p5ModelOutput | tuple:
        """The Hugging Face backbone call (what TRL's and peft's wrappers make): padding via attention_mask,
        packing via position_ids (see `sequence_layout`), or a ready `layout`. hidden_states (when asked):
        each decoder layer's input, then the final-normed output. No KV cache: use_cache is accepted and
        nothing is cached (past_key_values must be empty)."""
        check_no_cache(past_key_values, output_attentions)
        if layout is None:
            layout = sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.decoder_layers:
            if all_hidden is not None:
                all_hidden.append(h)
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, layout, use_reentrant=False)
            else:
                h = layer(h, layout)
        hidden = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(hidden)
        out = Step3p5ModelOutput(last_hidden_state=hidden, hidden_states_pre_norm=h,
                                 hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out.to_tuple() if return_dict is False else out


@dataclass
class Step3p5Output(CausalLMOutputWithPast):
    mtp_loss: torch.Tensor | None = None
    hidden_states_pre_norm: torch.Tensor | None = None


class Step3p5ForCausalLM(Step3p5PreTrainedModel, GenerationMixin):
    """Causal LM with an untied lm_head; `mtp_losses` trains the multi-token prediction heads.

    forward(input_ids, attention_mask=None, position_ids=None, labels=None, mtp_weight=0.0, ...): the
    Hugging Face causal-LM call (left or right padding, logits_to_keep, num_items_in_batch, return_dict).
    Packed (padding-free) batches: pass position_ids restarting at 0 for each sequence.
    No KV cache: `generate` runs the whole sequence at every step (serve with vLLM for speed).
    """

    _tied_weights_keys: dict = {}

    def __init__(self, config: Step3p5Config):
        super().__init__(config)
        self.model = Step3p5Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, mtp_weight: float = 0.0,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs) -> Step3p5Output | tuple:
        """logits[:, t] predict token t + 1; logits_to_keep = n > 0 keeps the last n positions (a tensor: those
        indices). loss (labels given): cross-entropy of logits[t] against labels[t + 1] over labels != -100,
        a mean, or the sum / num_items_in_batch when given (gradient accumulation, as Trainer passes it)."""
        layout = sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids)
        base = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          layout=layout)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(base.last_hidden_state[:, keep])
        loss = mtp_loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(f"labels cover {labels.shape[1]} positions but logits_to_keep kept "
                                 f"{logits.shape[1]}: pass logits_to_keep=0 with labels")
            loss = next_token_loss(logits, labels, layout, num_items_in_batch=num_items_in_batch)
            if mtp_weight > 0 and self.model.mtp_layers:
                if input_ids is None:
                    raise ValueError("mtp_weight > 0 needs input_ids (the MTP heads embed the next tokens)")
                h = base.hidden_states_pre_norm
                mtp_loss = torch.stack(self.mtp_losses(input_ids, h, labels, layout)).mean()
                loss = loss + mtp_weight * mtp_loss
        out = Step3p5Output(loss=loss, logits=logits, mtp_loss=mtp_loss, hidden_states=base.hidden_states,
                            hidden_states_pre_norm=base.hidden_states_pre_norm)
        return out.to_tuple() if return_dict is False else out

    def mtp_losses(self, input_ids: torch.Tensor, hidden_pre_norm: torch.Tensor, labels: torch.Tensor,
                   layout: SequenceLayout) -> list[torch.Tensor]:
        """Cross-entropy of MTP head k predicting labels shifted by 2 + k (positions that cross a
        sequence boundary or padding are ignored). One loss per head."""
        embeds = self.model.embed_tokens(input_ids)
        losses, h_prev = [], hidden_pre_norm
        for k, layer in enumerate(self.model.mtp_layers):
            shift = k + 1
            next_embeds = torch.cat([embeds[:, shift:], torch.zeros_like(embeds[:, :shift])], dim=1)
            h_prev, logits = layer.predict(next_embeds, h_prev, layout)
            losses.append(next_token_loss(logits, labels, layout, offset=k + 2))
        return losses

    # ----------------------------------------------------------------- generation without a KV cache
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No KV cache: `generate` must not build one (transformers' hook for models without `Cache` support)."""
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      past_key_values=None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs) -> dict:
        """Every step runs the whole sequence so far (prompt + generated tokens, with its attention mask
        and position ids): `next_sequence_length` and `past_key_values` are ignored, use_cache is False."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: Step3p5 generates from input_ids only (no KV cache to extend "
                             "a prompt given as embeddings)")
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, past_key_values=None,
                                                       attention_mask=attention_mask, **kwargs)
        inputs["use_cache"] = False
        return inputs


def shifted_targets(labels: torch.Tensor, layout: SequenceLayout, offset: int) -> torch.Tensor:
    """targets[t] = labels[t + offset], or -100 when t + offset leaves the row or t's sequence."""
    b, t = labels.shape
    targets = torch.full_like(labels, -100)
    if offset >= t:
        return targets
    targets[:, : t - offset] = labels[:, offset:]
    if layout.segment_ids is not None:
        seg = layout.segment_ids
        same = torch.zeros_like(labels, dtype=torch.bool)
        same[:, : t - offset] = seg[:, offset:] == seg[:, : t - offset]
        targets = targets.masked_fill(~same, -100)
    return targets


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, layout: SequenceLayout, offset: int = 1,
                    num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits[t] against labels[t + offset] over valid targets (-100 ignored): their mean,
    or their sum / num_items_in_batch when given."""
    targets = shifted_targets(labels, layout, offset)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint directory (sharded or single file)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys.extend(f.keys())
    return keys
