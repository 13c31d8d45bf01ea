"""Strict loading of Kyutai LM checkpoints: build on ``meta``, assign the tensors, cast.

Building on the meta device first means the parameters are never allocated twice: the
checkpoint's tensors (read straight onto the target device) become the model's parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from .config import LMConfig
from .lm import LMModel

logger = logging.getLogger(__name__)

_LISTED = 8  # how many offending keys an error message names


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


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


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointMismatch naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k].shape))
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > _LISTED else "")
            problems.append(f"{len(items)} {title} key(s): {shown}")
    if problems:
        raise CheckpointMismatch("the LM checkpoint does not match its config: " + "; ".join(problems)
                                 + " (wrong config.json for these weights?)")


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
    expected = model.state_dict()
    tensors = read_weights(weights, device, dtype)
    check_state_dict(expected, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointMismatch(f"tensors left unloaded after loading: {', '.join(leftover[:_LISTED])}")
    model.eval()
    count = sum(t.numel() for t in model.parameters())
    logger.info("LM loaded: %.1f M parameters, %s on %s", count / 1e6, dtype, device)
    return model
