"""Weight-only int8 / int4 linear layers that stand in for ``nn.Linear`` (activations stay floating).

- ``Int8Linear``: symmetric per output channel, ``W ≈ q · scale`` with q int8 [N, K] in [-127, 127]
  and scale [N] = absmax_row(W) / 127 (the scheme of Kyutai's ``*-pytorch-q8`` files, whose
  ``_scb`` is absmax_row(W), i.e. 127 · scale).
- ``Int4Linear``: asymmetric per group of ``group_size`` input columns, ``W ≈ (q - 8) · scale + zero``
  with q in 0..15, one (scale, zero) pair per group and output row (PyTorch's tinygemm layout
  ``scales_and_zeros`` [K / group, N, 2]).

Both call PyTorch's maintained kernels (chosen by measurement, see the README "Quantization"):
``aten._weight_int8pack_mm`` (CPU) and ``aten._weight_int4pack_mm_for_cpu`` /
``aten._weight_int4pack_mm`` (CUDA). Where a kernel does not exist (int8 on CUDA) the layer
dequantizes into the activation dtype and multiplies (``F.linear``), one layer at a time.

The kernels compute in the dtype of the layer's scales (``compute_dtype``); inputs of another
dtype are cast to it and the output cast back, so a float32 model can run its quantized layers
in bfloat16, where the CPU kernels are fast.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP_SIZE = 32  # measured (README "Quantization"): least error, same speed as 64 / 128
INT4_GROUP_SIZES = (32, 64, 128, 256)
# torch 2.13's CPU _weight_int8pack_mm on bfloat16 crashes or returns garbage when in_features is not a
# multiple of 8 (measured for K = 1..7, 9, 12, 20, 100, 132, ...; float32 / float16 were fine): such
# layers dequantize instead, whatever their dtype.
INT8_KERNEL_K_MULTIPLE = 8


class QuantizeError(ValueError):
    """A bad quantization request or a malformed quantized checkpoint."""


def check_mode(quantize: str | None) -> str | None:
    """The quantization mode, or a QuantizeError naming the allowed values."""
    if quantize is None or quantize in QUANTIZE_MODES:
        return quantize
    raise QuantizeError(f"unknown quantize value {quantize!r}: choose int8, int4 or none")


# ----------------------------------------------------------------- quantizers
CHUNK_ELEMENTS = 2**24  # rows are quantized in chunks of this many weights: bounded float32 temporaries


def _row_chunks(rows: int, cols: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [N, K] float -> (q int8 [N, K], scale float32 [N])."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for part in _row_chunks(rows, cols):
        w = weight[part].to(torch.float32, copy=True)  # [n, K], a copy: changed in place below
        absmax = w.abs().amax(dim=1)  # [n]
        scale[part] = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q[part] = torch.round(w.div_(scale[part, None])).clamp_(-127, 127)
    return q, scale


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the int4 kernels take this shape (otherwise the layer falls back to int8)."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: weight [N, K] -> (q int32 0..15 [N, K], scales_and_zeros f32 [K/g, N, 2]).

    Dequantized: (q - 8) · scale + zero, with zero = min + 8 · scale (the tinygemm convention).
    """
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty(cols // group_size, rows, 2, dtype=torch.float32, device=weight.device)
    for part in _row_chunks(rows, cols):
        groups = weight[part].to(torch.float32, copy=True).reshape(-1, cols // group_size, group_size)  # [n, G, g]
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # [n, G]
        scale = ((high - low) / 15.0).clamp_(min=1e-8)
        q[part] = torch.round(groups.sub_(low[..., None]).div_(scale[..., None])).clamp_(0, 15).reshape(-1, cols)
        scales_and_zeros[:, part] = torch.stack([scale, low + 8.0 * scale], dim=2).transpose(0, 1)  # [G, n, 2]
    return q, scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of quantize_int4 (reference, for tests): -> float32 [N, K]."""
    rows, cols = q.shape
    scale = scales_and_zeros[..., 0].T.float()[..., None]  # [N, G, 1]
    zero = scales_and_zeros[..., 1].T.float()[..., None]
    groups = q.reshape(rows, cols // group_size, group_size).float()
    return ((groups - 8.0) * scale + zero).reshape(rows, cols)


def _inner_k_tiles(in_features: int) -> int:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise QuantizeError(f"int4 needs in_features divisible by 32, got {in_features}")


def pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device's int4 kernel layout of q int32 0..15 [N, K] (done once, on ``device``)."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _inner_k_tiles(q.shape[1]))
    if device.type == "cuda":
        q = q.to(device)
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], even column high
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), _inner_k_tiles(q.shape[1]))
    raise QuantizeError(f"int4 weights need a CPU or CUDA device, not {device}")


# ----------------------------------------------------------------- modules
def _flatten(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] -> contiguous [M, K] in ``dtype``."""
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ with q int8 [N, K] and scale [N] (buffers; no float weight is kept)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise QuantizeError(f"int8 weights must be int8 [out, in], got {qweight.dtype} {tuple(qweight.shape)}")
        if tuple(scale.shape) != (qweight.shape[0],):
            raise QuantizeError(f"int8 scale must be [{qweight.shape[0]}], got {tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(device=qweight.device, dtype=compute_dtype).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, compute_dtype: torch.dtype) -> "Int8Linear":
        q, scale = quantize_int8(weight)
        return cls(q, scale, compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def dequantized(self) -> torch.Tensor:
        """The weight the layer applies, float32 [N, K]."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten(x, self.compute_dtype)  # [M, K]
        if flat.device.type == "cpu" and self.in_features % INT8_KERNEL_K_MULTIPLE == 0:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)  # [M, N]
        else:  # no int8 weight-only kernel (CUDA) or a shape it mishandles: dequantize this layer only
            out = F.linear(flat, self.qweight.to(self.compute_dtype)) * self.scale
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {self.compute_dtype}"


class Int4Linear(nn.Module):
    """y = x · Wᵀ with W group-wise int4 in the device's kernel layout (built on that device)."""

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 compute_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not int4_supported(self.out_features, self.in_features, group_size):
            raise QuantizeError(f"int4 with group size {group_size} does not fit a [{self.out_features}, "
                                f"{self.in_features}] weight")
        device = torch.device(device)
        if device.type == "cuda":
            compute_dtype = torch.bfloat16  # the CUDA int4 kernel takes bfloat16 only
        self.group_size = group_size
        self.register_buffer("packed", pack_int4(q, device))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device=device, dtype=compute_dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, compute_dtype: torch.dtype,
                   device: torch.device) -> "Int4Linear":
        q, scales_and_zeros = quantize_int4(weight, group_size)
        return cls(q, scales_and_zeros, group_size, compute_dtype, device)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten(x, self.compute_dtype)  # [M, K]
        if flat.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                             self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group "
                f"{self.group_size}, {self.compute_dtype}")


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantize_weight(weight: torch.Tensor, mode: str, compute_dtype: torch.dtype, device: torch.device,
                    group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """A quantized layer for a float weight [N, K]; int4 falls back to int8 for shapes it cannot take."""
    weight = weight.to(device)
    if mode == "int4" and int4_supported(weight.shape[0], weight.shape[1], group_size):
        return Int4Linear.from_float(weight, group_size, compute_dtype, device)
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"unknown quantize value {mode!r}: choose int8, int4 or none")
    return Int8Linear.from_float(weight, compute_dtype)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(module, QUANTIZED_LINEARS) for module in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what its weights take in memory)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype | None = None,
                   group_size: int = INT4_GROUP_SIZE, keep_float=lambda name: False) -> nn.Module:
    """Replace every nn.Linear of an in-memory model by its quantized layer, one layer at a time.

    ``keep_float(name)``: module names to leave floating. Returns ``model`` (changed in place).
    """
    check_mode(mode)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        if keep_float(name):
            continue
        linear = model.get_submodule(name)
        if linear.bias is not None:
            raise QuantizeError(f"{name} has a bias: only bias-free linear layers are quantized")
        weight = linear.weight.detach()
        layer = quantize_weight(weight, mode, compute_dtype or weight.dtype, weight.device, group_size)
        model.set_submodule(name, layer)
        del linear, weight
    return model
