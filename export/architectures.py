"""Which transformers architectures the exporter handles, and what it needs to know about each.

One entry per `model_type` in a dict, not an if/elif chain: adding an architecture is adding an entry
(and a tiny-config test). Every entry here is a decoder-only model whose attention keeps a standard
`DynamicCache` of keys/values shaped [batch, kv_heads, length, head_dim], which is what the export
wrapper feeds and reads back.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in `ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the exporter needs about one architecture.

    Attributes:
        model_type: transformers' `config.model_type`.
        genai_type: `model.type` in onnxruntime-genai's genai_config.json.
    """

    model_type: str
    genai_type: str


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache: `num_layers` pairs of [batch, num_kv_heads, length, head_dim] tensors."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama", genai_type="llama"),
    "mistral": ArchitectureSpec("mistral", genai_type="mistral"),
    "qwen2": ArchitectureSpec("qwen2", genai_type="qwen2"),
    "qwen3": ArchitectureSpec("qwen3", genai_type="qwen3"),
}


def get_architecture(config) -> ArchitectureSpec:
    """The registry entry for a transformers config.

    Raises:
        UnsupportedArchitectureError: a one-line message naming the architecture and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"cannot export architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return spec


def kv_layout(config) -> KVLayout:
    """The KV-cache layout of a decoder config (head_dim defaults to hidden_size / heads)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVLayout(num_layers=int(config.num_hidden_layers), num_attention_heads=heads,
                    num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                    head_dim=int(head_dim), hidden_size=int(config.hidden_size))
