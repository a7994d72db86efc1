"""Release-format checkpoint directories as data: their weights in sync buckets, and whether two
checkpoints can stand in for each other (same architecture, same tokenizer).

    group.sync(read_buckets("runs/math/final"), version=1)   # a running engine now serves that model
    check_interchangeable("runs/sft/final", {"math": "runs/math/final"}, field="merge.experts")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mispo.config import RecipeError

# config.json keys that do not change the computation
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "auto_map",
                "use_cache", "attn_backend", "moe_backend"}


def read_buckets(path: str | Path, bucket_bytes: int = 256 << 20) -> list[list[tuple[str, torch.Tensor]]]:
    """Every tensor of the checkpoint's safetensors files, as (name, tensor) buckets of about `bucket_bytes`."""
    from safetensors import safe_open

    from mispo.weights.transport import bucketize

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files; fix: give a checkpoint directory in release format")

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return bucketize(tensors(), bucket_bytes)


def _config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(file)
    return {k: v for k, v in json.loads(file.read_text()).items() if k not in _BOOKKEEPING}


def _tokenizer_fingerprint(path: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return {"vocab": tok.get_vocab(), "special": tok.special_tokens_map, "chat_template": tok.chat_template}


def architecture_differences(a: Path, b: Path) -> list[str]:
    """Human-readable differences between two checkpoints' architectures and tokenizers ([] = none)."""
    ca, cb = _config(a), _config(b)
    out = [f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return out + tokenizer_differences(a, b)


def tokenizer_differences(a: Path, b: Path) -> list[str]:
    """Human-readable differences between two checkpoints' tokenizers ([] = the same token ids mean the same)."""
    out = []
    ta, tb = _tokenizer_fingerprint(a), _tokenizer_fingerprint(b)
    if ta["vocab"] != tb["vocab"]:
        out.append(f"tokenizer vocabulary: {len(ta['vocab'])} vs {len(tb['vocab'])} tokens"
                   + (" (same size, different tokens)" if len(ta["vocab"]) == len(tb["vocab"]) else ""))
    for key in ("special", "chat_template"):
        if ta[key] != tb[key]:
            out.append(f"tokenizer {key.replace('_', ' ')}: {ta[key]!r} vs {tb[key]!r}")
    return out


def check_interchangeable(reference: str | Path, others: dict[str, str | Path], field: str,
                          reference_field: str = "model.path", source: str | None = None) -> None:
    """Raise RecipeError naming `field.<name>` when a checkpoint is missing or its architecture or
    tokenizer differs from `reference` (their weights could not be loaded into one engine or compared)."""
    where = f" ({source})" if source else ""
    for name, path in {reference_field: reference, **{f"{field}.{k}": v for k, v in others.items()}}.items():
        _require_checkpoint(name, path, where)
    for name, path in others.items():
        diff = architecture_differences(Path(reference), Path(path))
        if diff:
            shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in diff[:5])
            more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
            raise RecipeError(f"{field}.{name} = {str(path)!r}{where}: its architecture or tokenizer differs from "
                              f"the student's ({reference_field} = {str(reference)!r}): {shown}{more}; fix: distil "
                              "experts trained from the student's architecture and tokenizer")


def check_same_tokenizer(reference: str | Path, others: dict[str, str | Path], field: str,
                         source: str | None = None) -> None:
    """Raise RecipeError naming `field.<name>` when a checkpoint is missing or its tokenizer differs from
    `reference`'s (a teacher scores the student's token ids; its architecture and size are its own)."""
    where = f" ({source})" if source else ""
    for name, path in others.items():
        _require_checkpoint(f"{field}.{name}", path, where)
        diff = tokenizer_differences(Path(reference), Path(path))
        if diff:
            raise RecipeError(f"{field}.{name} = {str(path)!r}{where}: its tokenizer differs from the policy's "
                              f"({reference}): {'; '.join(d[:200] for d in diff[:3])}; fix: a teacher with the "
                              "policy's tokenizer (it scores the policy's token ids)")


def _require_checkpoint(name: str, path: str | Path, where: str) -> None:
    """RecipeError naming the field `name` unless `path` is a checkpoint directory (has config.json)."""
    if not (Path(path) / "config.json").is_file():
        raise RecipeError(f"{name} = {str(path)!r}{where}: not a checkpoint directory (no config.json); "
                          "fix: point it at a model saved in release format (e.g. a run's final/)")
