"""Quantized output head for export: the logits projection as ORT's `com.microsoft::MatMulNBits` (8 or 4 bits).

The output projection of a small LM is its largest matrix (SmolLM2-135M: 49152 x 576, 113 MB in fp32, a fifth of
the model) and, tied to the input embedding, it is read in full for every generated token. Stored as int8 with
one fp32 scale per block of 32 inputs it takes 0.28 of its fp32 bytes (int4: 0.16), and MatMulNBits (accuracy
level 4: int8 activations, integer dot products) reads it at that width. A tied input embedding reads the same
quantized tensor: one row per token is gathered and dequantized, so the table is stored once.

Quantization is symmetric round-to-nearest per block (q = round(w / s) + z, s = max|w| / (z - 1), z = 128 for 8
bits and 8 for 4 bits), the encoding MatMulNBits reads without a zero-point input (its default zero point is z).
4-bit codes are packed two to a byte, the even column of each pair in the low nibble, as MatMulNBits stores them.
"""

from __future__ import annotations

import torch
from torch import nn

from salr_edge.config import VALUE_BITS

MS_DOMAIN = "com.microsoft"
BLOCK_SIZE = 32
# 4: activations quantized to int8 per block, integer dot products (ORT's fast CPU path, as its int4 baseline).
ACCURACY_LEVEL = 4


def _zero_point(bits: int) -> int:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return 1 << (bits - 1)


def quantize_blocks(weight: torch.Tensor, block_size: int = BLOCK_SIZE,
                    bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K/bs, bs * bits / 8], scales fp32 [N, K/bs]) of W [N, K], K zero-padded to a multiple of
    `block_size`; 4-bit codes packed two to a byte (low nibble first)."""
    zero = _zero_point(bits)
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = torch.zeros(n, blocks * block_size, dtype=torch.float32)
    w[:, :k] = weight.detach().float()
    w = w.view(n, blocks, block_size)
    scales = w.abs().amax(dim=-1) / (zero - 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero blocks: any scale, q = zero
    q = (torch.round(w / scales.unsqueeze(-1)).clamp_(1 - zero, zero - 1) + zero).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.contiguous(), scales.contiguous()


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype,
                      bits: int = 8) -> torch.Tensor:
    """Rows of W back from `quantize_blocks` output (any leading dims), in `dtype`, cut to K columns."""
    zero = _zero_point(bits)
    codes = q.to(dtype)
    if bits == 4:  # unpacked in float (exact for bytes): bitwise ops on uint8 do not trace to one ONNX type
        high = torch.floor(codes / 16)
        codes = torch.stack((codes - 16 * high, high), dim=-1).flatten(-2)
    w = (codes - zero) * scales.to(dtype).unsqueeze(-1)  # (..., K/bs, bs)
    return w.flatten(-2)[..., :k]


class QuantizedHead(nn.Module):
    """Stands in for the output projection during export: one `MatMulNBits` node (bits 8 or 4, block 32)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int,
                 bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Module()  # initializers named `lm_head.weight.q` / `.scales`
        self.weight.register_buffer("q", q)
        self.weight.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.weight.scales.to(x.dtype)  # MatMulNBits wants scales of the activations' type
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic(
                f"{MS_DOMAIN}::MatMulNBits", (x, self.weight.q, scales),
                {"K": self.in_features, "N": self.out_features, "bits": self.bits, "block_size": BLOCK_SIZE,
                 "accuracy_level": ACCURACY_LEVEL},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
        return x @ dequantize_blocks(self.weight.q, scales, self.in_features, x.dtype, self.bits).t()


class QuantizedEmbedding(nn.Module):
    """Stands in for a tied input embedding: gathers quantized rows of the head's table and dequantizes them."""

    def __init__(self, head: QuantizedHead) -> None:
        super().__init__()
        self.head = head  # shared buffers: the exported model stores the table once
        self.dtype = head.weight.scales.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        return dequantize_blocks(w.q[input_ids], w.scales[input_ids], self.head.in_features, self.dtype,
                                 self.head.bits)


def quantized_head_replacements(model: nn.Module, dtype: torch.dtype, mode: str = "int8") -> dict[str, nn.Module]:
    """{module name: replacement} for the output projection and, when tied to it, the input embedding, with
    `mode` "int8" or "int4" weights."""
    bits = VALUE_BITS.get(mode)
    if bits is None:
        raise ValueError(f"a quantized lm_head is 'int8' or 'int4', got {mode!r}")
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"lm_head={mode!r} needs a bias-free nn.Linear output projection, got {type(head).__name__}")
    names = {id(module): name for name, module in model.named_modules()}
    q, scales = quantize_blocks(head.weight, bits=bits)
    new_head = QuantizedHead(q, scales.to(dtype), head.in_features, head.out_features, bits)
    replacements: dict[str, nn.Module] = {names[id(head)]: new_head}
    if isinstance(embedding, nn.Embedding) and embedding.weight is head.weight:
        replacements[names[id(embedding)]] = QuantizedEmbedding(new_head)
    return replacements
