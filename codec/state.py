"""MimiState: every streaming buffer of the codec for a batch of independent slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from duplex.model.transformer import TransformerState
from torch import Tensor

from .conv import Conv1dState, ConvTranspose1dState
from .seanet import SeanetState


@dataclass
class EncoderState:
    """Audio -> latent side: SEANet encoder, encoder transformer, downsampling conv."""

    seanet: SeanetState
    transformer: TransformerState
    downsample: Conv1dState | None

    def reset(self, mask: Tensor) -> None:
        """Restart the slots where `mask` ([B] bool) is true."""
        self.seanet.reset(mask)
        self.transformer.reset(mask)
        if self.downsample is not None:
            self.downsample.reset(mask)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        downsample = [] if self.downsample is None else self.downsample.slot_tensors()
        return [*self.seanet.slot_tensors(), *self.transformer.slot_tensors(), *downsample]

    def prefix(self, rows: int) -> EncoderState:
        """A view of the first `rows` slots (shares memory)."""
        downsample = None if self.downsample is None else self.downsample.prefix(rows)
        return EncoderState(self.seanet.prefix(rows), self.transformer.prefix(rows), downsample)


@dataclass
class DecoderState:
    """Latent -> audio side: upsampling conv, decoder transformer, SEANet decoder."""

    upsample: ConvTranspose1dState
    transformer: TransformerState
    seanet: SeanetState

    def reset(self, mask: Tensor) -> None:
        """Restart the slots where `mask` ([B] bool) is true."""
        self.upsample.reset(mask)
        self.transformer.reset(mask)
        self.seanet.reset(mask)

    def slot_tensors(self) -> list[Tensor]:
        """The per-slot tensors (batch first)."""
        return [*self.upsample.slot_tensors(), *self.transformer.slot_tensors(), *self.seanet.slot_tensors()]

    def prefix(self, rows: int) -> DecoderState:
        """A view of the first `rows` slots (shares memory)."""
        return DecoderState(self.upsample.prefix(rows), self.transformer.prefix(rows), self.seanet.prefix(rows))


@dataclass
class MimiState:
    """Streaming state of `Mimi.encode_step` / `Mimi.decode_step`, preallocated for `batch_size` slots."""

    batch_size: int
    frames_per_chunk: int  # codec frames per call the buffers were sized for (1 for streaming)
    encoder: EncoderState
    decoder: DecoderState

    def _check_mask(self, mask: Tensor) -> Tensor:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"reset mask must be a bool tensor of shape [{self.batch_size}], got {shape}")
        return mask.to(self.encoder.transformer.offsets.device)

    def reset(self, mask: Tensor) -> None:
        """Restart encoder and decoder of the slots where `mask` ([B] bool) is true; others go on."""
        with torch.inference_mode():
            mask = self._check_mask(mask)
            self.encoder.reset(mask)
            self.decoder.reset(mask)

    def reset_encoder(self, mask: Tensor) -> None:
        """Restart only the encoder side (audio -> codes) of the chosen slots."""
        with torch.inference_mode():
            self.encoder.reset(self._check_mask(mask))

    def reset_decoder(self, mask: Tensor) -> None:
        """Restart only the decoder side (codes -> audio) of the chosen slots."""
        with torch.inference_mode():
            self.decoder.reset(self._check_mask(mask))

    def slot_tensors(self) -> list[Tensor]:
        """Every tensor holding per-slot state (batch first): what moving a slot copies."""
        return [*self.encoder.slot_tensors(), *self.decoder.slot_tensors()]

    def prefix(self, rows: int) -> MimiState:
        """A view of the first `rows` slots sharing this state's memory (no copy), for a cheaper step."""
        if not 1 <= rows <= self.batch_size:
            raise ValueError(f"prefix rows must be in 1..{self.batch_size}, got {rows}")
        return MimiState(rows, self.frames_per_chunk, self.encoder.prefix(rows), self.decoder.prefix(rows))

    def reset_all(self) -> None:
        """Restart every slot."""
        self.reset(torch.ones(self.batch_size, dtype=torch.bool))
