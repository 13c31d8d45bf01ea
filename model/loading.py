"""Strict loading of Kyutai LM checkpoints: build on ``meta``, check, assign the tensors, cast.

Keys and shapes are checked from the safetensors header before any tensor is read, so a wrong
config fails at once. Building on the meta device first means the parameters are never
allocated twice: the checkpoint's tensors (read straight onto the target device) become the
model's parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import CheckpointMismatchError, load_strict, save_published, source_shapes
from .config import LMConfig
from .lm import LMModel

logger = logging.getLogger(__name__)

# The old name of the shared error type (see ``duplex.model.checkpoint``), kept for imports.
CheckpointMismatch = CheckpointMismatchError


def checkpoint_shapes(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint: a state dict's, or a safetensors file's header (no tensor read)."""
    return source_shapes(source, "LM weights")


def default_config_for(weights: str | Path | Mapping[str, torch.Tensor]) -> LMConfig:
    """config.json next to the weights file when there is one, else the Moshi 7B preset."""
    if not isinstance(weights, Mapping):
        candidate = Path(weights).with_name("config.json")
        if candidate.is_file():
            logger.info("LM config: %s", candidate)
            return LMConfig.from_kyutai(candidate)
    logger.info("LM config: the Moshi 7B preset")
    return LMConfig.moshi_7b()


def resolve_config(config: LMConfig | Mapping | str | Path | None,
                   weights: str | Path | Mapping[str, torch.Tensor]) -> LMConfig:
    """An LMConfig from an LMConfig, a Kyutai config dict, a config.json path, or None (found by the weights)."""
    if config is None:
        return default_config_for(weights)
    if isinstance(config, LMConfig):
        return config
    return LMConfig.from_kyutai(config if isinstance(config, Mapping) else Path(config))


def load_lm(weights: str | Path | Mapping[str, torch.Tensor], config: LMConfig | Mapping | str | Path | None = None,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
            quantize: str | None = None, compute_dtype: torch.dtype | None = None) -> LMModel:
    """Build the LM on ``meta``, check the checkpoint strictly, assign its tensors on ``device``.

    ``weights``: a safetensors path (published or per-step spelling) or a state dict. ``config``:
    see ``resolve_config``. Floating tensors are cast to ``dtype``, integer ones keep theirs.
    ``quantize``: "int8" / "int4" quantize the linear layers while loading; a Kyutai q8 file is
    recognised by itself (see ``duplex.model.quant_loading``); ``compute_dtype``: the dtype the
    quantized layers compute in (default ``dtype``).
    """
    config = resolve_config(config, weights)
    from .quant_loading import load_quantized_lm, needs_quantized_loading

    if needs_quantized_loading(weights, config, quantize):
        return load_quantized_lm(weights, config, device=device, dtype=dtype, quantize=quantize,
                                 compute_dtype=compute_dtype)
    with torch.device("meta"):
        model = LMModel(config)
    count = load_strict(model, weights, "LM", device, dtype)
    model.eval()
    parameters = sum(t.numel() for t in model.parameters())
    logger.info("LM loaded: %d tensors, %.1f M parameters, %s on %s", count, parameters / 1e6, dtype, device)
    return model


def save_lm(model: LMModel, path: str | Path) -> None:
    """Write the LM's weights in the published layout (fused attention), loadable by Kyutai's tools."""
    save_published(model, path)
