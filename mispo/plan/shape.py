"""The shape of the recipe's model: parameter counts from a meta-device instance (no memory) and the
per-layer attention / MLP sizes the memory formulas need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mispo.config import Recipe, RecipeError, resolve_path


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
    largest_dense_layer_params: int = 0  # the same without routed-expert tensors (ZeRO-3 under expert parallelism)

    @property
    def expert_active_fraction(self) -> float:
        """top_k / num_experts of the MoE layers (1.0 for a dense model)."""
        moe = [layer for layer in self.layers if layer.experts]
        return moe[0].top_k / moe[0].experts if moe else 1.0

    @property
    def moe_layers(self) -> list[LayerShape]:
        return [layer for layer in self.layers if layer.experts]

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return self.moe_layers[0].experts if self.moe_layers else 0

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
    largest = dense_largest = 0
    for prefix, m in model.named_modules():
        own = [(f"{prefix}.{n}", p.numel()) for n, p in m.named_parameters(recurse=False)]
        largest = max(largest, sum(n for _, n in own))
        dense_largest = max(dense_largest, sum(n for name, n in own if not _is_routed_expert(name, step3p5)))
    name = recipe.model.path if recipe.model.path.startswith("builtin:") else Path(recipe.model.path).name
    return ModelShape(name=name, hidden=config.hidden_size, vocab=config.vocab_size, layers=layer_shapes(config),
                      total_params=total, routed_params=routed, embedding_params=emb, mtp_params=mtp,
                      largest_layer_params=largest, largest_dense_layer_params=dense_largest)
