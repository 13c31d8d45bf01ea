"""Strict loading of Kyutai's Mimi checkpoints (official safetensors key names), and random-weight builds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

# The strict key/shape check and its error type are shared with the LM loader.
from ..model.checkpoint import CheckpointMismatchError  # noqa: F401  (re-exported by duplex.codec)
from ..model.checkpoint import MAX_LISTED_KEYS, load_strict, save_published
from .config import MimiConfig
from .mimi import Mimi

logger = logging.getLogger(__name__)

def resolve_config(config: MimiConfig | dict | str | Path | None) -> MimiConfig:
    """A MimiConfig from None (the published preset), a MimiConfig, a Kyutai config dict or a JSON path."""
    if config is None:
        return MimiConfig.official()
    if isinstance(config, MimiConfig):
        return config
    return MimiConfig.from_kyutai(config)


def finish_model(model: Mimi) -> Mimi:
    """Derive buffers (codebook centroids), pack conv weights, check nothing is left on `meta`; eval mode."""
    model.quantizer.refresh_centroids()
    model.pack_()
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised after loading: {', '.join(left[:MAX_LISTED_KEYS])}")
    model.requires_grad_(False)
    return model.eval()


def load_mimi(
    weights: str | Path | dict[str, Tensor],
    config: MimiConfig | dict | str | Path | None = None,
    num_codebooks: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Mimi:
    """Load a Kyutai Mimi checkpoint strictly: build on ``meta``, check, assign, derive the codebook buffers.

    ``weights``: a safetensors path in the published (fused) or per-step spelling, or a state
    dict. ``config``: a ``MimiConfig``, a Kyutai config dict, a path to a config JSON, or None
    (the published Mimi). ``num_codebooks``: how many codebooks encode / decode use.
    Rules shared with ``LMModel.from_pretrained`` (``duplex.model.checkpoint.load_strict``): keys
    and shapes are checked from the file's header before any tensor is read; floating tensors are
    cast to ``dtype`` (never rejected for their file dtype), integer ones keep theirs; each tensor
    is read once, straight to ``device``, and becomes the model's parameter (never held twice).
    """
    config = resolve_config(config)
    with torch.device("meta"):
        model = Mimi(config, num_codebooks=num_codebooks)
    count = load_strict(model, weights, "Mimi", device, dtype)
    logger.info("loaded Mimi (%d tensors) on %s as %s", count, device, dtype)
    return finish_model(model)


def save_mimi(model: Mimi, path: str | Path) -> None:
    """Write the model's weights in the published layout (fused attention), loadable by Kyutai's tools."""
    save_published(model, path)


def random_mimi(
    config: MimiConfig | None = None,
    num_codebooks: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Mimi:
    """A Mimi with random weights (uniform +-1/sqrt(fan_in), unit norms, random codebooks): benchmarks, tests."""
    with torch.device("meta"):
        model = Mimi(config or MimiConfig.official(), num_codebooks=num_codebooks)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            _fill_random_(name, tensor, generator)
    return finish_model(model)


def _fill_random_(name: str, tensor: Tensor, generator: torch.Generator) -> None:
    """Plausible random values for one parameter or buffer, by its role."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "cluster_usage" or (tensor.dim() == 1 and ".norm" in name and leaf == "weight"):
        tensor.fill_(1.0)
    elif leaf in ("scale", "_initialized"):
        tensor.fill_(0.01 if leaf == "scale" else 1.0)
    elif leaf == "embedding_sum":
        tensor.normal_(generator=generator)
    elif tensor.dim() >= 2:
        bound = (tensor[0].numel()) ** -0.5  # 1/sqrt(fan_in) for [C_out, C_in, K] and [out, in]
        tensor.uniform_(-bound, bound, generator=generator)
    else:
        tensor.uniform_(-0.01, 0.01, generator=generator)
