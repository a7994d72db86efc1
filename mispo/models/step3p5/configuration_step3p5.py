"""Step3p5Config: the released Step 3.5 Flash `config.json`, accepted unchanged and validated.

Per-layer lists (`layer_types`, `rope_theta`, `partial_rotary_factors`, `swiglu_limits`,
`swiglu_limits_shared`) have one entry per decoder layer *and* per MTP layer:
`num_hidden_layers + num_nextn_predict_layers` entries (48 in the release). MTP layer k uses
index `num_hidden_layers + k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from transformers import PretrainedConfig

LAYER_TYPES = ("full_attention", "sliding_attention")
ROUTER_ACTIVATIONS = ("sigmoid", "softmax")


class ConfigError(ValueError):
    """A Step3p5 config field is inconsistent; the message names the field and the fix."""


@dataclass(frozen=True)
class AttentionSpec:
    """Resolved attention settings of one layer (decoder or MTP)."""

    layer_type: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None  # key visible when q_pos - k_pos < window; None = full causal
    rope_theta: float
    rotary_dim: int  # NeoX rotate-half on the first rotary_dim dims of each head
    rope_scaling: dict | None  # llama3 scaling dict, or None where it does not apply
    use_rope: bool


class Step3p5Config(PretrainedConfig):
    """Configuration of the Step 3.5 Flash MoE backbone (model_type `step3p5`).

    Defaults are the released 196B model's values; the released `config.json` loads unchanged.
    Unknown extra fields are kept (as every Hugging Face config does).
    """

    model_type = "step3p5"
    keys_to_ignore_at_inference = ["past_key_values"]
    # No remote code: mispo registers the Auto classes itself (`mispo/auto_registration.py`). Readers that
    # look for remote code here (TRL's `create_model_from_path`) then fall back to AutoModelForCausalLM.
    # Read-only, so nothing can add an entry to every config at once; a config.json's own auto_map still
    # loads as that instance's attribute and is written back.
    auto_map = MappingProxyType({})

    def __init__(
        self,
        vocab_size: int = 128896,
        hidden_size: int = 4096,
        intermediate_size: int = 11264,
        num_hidden_layers: int = 45,
        num_attention_heads: int = 64,
        num_attention_groups: int = 8,
        head_dim: int = 128,
        max_position_embeddings: int = 262144,
        rms_norm_eps: float = 1e-5,
        rope_theta: float | list[float] = 5e6,
        rope_scaling: dict | None = None,
        partial_rotary_factors: list[float] | None = None,
        yarn_only_types: list[str] | None = None,
        use_rope_layers: list[bool] | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int = 512,
        attention_other_setting: dict | None = None,
        use_head_wise_attn_gate: bool = True,
        use_qk_norm: bool = True,
        zero_centered: bool = True,
        att_impl_type: str = "GQA",
        moe_layers_enum: str | None = None,
        moe_num_experts: int = 288,
        moe_top_k: int = 8,
        moe_intermediate_size: int = 1280,
        share_expert_dim: int = 1280,
        moe_router_activation: str = "sigmoid",
        use_moe_router_bias: bool = True,
        norm_expert_weight: bool = True,
        moe_router_scaling_factor: float = 3.0,
        need_fp32_gate: bool = True,
        swiglu_limits: list[float] | None = None,
        swiglu_limits_shared: list[float] | None = None,
        num_nextn_predict_layers: int = 3,
        load_mtp_layers: bool = True,
        attn_backend: str = "auto",
        moe_backend: str = "auto",
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_attention_groups = num_attention_groups
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.num_nextn_predict_layers = num_nextn_predict_layers
        n_all = num_hidden_layers + num_nextn_predict_layers
        self.rope_theta = rope_theta
        # transformers aliases rope_scaling to rope_parameters and rewrites it; keep the release's dict.
        self.release_rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.partial_rotary_factors = partial_rotary_factors if partial_rotary_factors is not None else [1.0] * n_all
        self.yarn_only_types = yarn_only_types
        # [] is vLLM's default for Step3p5 configs: every layer uses RoPE, as None does here
        self.use_rope_layers = list(use_rope_layers) if use_rope_layers else None
        if layer_types is None:
            layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n_all)]
        # transformers checks len(layer_types) == num_hidden_layers, so the MTP entries are kept apart
        # and joined again when the config is written (see to_dict): the file keeps the release format.
        self.layer_types = list(layer_types[:num_hidden_layers])
        self.mtp_layer_types = list(layer_types[num_hidden_layers:])
        self.sliding_window = sliding_window
        self.attention_other_setting = attention_other_setting
        self.use_head_wise_attn_gate = use_head_wise_attn_gate
        self.use_qk_norm = use_qk_norm
        self.zero_centered = zero_centered
        self.att_impl_type = att_impl_type
        self.moe_layers_enum = moe_layers_enum if moe_layers_enum is not None else ",".join(
            str(i) for i in range(3, num_hidden_layers)
        )
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_intermediate_size = moe_intermediate_size
        self.share_expert_dim = share_expert_dim
        self.moe_router_activation = moe_router_activation
        self.use_moe_router_bias = use_moe_router_bias
        self.norm_expert_weight = norm_expert_weight
        self.moe_router_scaling_factor = moe_router_scaling_factor
        self.need_fp32_gate = need_fp32_gate
        self.swiglu_limits = swiglu_limits if swiglu_limits is not None else [0.0] * n_all
        self.swiglu_limits_shared = swiglu_limits_shared if swiglu_limits_shared is not None else [0.0] * n_all
        self.load_mtp_layers = load_mtp_layers
        self.attn_backend = attn_backend
        self.moe_backend = moe_backend
        if eos_token_id is None:
            eos_token_id = [1, 2, 128007]
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_step3p5()

    # ----------------------------------------------------------------- validation
    def validate_step3p5(self) -> None:
        """Raise ConfigError naming the field when the config is inconsistent."""
        n_all = self.num_hidden_layers + self.num_nextn_predict_layers
        for name in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                     "num_attention_groups", "head_dim", "moe_num_experts", "moe_top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        for name in ("all_layer_types", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
            self._check_per_layer_list(name, n_all)
        if isinstance(self.rope_theta, (list, tuple)):
            self._check_per_layer_list("rope_theta", n_all)
        if self.use_rope_layers is not None:
            self._check_per_layer_list("use_rope_layers", n_all)
        for i, t in enumerate(self.all_layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] = {t!r} is unknown; use one of {LAYER_TYPES}")
        for i, f in enumerate(self.partial_rotary_factors):
            if not 0.0 < float(f) <= 1.0:
                raise ConfigError(f"partial_rotary_factors[{i}] = {f} must be in (0, 1]")
        for name in ("swiglu_limits", "swiglu_limits_shared"):
            for i, v in enumerate(getattr(self, name)):
                if v is not None and float(v) < 0:
                    raise ConfigError(f"{name}[{i}] = {v} must be >= 0 (0 turns the clamp off)")
        if self.att_impl_type != "GQA":
            raise ConfigError(f"att_impl_type = {self.att_impl_type!r} is not supported; only 'GQA'")
        if self.moe_router_activation not in ROUTER_ACTIVATIONS:
            raise ConfigError(f"moe_router_activation = {self.moe_router_activation!r}; use one of {ROUTER_ACTIVATIONS}")
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(f"moe_top_k = {self.moe_top_k} exceeds moe_num_experts = {self.moe_num_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window = {self.sliding_window} must be a positive integer")
        other = self.attention_other_setting
        if other is not None:
            missing = {"attention_type", "num_attention_heads", "num_attention_groups", "head_dim"} - set(other)
            if missing:
                raise ConfigError(f"attention_other_setting lacks {sorted(missing)}")
            if other["attention_type"] not in LAYER_TYPES:
                raise ConfigError(f"attention_other_setting.attention_type = {other['attention_type']!r} is unknown")
        try:
            moe_layers = self.moe_layer_ids
        except ValueError:
            raise ConfigError(f"moe_layers_enum = {self.moe_layers_enum!r} must be comma-separated layer ids") from None
        bad = [i for i in moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"moe_layers_enum names layers {bad} outside 0..{self.num_hidden_layers - 1}")
        for i in range(n_all):
            spec = self.attention_spec(i)
            if spec.num_heads % spec.num_kv_heads:
                src = "attention_other_setting" if self._uses_other_setting(i) else "num_attention_heads"
                raise ConfigError(
                    f"{src}: {spec.num_heads} query heads are not divisible by {spec.num_kv_heads} KV heads "
                    f"(layer {i}, {spec.layer_type})")
            if spec.rotary_dim % 2:
                raise ConfigError(f"partial_rotary_factors[{i}] gives an odd rotary dim {spec.rotary_dim}")

    def _check_per_layer_list(self, name: str, n_all: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, (list, tuple)) or len(value) != n_all:
            got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ConfigError(
                f"{name} must have num_hidden_layers + num_nextn_predict_layers = "
                f"{self.num_hidden_layers} + {self.num_nextn_predict_layers} = {n_all} entries, got {got}")

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """The release's format: one `layer_types` list over decoder + MTP layers, `rope_scaling`."""
        out = super().to_dict()
        out["layer_types"] = self.all_layer_types
        out.pop("mtp_layer_types", None)
        out.pop("rope_parameters", None)
        out["rope_scaling"] = out.pop("release_rope_scaling", None)
        return out

    # ----------------------------------------------------------------- per-layer views
    @property
    def all_layer_types(self) -> list[str]:
        return list(self.layer_types) + list(self.mtp_layer_types)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [int(s) for s in str(self.moe_layers_enum).split(",") if s.strip()]

    def is_moe_layer(self, i: int) -> bool:
        return i < self.num_hidden_layers and i in set(self.moe_layer_ids)

    def _uses_other_setting(self, i: int) -> bool:
        other = self.attention_other_setting
        return bool(other) and self.all_layer_types[i] == other["attention_type"]

    def attention_spec(self, i: int) -> AttentionSpec:
        """Attention settings of layer i (0..num_hidden_layers-1 decoder, then MTP layers)."""
        layer_type = self.all_layer_types[i]
        if self._uses_other_setting(i):
            other = self.attention_other_setting
            heads, kv, head_dim = other["num_attention_heads"], other["num_attention_groups"], other["head_dim"]
        else:
            heads, kv, head_dim = self.num_attention_heads, self.num_attention_groups, self.head_dim
        theta = self.rope_theta[i] if isinstance(self.rope_theta, (list, tuple)) else self.rope_theta
        scaling = self.release_rope_scaling
        if scaling is not None and self.yarn_only_types and layer_type not in self.yarn_only_types:
            scaling = None
        return AttentionSpec(
            layer_type=layer_type,
            num_heads=int(heads),
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            window=self.sliding_window if layer_type == "sliding_attention" else None,
            rope_theta=float(theta),
            rotary_dim=int(head_dim * float(self.partial_rotary_factors[i])),
            rope_scaling=scaling,
            use_rope=bool(self.use_rope_layers[i]) if self.use_rope_layers is not None else True,
        )

    def swiglu_limit(self, i: int, shared: bool) -> float:
        """Clamp limit of layer i's routed experts (shared=False) or shared expert / dense MLP; 0 = off."""
        value = (self.swiglu_limits_shared if shared else self.swiglu_limits)[i]
        return float(value or 0.0)
