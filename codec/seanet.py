"""SEANet encoder and decoder (causal, ELU, residual blocks with identity skips), streaming-ready.

Activations are channels-last [B, T, C] throughout (see `conv.py`).

Layer indices match Kyutai's `model.{i}` numbering, ELUs included, so checkpoint keys load unchanged:
encoder = conv(k=7) then per ratio (reversed: 4,5,6,8) [residual blocks, ELU, conv(k=2r, stride r)],
then ELU + conv(k=last_kernel_size) to `dimension`; the decoder mirrors it with transposed convs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from .config import SeanetConfig
from .conv import Conv1dState, ConvTranspose1dState, StreamingConv1d, StreamingConvTranspose1d

LayerState = Union[Conv1dState, ConvTranspose1dState, "ResidualState", None]


@dataclass
class ResidualState:
    """States of the two convs of a residual block (the 1x1 conv is stateless)."""

    conv1: Conv1dState | None
    conv2: Conv1dState | None

    def reset(self, mask: Tensor) -> None:
        """Reset the slots where `mask` ([B] bool) is true."""
        for state in (self.conv1, self.conv2):
            if state is not None:
                state.reset(mask)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        return [t for state in (self.conv1, self.conv2) if state is not None for t in state.slot_tensors()]

    def prefix(self, rows: int) -> ResidualState:
        """A view of the first `rows` slots (shares memory)."""
        return ResidualState(*(None if state is None else state.prefix(rows) for state in (self.conv1, self.conv2)))


@dataclass
class SeanetState:
    """One entry per `model` layer (None for activations and stateless layers)."""

    layers: list[LayerState]

    def reset(self, mask: Tensor) -> None:
        """Reset the slots where `mask` ([B] bool) is true."""
        for state in self.layers:
            if state is not None:
                state.reset(mask)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        return [t for state in self.layers if state is not None for t in state.slot_tensors()]

    def prefix(self, rows: int) -> SeanetState:
        """A view of the first `rows` slots (shares memory)."""
        return SeanetState([None if state is None else state.prefix(rows) for state in self.layers])


class ResidualBlock(nn.Module):
    """x + conv_1x1(ELU(conv_k(ELU(x)))), hidden width dim // compress; keys `block.1`, `block.3`."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(alpha=1.0),
                StreamingConv1d(dim, hidden, kernel_size, dilation=dilation),
                nn.ELU(alpha=1.0),
                StreamingConv1d(hidden, dim, 1),
            ]
        )

    def init_state(self, batch_size: int, chunk: int, device=None, dtype=None) -> ResidualState:
        """Preallocate the convs' states for chunks of `chunk` steps."""
        conv1, conv2 = self.block[1], self.block[3]
        return ResidualState(
            conv1.init_state(batch_size, chunk, device, dtype), conv2.init_state(batch_size, chunk, device, dtype)
        )

    def forward(self, x: Tensor, state: ResidualState | None = None, ready: Tensor | None = None) -> Tensor:
        """x [B, T, C] -> [B, T, C] (channels-last); `ready` [B]: slots that advance (None = all)."""
        conv1, conv2 = (None, None) if state is None else (state.conv1, state.conv2)
        hidden = self.block[1](x, conv1, activate=True, ready=ready)  # [B, T, C // compress]
        hidden = self.block[3](F.elu_(hidden), conv2, ready=ready)
        return hidden.add_(x)


def _residual_stack(config: SeanetConfig, dim: int) -> list[nn.Module]:
    return [
        ResidualBlock(dim, config.residual_kernel_size, config.dilation_base**j, config.compress)
        for j in range(config.n_residual_layers)
    ]


class _SeanetBase(nn.Module):
    """Shared streaming plumbing: runs `model` layers in order, each with its own state."""

    model: nn.ModuleList

    def _chunks(self, input_chunk: int) -> list[int]:
        """Input length seen by every layer when the network receives `input_chunk` samples/steps."""
        chunks, length = [], input_chunk
        for layer in self.model:
            chunks.append(length)
            if isinstance(layer, StreamingConv1d):
                length //= layer.stride
            elif isinstance(layer, StreamingConvTranspose1d):
                length *= layer.stride
        return chunks

    def init_state(self, batch_size: int, input_chunk: int, device=None, dtype=None) -> SeanetState:
        """Preallocate every layer's state for inputs of `input_chunk` samples (encoder) or steps (decoder)."""
        states: list[LayerState] = []
        for layer, chunk in zip(self.model, self._chunks(input_chunk)):
            if isinstance(layer, (StreamingConv1d, ResidualBlock)):
                states.append(layer.init_state(batch_size, chunk, device, dtype))
            elif isinstance(layer, StreamingConvTranspose1d):
                states.append(layer.init_state(batch_size, device, dtype))
            else:
                states.append(None)
        return SeanetState(states)

    def forward(self, x: Tensor, state: SeanetState | None = None, ready: Tensor | None = None) -> Tensor:
        """Run all layers; without a state a fresh one is built (offline = streaming from scratch).

        `ready` [B] bool: only those slots advance their state (None = all)."""
        if state is None:
            state = self.init_state(x.shape[0], x.shape[-1], x.device, x.dtype)
        activate = False  # an ELU is fused into the next conv's input staging
        for layer, layer_state in zip(self.model, state.layers):
            if isinstance(layer, nn.ELU):
                activate = True
            elif isinstance(layer, ResidualBlock):
                x = layer(x, layer_state, ready)
            else:
                x = layer(x, layer_state, activate=activate, ready=ready)
                activate = False
        return x


class SeanetEncoder(_SeanetBase):
    """Audio as [B, T, 1] -> latent [B, T / hop_length, dimension] (channels-last)."""

    def __init__(self, config: SeanetConfig) -> None:
        super().__init__()
        mult = 1
        layers: list[nn.Module] = [StreamingConv1d(config.channels, config.n_filters, config.kernel_size)]
        for ratio in reversed(config.ratios):
            width = mult * config.n_filters
            layers += _residual_stack(config, width)
            layers += [nn.ELU(alpha=1.0), StreamingConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            mult *= 2
        layers += [nn.ELU(alpha=1.0), StreamingConv1d(mult * config.n_filters, config.dimension, config.last_kernel_size)]
        self.model = nn.ModuleList(layers)


class SeanetDecoder(_SeanetBase):
    """Latent [B, S, dimension] -> audio [B, S * hop_length, 1] (channels-last)."""

    def __init__(self, config: SeanetConfig) -> None:
        super().__init__()
        mult = 2 ** len(config.ratios)
        layers: list[nn.Module] = [StreamingConv1d(config.dimension, mult * config.n_filters, config.kernel_size)]
        for ratio in config.ratios:
            width = mult * config.n_filters
            layers += [nn.ELU(alpha=1.0), StreamingConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio)]
            layers += _residual_stack(config, width // 2)
            mult //= 2
        layers += [nn.ELU(alpha=1.0), StreamingConv1d(config.n_filters, config.channels, config.last_kernel_size)]
        self.model = nn.ModuleList(layers)
