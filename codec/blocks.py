"""Mimi's glue blocks: the projected transformer and the 25 <-> 12.5 Hz resampling convs (channels-last)."""

from __future__ import annotations

from duplex.model.transformer import StreamingTransformer, TransformerConfig, TransformerState
from torch import Tensor, nn

from .config import CodecTransformerConfig
from .conv import Conv1dState, ConvTranspose1dState, StreamingConv1d, StreamingConvTranspose1d


def transformer_config(config: CodecTransformerConfig) -> TransformerConfig:
    """The shared transformer's config for one of Mimi's transformers."""
    return TransformerConfig(
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        dim_feedforward=config.dim_feedforward,
        context=config.context,
        causal=config.causal,
        norm=config.norm,
        gating=config.gating,
        positional_embedding=config.positional_embedding,
        max_period=config.max_period,
        layer_scale=config.layer_scale,
    )


class ProjectedTransformer(nn.Module):
    """Transformer over channels-last latents [B, T, C] with optional linear in/out projections (keys as Kyutai's)."""

    def __init__(self, config: CodecTransformerConfig) -> None:
        super().__init__()
        self.transformer = StreamingTransformer(transformer_config(config))
        if config.input_dimension != config.d_model:
            self.input_proj = nn.Linear(config.input_dimension, config.d_model, bias=False)
        else:
            self.input_proj = None
        self.output_projs = nn.ModuleList(
            nn.Identity() if dim == config.d_model else nn.Linear(config.d_model, dim, bias=False)
            for dim in config.output_dimensions
        )

    def init_state(self, batch_size: int, chunk_size: int, device=None, dtype=None) -> TransformerState:
        """A fresh state fed at most `chunk_size` steps per call."""
        return self.transformer.init_state(batch_size, chunk_size=chunk_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: TransformerState | None = None, ready: Tensor | None = None) -> Tensor:
        """x [B, T, C_in] -> [B, T, C_out] (channels-last; Kyutai's conv layout is handled by the caller).

        `ready` [B] bool: only those slots advance their state (None = all)."""
        if self.input_proj is not None:
            x = self.input_proj(x)
        if state is None:
            steps = x.shape[1]
            state = self.transformer.init_state(x.shape[0], chunk_size=steps, max_steps=steps, device=x.device)
        x = self.transformer(x, state, ready)  # [B, T, D]
        return self.output_projs[0](x)  # [B, T, C_out]


class ConvDownsample1d(nn.Module):
    """Learnt causal downsampling: conv(k=2*stride, stride), no bias, replicate padding (key `conv.conv.conv`)."""

    def __init__(self, stride: int, dimension: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = StreamingConv1d(dimension, dimension, 2 * stride, stride, bias=False, pad_mode="replicate")

    def init_state(self, batch_size: int, chunk: int, device=None, dtype=None) -> Conv1dState | None:
        """State for inputs of `chunk` steps (at the encoder rate)."""
        return self.conv.init_state(batch_size, chunk, device, dtype)

    def forward(self, x: Tensor, state: Conv1dState | None = None, ready: Tensor | None = None) -> Tensor:
        """x [B, T, C] -> [B, T / stride, C]; `ready`: slots that advance (None = all)."""
        return self.conv(x, state, ready=ready)


class ConvTrUpsample1d(nn.Module):
    """Learnt causal depthwise upsampling: transposed conv(k=2*stride, stride, groups=C), no bias."""

    def __init__(self, stride: int, dimension: int) -> None:
        super().__init__()
        self.stride = stride
        self.convtr = StreamingConvTranspose1d(dimension, dimension, 2 * stride, stride, groups=dimension, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvTranspose1dState:
        """State carrying the transposed conv's pending overlap."""
        return self.convtr.init_state(batch_size, device, dtype)

    def forward(self, x: Tensor, state: ConvTranspose1dState | None = None, ready: Tensor | None = None) -> Tensor:
        """x [B, T, C] -> [B, T * stride, C]; `ready`: slots that advance (None = all)."""
        return self.convtr(x, state, ready=ready)
