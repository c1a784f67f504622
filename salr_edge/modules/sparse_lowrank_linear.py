"""`SparseLowRankLinear`: a frozen, exactly sparse base weight plus fused low-rank adapters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bitmap import BitmapTensor, bitmap_decode, bitmap_encode, bitmap_mask, mask_row_offsets, pack_mask
from ..formats.quantize import dequantize_values, quantize_values


class SparseLowRankLinear(nn.Module):
    """Wraps an `nn.Linear`: y = x·(W⊙M)ᵀ + Σ_a s_a·(x·A_aᵀ)·B_aᵀ + bias.

    The base weight is frozen and exactly sparse (its pruned entries are zero and stay zero). Every
    adapter a (the SVD residual, LoRA, ...) is a pair A_a [r_a, K], B_a [N, r_a] with a scaling s_a.
    The forward concatenates all adapters into one A_cat [R, K] / B_cat [N, R] pair, so the adapter
    path is two GEMMs whatever the number of adapters: the contract of the ONNX `SALRLinear` op.

    The base may be quantized (`quantize_base_`, or `from_bitmap` of a version-2 tensor): the module then
    keeps the stored integers (`salr_qvalues`: int8 or packed int4) and float16 group scales
    (`salr_qscales`) as buffers, and its base weight is exactly their dequantization, so the PyTorch
    forward computes what the `SALRLinearQ` kernel computes (up to the rounding of activations).

    Args:
        base_layer: the layer to wrap; its weight is masked in place and frozen.
        mask: bool [N, K] of kept entries; default: the weight's non-zeros.
    """

    def __init__(self, base_layer: nn.Linear, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SparseLowRankLinear wraps nn.Linear, got {type(base_layer).__name__}")
        weight = base_layer.weight
        if mask is None:
            mask = weight.detach() != 0
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        self.base_layer = base_layer
        self.register_buffer("salr_mask", mask.to(device=weight.device, dtype=torch.bool), persistent=False)
        with torch.no_grad():
            weight.mul_(self.salr_mask)
        base_layer.requires_grad_(False)  # the whole base (weight and bias) is frozen
        self.salr_A = nn.ParameterDict()
        self.salr_B = nn.ParameterDict()
        self.salr_scaling: dict[str, float] = {}
        self.merged = False
        # quantized base (format version 2); None while the base holds float values
        self.register_buffer("salr_qvalues", None)  # (nnz,) int8 | (ceil(nnz/2),) uint8
        self.register_buffer("salr_qscales", None)  # (ceil(nnz/group_size),) float16
        self.salr_bits: int | None = None
        self.salr_group_size: int | None = None

    # ---- shape -----------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The (sparse) base weight; transformers code sometimes reads `.weight.dtype/device`."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_quantized(self) -> bool:
        return self.salr_bits is not None

    @property
    def bits(self) -> int | None:
        """Bits of the stored base values (4 or 8), None for float values."""
        return self.salr_bits

    @property
    def group_size(self) -> int | None:
        """Values per float16 scale of a quantized base, None for float values."""
        return self.salr_group_size

    @property
    def adapter_names(self) -> list[str]:
        return list(self.salr_A.keys())

    @property
    def total_rank(self) -> int:
        return sum(a.shape[0] for a in self.salr_A.values())

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0,
                    trainable: bool = True) -> None:
        """Add adapter `name` with A [r, K], B [N, r]; its contribution is scaling·B·A."""
        if name in self.salr_A:
            raise ValueError(f"adapter {name!r} already exists")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapter {name!r}: expected A [r, {self.in_features}] and B [{self.out_features}, r], "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
        ref = self.base_layer.weight
        self.salr_A[name] = nn.Parameter(A.detach().to(ref.device, ref.dtype).clone(), requires_grad=trainable)
        self.salr_B[name] = nn.Parameter(B.detach().to(ref.device, ref.dtype).clone(), requires_grad=trainable)
        self.salr_scaling[name] = float(scaling)

    def add_lora(self, name: str, rank: int, alpha: float, trainable: bool = True) -> None:
        """Add a LoRA adapter with PEFT's init: A Kaiming-uniform, B zero, so the output is unchanged."""
        A = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.add_adapter(name, A, torch.zeros(self.out_features, rank), scaling=alpha / rank, trainable=trainable)

    def set_adapter_trainable(self, name: str, trainable: bool) -> None:
        self.salr_A[name].requires_grad_(trainable)
        self.salr_B[name].requires_grad_(trainable)

    def fused_adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat [R, K] and B_cat [N, R] with every adapter's scaling folded into B_cat (R may be 0)."""
        ref = self.base_layer.weight
        if not self.salr_A:
            return ref.new_zeros(0, self.in_features), ref.new_zeros(self.out_features, 0)
        a_cat = torch.cat([self.salr_A[n] for n in self.salr_A], dim=0)  # (R, K)
        b_cat = torch.cat([self.salr_B[n] * self.salr_scaling[n] for n in self.salr_A], dim=1)  # (N, R)
        return a_cat, b_cat

    def get_delta_weight(self) -> torch.Tensor:
        """The dense [N, K] weight the adapters add: B_cat·A_cat."""
        a_cat, b_cat = self.fused_adapters()
        return b_cat @ a_cat

    # ---- forward / merge -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # Triton SALRLinear kernel where it applies (salr_edge.kernels decides; None: torch path)
            from ..kernels import sparse_lowrank_forward

            y = sparse_lowrank_forward(self, x)
            if y is not None:
                return y
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)  # (..., N)
        if self.merged or not self.salr_A:
            return y
        a_cat, b_cat = self.fused_adapters()
        return y + F.linear(F.linear(x.to(a_cat.dtype), a_cat), b_cat).to(y.dtype)  # (..., R) -> (..., N)

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapters into the base weight (which then stops being sparse) for plain inference.

        Args:
            safe_merge: check the merged weight for NaN/Inf before writing it.
        """
        if self.merged:
            return
        with torch.no_grad():
            merged = self.base_layer.weight + self.get_delta_weight()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError("merging the adapters produces NaN/Inf weights; the adapters are broken")
            self.base_layer.weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge`: the base weight is exactly sparse again (and exactly the dequantized one, if quantized)."""
        if not self.merged:
            return
        with torch.no_grad():
            if self.is_quantized:
                self.base_layer.weight.copy_(self.dequantized_weight())
            else:
                self.base_layer.weight.sub_(self.get_delta_weight()).mul_(self.salr_mask)
        self.merged = False

    # ---- sparse base -----------------------------------------------------------------------------
    def _check_unmerged(self) -> None:
        if self.merged:
            raise RuntimeError("the adapters are merged into the base; call unmerge() first")

    def sparse_weight(self) -> torch.Tensor:
        """The exactly sparse base weight [N, K] (without the adapters)."""
        self._check_unmerged()
        return self.base_layer.weight.detach()

    def to_bitmap(self, values_dtype: torch.dtype | None = None) -> BitmapTensor:
        """The base in the bitmap format (kept entries that happen to be 0 are stored explicitly).

        A quantized base gives its version-2 tensor: the stored integers and scales as they are (never
        quantized again), and `values_dtype`, which applies to float values only, is not used.
        """
        if not self.is_quantized:
            return bitmap_encode(self.sparse_weight(), self.salr_mask, values_dtype)
        self._check_unmerged()
        mask = self.salr_mask.cpu()
        return BitmapTensor(pack_mask(mask), self.salr_qvalues.cpu(), mask_row_offsets(mask),
                            (self.out_features, self.in_features), self.salr_qscales.cpu(), self.salr_bits,
                            self.salr_group_size)

    # ---- quantized base --------------------------------------------------------------------------
    def quantize_base_(self, bits: int, group_size: int) -> "SparseLowRankLinear":
        """Modifies the module in place: quantize the kept base values (`quantize_values`), base weight := Q⁻¹(Q(W)).

        Args:
            bits: 4 or 8.
            group_size: kept values per float16 scale, in storage order (row by row).

        Returns:
            The module.

        Raises:
            RuntimeError: the adapters are merged.
            ValueError: the base is already quantized (a second rounding would compound the error), or
                bad `bits`/`group_size`.
        """
        if self.is_quantized:
            raise ValueError(f"the base is already quantized (int{self.salr_bits}, group_size {self.salr_group_size})")
        kept = self.sparse_weight()[self.salr_mask]  # (nnz,) row by row, columns ascending
        stored, scales = quantize_values(kept.float(), bits, group_size)
        self._store_quantized(stored, scales, bits, group_size)
        with torch.no_grad():
            self.base_layer.weight.copy_(self.dequantized_weight())
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The dense [N, K] base rebuilt from the stored integers and scales, in the weight's dtype."""
        if not self.is_quantized:
            raise RuntimeError("the base holds float values; quantize_base_() first")
        weight = self.base_layer.weight
        nnz = int(self.salr_mask.sum())
        values = dequantize_values(self.salr_qvalues, self.salr_qscales, self.salr_bits, self.salr_group_size,
                                   nnz)  # (nnz,) float32, exact
        dense = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dense[self.salr_mask] = values.to(weight.device)
        return dense.to(weight.dtype)

    def _store_quantized(self, values: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> None:
        device = self.base_layer.weight.device
        self.salr_qvalues = values.detach().to(device).clone()
        self.salr_qscales = scales.detach().to(device, torch.float16).clone()
        self.salr_bits, self.salr_group_size = int(bits), int(group_size)

    def _apply(self, fn, recurse: bool = True):
        # Float casts of the model (.half(), .to(torch.bfloat16)) move the scales but must not round them:
        # they are stored format data, and the base weight is defined by their float16 values.
        scales = self.salr_qscales
        super()._apply(fn, recurse)
        if scales is not None and self.salr_qscales.dtype != torch.float16:
            self.salr_qscales = scales.to(self.salr_qscales.device)
        return self

    def extra_repr(self) -> str:
        density = float(self.salr_mask.float().mean()) if self.salr_mask.numel() else 0.0
        ranks = {n: a.shape[0] for n, a in self.salr_A.items()}
        values = f"int{self.salr_bits}/g{self.salr_group_size}" if self.is_quantized else "float"
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, "
                f"values={values}, adapters={ranks}")

    @classmethod
    def from_bitmap(cls, bitmap: BitmapTensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> "SparseLowRankLinear":
        """Rebuild a module (no adapters yet) from a bitmap base (version 1 or 2) and an optional bias.

        A version-2 base keeps its stored integers and scales; the weight is their dequantization.
        """
        n, k = bitmap.shape
        linear = nn.Linear(k, n, bias=bias is not None, dtype=dtype, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            linear.weight.copy_(bitmap_decode(bitmap, dtype))
            if bias is not None:
                linear.bias.copy_(bias)
        module = cls(linear, bitmap_mask(bitmap))
        if bitmap.is_quantized:
            module._store_quantized(bitmap.values, bitmap.scales, bitmap.bits, bitmap.group_size)
        return module


def iter_sparse_lowrank(model: nn.Module):
    """Yield (name, module) for every `SparseLowRankLinear` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLowRankLinear):
            yield name, module
