"""Causal 1-D convolutions on channels-last activations [B, T, C], with explicit preallocated streaming state.

`StreamingConv1d` keeps the last `kernel_eff - stride` input steps of each batch slot; `StreamingConvTranspose1d`
keeps the overlapping tail of its output (without bias) and adds it to the next chunk. Called without a state,
each builds a fresh one sized for the input, so offline processing is streaming with a fresh state.
With a `ready` mask [B] (bool), only the ready slots advance: the others keep every state tensor as it was.

Both compute with one matrix product: the conv gathers its input windows (im2col, a strided view of the
channels-last buffer) and the transposed conv overlap-adds `kernel / stride` shifted blocks. Weights keep
Kyutai's shapes and key paths (`<layer>.conv.conv.weight` [C_out, C_in, K], `<layer>.convtr.convtr.weight`
[C_in, C_out / groups, K]); `pack_()` re-lays their memory so that the matrix view needs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Stride-1 convs over at least this many steps and channels use shifted products instead of im2col.
SHIFTED_MIN_STEPS = 128
SHIFTED_MIN_CHANNELS = 16


@dataclass
class Conv1dState:
    """Streaming state of one causal conv: input history in front of room for one chunk."""

    buffer: Tensor  # [B, history + chunk, C_in]
    history: int  # kernel_eff - stride steps carried over between chunks
    first: Tensor | None  # [B] bool, per-slot "no input seen yet" (replicate padding only)

    def reset(self, mask: Tensor) -> None:
        """Forget the history of the slots where `mask` ([B] bool) is true."""
        self.buffer[:, : self.history].masked_fill_(mask[:, None, None], 0.0)
        if self.first is not None:
            self.first.logical_or_(mask)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        return [self.buffer] if self.first is None else [self.buffer, self.first]

    def prefix(self, rows: int) -> Conv1dState:
        """A view of the first `rows` slots (shares memory)."""
        return Conv1dState(self.buffer[:rows], self.history, None if self.first is None else self.first[:rows])


@dataclass
class ConvTranspose1dState:
    """Streaming state of one causal transposed conv: the pending overlap of its output."""

    partial: Tensor  # [B, kernel - stride, C_out], bias not included

    def reset(self, mask: Tensor) -> None:
        """Drop the pending overlap of the slots where `mask` ([B] bool) is true."""
        self.partial.masked_fill_(mask[:, None, None], 0.0)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        return [self.partial]

    def prefix(self, rows: int) -> ConvTranspose1dState:
        """A view of the first `rows` slots (shares memory)."""
        return ConvTranspose1dState(self.partial[:rows])


def keep_where(ready: Tensor | None, new: Tensor, old: Tensor) -> None:
    """old <- new in the rows (dim 0) where `ready` [B] is true; all rows when `ready` is None.

    `new` must not partially overlap `old` in memory."""
    if ready is None:
        old.copy_(new)
    else:
        torch.where(ready.view(-1, *([1] * (old.dim() - 1))), new, old, out=old)


def elu_into(x: Tensor, out: Tensor) -> Tensor:
    """out = ELU(x) (alpha 1) as max(x, exp(min(x, 0)) - 1): exp is several times cheaper than expm1 on CPU,
    and the absolute difference to torch's ELU stays below 1e-7. `out` may be a strided view (a buffer slice)."""
    torch.clamp(x, max=0.0, out=out)
    out.exp_().sub_(1.0)
    return torch.maximum(out, x, out=out)


class _NormConv1d(nn.Module):
    """Kyutai's `NormConv1d` with norm "none": only holds the convolution (for the `.conv.conv` key path)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv


class _NormConvTranspose1d(nn.Module):
    """Kyutai's `NormConvTranspose1d` with norm "none" (for the `.convtr.convtr` key path)."""

    def __init__(self, convtr: nn.ConvTranspose1d) -> None:
        super().__init__()
        self.convtr = convtr


def _relayout_(module: nn.Module, name: str, order: tuple[int, ...]) -> None:
    """Keep parameter `name`'s shape but store it contiguously in the dimension `order` given."""
    weight = getattr(module, name)
    if weight.permute(*order).is_contiguous() or weight.is_meta:
        return
    inverse = [order.index(axis) for axis in range(len(order))]
    packed = weight.detach().permute(*order).contiguous().permute(*inverse)
    setattr(module, name, nn.Parameter(packed, requires_grad=weight.requires_grad))


class StreamingConv1d(nn.Module):
    """Causal Conv1d: all padding on the left, `kernel_eff - stride` steps of history between chunks.

    Inputs [B, T, C_in] must be a multiple of the stride long; the output is [B, T / stride, C_out].
    `pad_mode` "constant" pads the very start with zeros, "replicate" with the first input step.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.conv = _NormConv1d(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad_mode = pad_mode
        self.history = (kernel_size - 1) * dilation + 1 - stride
        if self.history < 0:
            raise ValueError(f"stride {stride} larger than the effective kernel {(kernel_size - 1) * dilation + 1}")
        self.pack_()  # loaders replace the weight, then pack again (see loading.finish_model)

    def pack_(self) -> None:
        """Store the weight as [K, C_in, C_out] in memory (shape unchanged) for copy-free matrix products."""
        _relayout_(self.conv.conv, "weight", (2, 1, 0))

    def _matrix(self) -> Tensor:
        """The weight as a [K * C_in, C_out] matrix (a view once packed)."""
        return self.conv.conv.weight.permute(2, 1, 0).reshape(-1, self.out_channels)

    def init_state(self, batch_size: int, chunk: int, device=None, dtype=None) -> Conv1dState | None:
        """Preallocate the state for chunks of `chunk` input steps (None when no history is needed)."""
        if self.history == 0:
            return None
        weight = self.conv.conv.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        buffer = torch.zeros(batch_size, self.history + chunk, self.in_channels, device=device, dtype=dtype)
        first = torch.ones(batch_size, dtype=torch.bool, device=device) if self.pad_mode == "replicate" else None
        return Conv1dState(buffer=buffer, history=self.history, first=first)

    def _convolve(self, padded: Tensor) -> Tensor:
        """Valid convolution of padded [B, L, C_in] -> [B, (L - kernel_eff) / stride + 1, C_out]."""
        steps = (padded.shape[1] - self.history - self.stride) // self.stride + 1
        if self._shifted_ok(steps):
            return self._convolve_shifted(padded, steps)
        batch, length, channels = padded.shape
        if self.kernel_size == 1:
            columns = padded[:, :: self.stride] if self.stride > 1 else padded
        else:
            # im2col: window t covers steps t*S, t*S + d, ..., a strided view of the (contiguous) buffer.
            padded = padded.contiguous()
            columns = padded.as_strided(
                (batch, steps, self.kernel_size, channels),
                (length * channels, self.stride * channels, self.dilation * channels, 1),
            )  # [B, T_out, K, C_in]
        columns = columns.reshape(batch * steps, -1)  # [B * T_out, K * C_in]
        bias = self.conv.conv.bias
        if bias is None:
            out = torch.mm(columns, self._matrix())
        else:
            out = torch.addmm(bias, columns, self._matrix())
        return out.view(batch, steps, self.out_channels)

    def _shifted_ok(self, steps: int) -> bool:
        """Long outputs are cheaper as a few shifted products than through an im2col copy."""
        blocks_fit = self.stride == 1 or (self.dilation == 1 and self.kernel_size % self.stride == 0)
        return (
            blocks_fit
            and self.kernel_size > 1
            and steps >= SHIFTED_MIN_STEPS
            and self.stride * self.in_channels >= SHIFTED_MIN_CHANNELS
        )

    def _convolve_shifted(self, padded: Tensor, steps: int) -> Tensor:
        """Conv as accumulated products of shifted views, no im2col copy: [B, L, C_in] -> [B, T_out, C_out].

        The input is cut into blocks of `stride` steps ([B, L / S, S * C_in], a view); output t then sums
        block (t + j * shift) times weight slice j, with `kernel / stride` slices (K taps when S = 1).
        """
        batch, length, channels = padded.shape
        stride = self.stride
        blocks = padded.reshape(batch, length // stride, stride * channels)  # [B, L / S, S * C_in]
        taps = self.conv.conv.weight.permute(2, 1, 0).reshape(-1, stride * channels, self.out_channels)
        shift = self.dilation if stride == 1 else 1
        bias = self.conv.conv.bias
        out = None
        for index in range(taps.shape[0]):
            shifted = blocks[:, index * shift : index * shift + steps]  # [B, T_out, S * C_in], a view
            weight = taps[index].expand(batch, -1, -1)  # [B, S * C_in, C_out], no copy
            if out is not None:
                out.baddbmm_(shifted, weight)
            elif bias is not None:
                out = torch.baddbmm(bias.expand(batch, steps, self.out_channels), shifted, weight)
            else:
                out = torch.bmm(shifted, weight)
        return out

    def forward(
        self, x: Tensor, state: Conv1dState | None = None, activate: bool = False, ready: Tensor | None = None
    ) -> Tensor:
        """x [B, T, C_in] (T a multiple of the stride) -> [B, T / stride, C_out]; `activate`: ELU(x) first.

        `ready` [B] bool: only those slots advance their state (None = all)."""
        length = x.shape[1]
        if length % self.stride:
            raise ValueError(f"conv input length {length} is not a multiple of its stride {self.stride}")
        if self.history == 0:
            return self._convolve(F.elu(x) if activate else x)
        if state is None:
            state = self.init_state(x.shape[0], length, x.device, x.dtype)
        history, buffer = self.history, state.buffer  # buffer [B, history + chunk, C_in]
        if state.first is not None:
            self._replicate_first(x[:, :1], state, activate, ready)
        if buffer.shape[1] != history + length:
            return self._forward_other_length(F.elu(x) if activate else x, state, ready)
        if ready is None and activate:
            elu_into(x, buffer[:, history:])  # ELU written straight into the buffer
        elif activate:
            keep_where(ready, elu_into(x, torch.empty_like(x)), buffer[:, history:])
        else:
            keep_where(ready, x, buffer[:, history:])
        y = self._convolve(buffer)
        tail = buffer[:, length:]
        keep_where(ready, tail.clone() if length < history else tail, buffer[:, :history])
        return y

    def _replicate_first(self, first_step: Tensor, state: Conv1dState, activate: bool, ready: Tensor | None) -> None:
        """Replicate padding: a slot's first chunk sees its first step repeated as history."""
        assert state.first is not None
        first_step = F.elu(first_step) if activate else first_step  # [B, 1, C_in]
        first = state.first if ready is None else state.first & ready  # [B]
        history = state.buffer[:, : self.history]
        history.copy_(torch.where(first[:, None, None], first_step, history))
        if ready is None:
            state.first.zero_()
        else:
            state.first.logical_and_(~ready)

    def _forward_other_length(self, x: Tensor, state: Conv1dState, ready: Tensor | None) -> Tensor:
        """Chunks of another length than preallocated: concatenate (allocates; not the hot path)."""
        history = self.history
        full = torch.cat([state.buffer[:, :history], x], dim=1)  # [B, history + T, C_in]
        keep_where(ready, full[:, full.shape[1] - history :], state.buffer[:, :history])
        return self._convolve(full)


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d (kernel a multiple of the stride): [B, T, C_in] -> [B, T * stride, C_out].

    Keeps the `kernel - stride` overlap for the next chunk; `groups` is 1 or C_in (depthwise, C_out = C_in).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        if kernel_size % stride:
            raise ValueError(f"transposed conv kernel {kernel_size} must be a multiple of its stride {stride}")
        if groups not in (1, in_channels) or (groups > 1 and out_channels != in_channels):
            raise ValueError("transposed conv groups must be 1 or depthwise (groups = in = out channels)")
        convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.convtr = _NormConvTranspose1d(convtr)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.blocks = kernel_size // stride  # output blocks of `stride` steps produced per input step
        self.pack_()

    def pack_(self) -> None:
        """Store the weight as [C_in, K, C_out] (or [K, C] when depthwise) in memory, shape unchanged."""
        _relayout_(self.convtr.convtr, "weight", (2, 1, 0) if self.groups > 1 else (0, 2, 1))

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvTranspose1dState:
        """Preallocate the pending-overlap buffer (zeros)."""
        weight = self.convtr.convtr.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        overlap = self.kernel_size - self.stride
        return ConvTranspose1dState(torch.zeros(batch_size, overlap, self.out_channels, device=device, dtype=dtype))

    def _contributions(self, x: Tensor) -> Tensor:
        """x [B, T, C_in] -> every input step's output [B, T, K, C_out] (before overlap-add)."""
        batch, steps, _ = x.shape
        weight = self.convtr.convtr.weight
        if self.groups > 1:  # depthwise: weight [C, 1, K]
            return x[:, :, None, :] * weight[:, 0, :].t()  # [B, T, K, C]
        matrix = weight.permute(0, 2, 1).reshape(self.in_channels, -1)  # [C_in, K * C_out]
        return torch.mm(x.reshape(batch * steps, -1), matrix).view(batch, steps, self.kernel_size, -1)

    def forward(
        self, x: Tensor, state: ConvTranspose1dState | None = None, activate: bool = False, ready: Tensor | None = None
    ) -> Tensor:
        """x [B, T, C_in] -> [B, T * stride, C_out]; `activate`: ELU(x) first; `ready` as for the conv."""
        if activate:
            x = F.elu(x)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        batch, steps, _ = x.shape
        stride, blocks = self.stride, self.blocks
        parts = self._contributions(x).view(batch, steps, blocks, stride, self.out_channels)
        # Block j of the output sums parts[:, j - p, p] over p; the last (blocks - 1) blocks are pending.
        total = x.new_empty(batch, steps + blocks - 1, stride, self.out_channels)
        total[:, :steps].copy_(parts[:, :, 0])
        total[:, steps:].zero_()
        for shift in range(1, blocks):
            total[:, shift : shift + steps].add_(parts[:, :, shift])
        total = total.view(batch, -1, self.out_channels)  # [B, (T + blocks - 1) * S, C_out]
        emitted = steps * stride
        overlap = state.partial.shape[1]
        total[:, :overlap].add_(state.partial)
        keep_where(ready, total[:, emitted:], state.partial)
        out = total[:, :emitted]
        bias = self.convtr.convtr.bias
        return out.add_(bias) if bias is not None else out
