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

from .checkpoint import (MAX_LISTED_KEYS, CheckpointMismatchError, check_checkpoint_keys, safetensors_shapes,
                         tensor_shapes)
from .config import LMConfig
from .lm import LMModel

logger = logging.getLogger(__name__)

# The old name of the shared error type (see ``duplex.model.checkpoint``), kept for imports.
CheckpointMismatch = CheckpointMismatchError


def checkpoint_shapes(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint: a state dict's, or a safetensors file's header (no tensor read)."""
    if isinstance(source, Mapping):
        return tensor_shapes(source)
    return safetensors_shapes(source, "LM weights")


def read_weights(source: str | Path | Mapping[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (read onto ``device``) or a mapping, floats cast to ``dtype``."""
    if isinstance(source, Mapping):
        tensors = dict(source)
    else:
        from safetensors.torch import load_file

        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"LM weights not found: {path}")
        try:
            tensors = load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises several error types for corrupt files
            raise ValueError(f"cannot read LM weights {path}: {err}") from err
    for name in list(tensors):  # cast one tensor at a time: never two copies of the model
        tensor = tensors[name]
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.to(device=device, dtype=target_dtype)
    return tensors


def default_config_for(weights: str | Path | Mapping[str, torch.Tensor]) -> LMConfig:
    """config.json next to the weights file when there is one, else the Moshi 7B preset."""
    if not isinstance(weights, Mapping):
        candidate = Path(weights).with_name("config.json")
        if candidate.is_file():
            logger.info("LM config: %s", candidate)
            return LMConfig.from_kyutai(candidate)
    logger.info("LM config: the Moshi 7B preset")
    return LMConfig.moshi_7b()


def load_lm(weights: str | Path | Mapping[str, torch.Tensor], config: LMConfig | None = None,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> LMModel:
    """Build the LM on ``meta``, check the checkpoint strictly, assign its tensors on ``device``."""
    config = config if config is not None else default_config_for(weights)
    device = torch.device(device)
    with torch.device("meta"):
        model = LMModel(config)
    source = "the LM checkpoint" if isinstance(weights, Mapping) else f"the LM checkpoint {weights}"
    check_checkpoint_keys(tensor_shapes(model.state_dict()), checkpoint_shapes(weights), source)
    tensors = read_weights(weights, device, dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointMismatchError(f"tensors left unloaded after loading: {', '.join(leftover[:MAX_LISTED_KEYS])}")
    model.eval()
    count = sum(t.numel() for t in model.parameters())
    logger.info("LM loaded: %.1f M parameters, %s on %s", count / 1e6, dtype, device)
    return model
