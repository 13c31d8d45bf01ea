"""Mimi configuration: a frozen dataclass, the published preset, and Kyutai's config-dict reader."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SeanetConfig:
    """The convolutional encoder/decoder (SEANet) hyper-parameters."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = True

    @property
    def hop_length(self) -> int:
        """Audio samples per encoder step (product of the ratios): 960 for Mimi."""
        return math.prod(self.ratios)


@dataclass(frozen=True)
class QuantizerConfig:
    """The split residual vector quantizer: 1 semantic codebook + (n_q - 1) acoustic ones."""

    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1


@dataclass(frozen=True)
class CodecTransformerConfig:
    """The transformers after the encoder and before the decoder (conv layout [B, C, T])."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int | None = 250
    causal: bool = True
    layer_scale: float | None = 0.01
    max_period: float = 10000.0
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    input_dimension: int = 512
    output_dimensions: tuple[int, ...] = (512,)


@dataclass(frozen=True)
class MimiConfig:
    """Everything needed to build a Mimi codec. The defaults are the published checkpoint."""

    sample_rate: int = 24000
    channels: int = 1
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: CodecTransformerConfig = field(default_factory=CodecTransformerConfig)

    def __post_init__(self) -> None:
        if self.channels != 1 or self.seanet.channels != 1:
            raise ValueError(f"only mono Mimi is supported, got channels={self.channels}")
        encoder_rate = self.sample_rate / self.seanet.hop_length
        ratio = encoder_rate / self.frame_rate
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                f"encoder rate {encoder_rate} Hz must be an integer multiple of frame_rate {self.frame_rate} Hz"
            )
        if self.transformer.output_dimensions and len(self.transformer.output_dimensions) != 1:
            raise ValueError("Mimi's projected transformers have exactly one output")
        if self.transformer.context is None:
            raise ValueError("Mimi's transformers need a finite attention context to stream (context=None given)")
        if not 1 <= self.quantizer.n_q_semantic <= self.quantizer.n_q:
            raise ValueError(f"n_q_semantic must be in 1..n_q, got {self.quantizer.n_q_semantic}")

    @property
    def encoder_frame_rate(self) -> float:
        """Rate of the SEANet latent (25 Hz for Mimi)."""
        return self.sample_rate / self.seanet.hop_length

    @property
    def resample_stride(self) -> int:
        """Stride of the down/up-sampling convolutions between encoder rate and frame rate (2)."""
        return round(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per codec frame (1920 for Mimi)."""
        return self.seanet.hop_length * self.resample_stride

    @classmethod
    def official(cls) -> MimiConfig:
        """The configuration of the published Mimi checkpoint."""
        return cls()

    @classmethod
    def from_kyutai(cls, source: dict[str, Any] | str | Path) -> MimiConfig:
        """Read Kyutai's Mimi config dict (keys `seanet`, `quantizer`, `transformer`, ...) or a JSON file of it."""
        if isinstance(source, (str, Path)):
            with open(source, encoding="utf-8") as handle:
                source = json.load(handle)
        if not isinstance(source, dict):
            raise ValueError(f"a Mimi config must be a dict, got {type(source).__name__}")
        for section in ("seanet", "quantizer", "transformer"):
            if not isinstance(source.get(section), dict):
                raise ValueError(f"Mimi config lacks the '{section}' section")
        return cls(
            sample_rate=int(source.get("sample_rate", 24000)),
            channels=int(source.get("channels", 1)),
            frame_rate=float(source.get("frame_rate", 12.5)),
            seanet=_seanet_from_kyutai(source["seanet"]),
            quantizer=_quantizer_from_kyutai(source["quantizer"]),
            transformer=_transformer_from_kyutai(source["transformer"]),
        )


def _require(section: str, raw: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Reject option values that this implementation does not provide."""
    if key in raw and raw[key] not in allowed:
        raise ValueError(f"unsupported Mimi {section}.{key}={raw[key]!r} (supported: {allowed})")


def _seanet_from_kyutai(raw: dict[str, Any]) -> SeanetConfig:
    _require("seanet", raw, "causal", (True,))
    _require("seanet", raw, "activation", ("ELU",))
    _require("seanet", raw, "norm", ("none",))
    _require("seanet", raw, "pad_mode", ("constant",))
    _require("seanet", raw, "true_skip", (True,))
    _require("seanet", raw, "lstm", (0,))
    defaults = SeanetConfig()
    return SeanetConfig(
        channels=int(raw.get("channels", defaults.channels)),
        dimension=int(raw.get("dimension", defaults.dimension)),
        n_filters=int(raw.get("n_filters", defaults.n_filters)),
        n_residual_layers=int(raw.get("n_residual_layers", defaults.n_residual_layers)),
        ratios=tuple(int(r) for r in raw.get("ratios", defaults.ratios)),
        kernel_size=int(raw.get("kernel_size", defaults.kernel_size)),
        residual_kernel_size=int(raw.get("residual_kernel_size", defaults.residual_kernel_size)),
        last_kernel_size=int(raw.get("last_kernel_size", defaults.last_kernel_size)),
        dilation_base=int(raw.get("dilation_base", defaults.dilation_base)),
        compress=int(raw.get("compress", defaults.compress)),
        true_skip=bool(raw.get("true_skip", defaults.true_skip)),
    )


def _quantizer_from_kyutai(raw: dict[str, Any]) -> QuantizerConfig:
    defaults = QuantizerConfig()
    dimension = int(raw.get("dimension", defaults.dimension))
    return QuantizerConfig(
        dimension=dimension,
        n_q=int(raw.get("n_q", defaults.n_q)),
        bins=int(raw.get("bins", defaults.bins)),
        input_dimension=int(raw.get("input_dimension", dimension)),
        output_dimension=int(raw.get("output_dimension", dimension)),
        n_q_semantic=int(raw.get("n_q_semantic", defaults.n_q_semantic)),
    )


def _transformer_from_kyutai(raw: dict[str, Any]) -> CodecTransformerConfig:
    _require("transformer", raw, "conv_layout", (True,))
    _require("transformer", raw, "causal", (True,))
    defaults = CodecTransformerConfig()
    d_model = int(raw.get("d_model", defaults.d_model))
    context = raw.get("context", defaults.context)
    layer_scale = raw.get("layer_scale", defaults.layer_scale)
    return CodecTransformerConfig(
        d_model=d_model,
        num_heads=int(raw.get("num_heads", defaults.num_heads)),
        num_layers=int(raw.get("num_layers", defaults.num_layers)),
        dim_feedforward=int(raw.get("dim_feedforward", defaults.dim_feedforward)),
        context=None if context is None else int(context),
        causal=bool(raw.get("causal", defaults.causal)),
        layer_scale=None if layer_scale is None else float(layer_scale),
        max_period=float(raw.get("max_period", defaults.max_period)),
        gating=str(raw.get("gating", defaults.gating)),
        norm=str(raw.get("norm", defaults.norm)),
        positional_embedding=str(raw.get("positional_embedding", defaults.positional_embedding)),
        input_dimension=int(raw.get("input_dimension", d_model)),
        output_dimensions=tuple(int(d) for d in raw.get("output_dimensions", (d_model,))),
    )
