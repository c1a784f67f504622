"""Int8 output head for export: the logits projection as ORT's `com.microsoft::MatMulNBits` (8 bits).

The output projection of a small LM is its largest matrix (SmolLM2-135M: 49152 x 576, 113 MB in fp32, a fifth of
the model) and, tied to the input embedding, it is read in full for every generated token. Stored as int8 with
one fp32 scale per block of 32 inputs it takes 0.28 of its fp32 bytes, and MatMulNBits (accuracy level 4: int8
activations, integer dot products) reads it at int8 speed. A tied input embedding reads the same int8 tensor:
one row per token is gathered and dequantized, so the table is stored once.

Quantization is symmetric round-to-nearest per block (q = round(w / s) + 128, s = max|w| / 127), the encoding
MatMulNBits reads for 8 bits without a zero-point input (its default zero point is 128).
"""

from __future__ import annotations

import torch
from torch import nn

MS_DOMAIN = "com.microsoft"
BLOCK_SIZE = 32
BITS = 8
# 4: activations quantized to int8 per block, integer dot products (ORT's fast CPU path, as its int4 baseline).
ACCURACY_LEVEL = 4
_ZERO_POINT = 1 << (BITS - 1)


def quantize_blocks(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K/bs, bs], scales fp32 [N, K/bs]) of W [N, K], K zero-padded to a multiple of `block_size`."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = torch.zeros(n, blocks * block_size, dtype=torch.float32)
    w[:, :k] = weight.detach().float()
    w = w.view(n, blocks, block_size)
    scales = w.abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero blocks: any scale, q = 128
    q = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127) + _ZERO_POINT
    return q.to(torch.uint8).contiguous(), scales.contiguous()


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of W back from `quantize_blocks` output (any leading dims), in `dtype`, cut to K columns."""
    w = (q.to(dtype) - _ZERO_POINT) * scales.to(dtype).unsqueeze(-1)  # (..., K/bs, bs)
    return w.flatten(-2)[..., :k]


class Int8Head(nn.Module):
    """Stands in for the output projection during export: one `MatMulNBits` node (bits 8, block 32)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Module()  # initializers named `lm_head.weight.q` / `.scales`
        self.weight.register_buffer("q", q)
        self.weight.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.weight.scales.to(x.dtype)  # MatMulNBits wants scales of the activations' type
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic(
                f"{MS_DOMAIN}::MatMulNBits", (x, self.weight.q, scales),
                {"K": self.in_features, "N": self.out_features, "bits": BITS, "block_size": BLOCK_SIZE,
                 "accuracy_level": ACCURACY_LEVEL},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
        return x @ dequantize_blocks(self.weight.q, scales, self.in_features, x.dtype).t()


class Int8Embedding(nn.Module):
    """Stands in for a tied input embedding: gathers int8 rows of the head's table and dequantizes them."""

    def __init__(self, head: Int8Head) -> None:
        super().__init__()
        self.head = head  # shared buffers: the exported model stores the table once
        self.dtype = head.weight.scales.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        return dequantize_blocks(w.q[input_ids], w.scales[input_ids], self.head.in_features, self.dtype)


def int8_head_replacements(model: nn.Module, dtype: torch.dtype) -> dict[str, nn.Module]:
    """{module name: replacement} for the output projection and, when tied to it, the input embedding."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"lm_head='int8' needs a bias-free nn.Linear output projection, got {type(head).__name__}")
    names = {id(module): name for name, module in model.named_modules()}
    q, scales = quantize_blocks(head.weight)
    new_head = Int8Head(q, scales.to(dtype), head.in_features, head.out_features)
    replacements: dict[str, nn.Module] = {names[id(head)]: new_head}
    if isinstance(embedding, nn.Embedding) and embedding.weight is head.weight:
        replacements[names[id(embedding)]] = Int8Embedding(new_head)
    return replacements
