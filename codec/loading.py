"""Strict loading of Kyutai's Mimi checkpoints (official safetensors key names), and random-weight builds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

# The strict key/shape check and its error type are shared with the LM loader.
from ..model.checkpoint import CheckpointMismatchError  # noqa: F401  (re-exported by duplex.codec)
from ..model.checkpoint import MAX_LISTED_KEYS, check_checkpoint_keys, safetensors_shapes, tensor_shapes
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


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every persistent key of the model's state dict with its shape (works on the meta device)."""
    return tensor_shapes(model.state_dict())


def _checkpoint_shapes(weights: str | Path | dict[str, Tensor]) -> tuple[dict[str, tuple[int, ...]], str]:
    """Key -> shape of the checkpoint (a file's header only: no tensor read) and a name for messages."""
    if isinstance(weights, dict):
        return tensor_shapes(weights), "<state dict>"
    return safetensors_shapes(weights, "Mimi weights"), str(weights)


def _read_tensors(weights: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(weights, dict):
        return dict(weights)
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {weights} as safetensors: {error}") from error


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
    """Build Mimi on `meta`, check the checkpoint strictly, load it with `assign=True`, cast and derive buffers."""
    config = resolve_config(config)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    with torch.device("meta"):
        model = Mimi(config, num_codebooks=num_codebooks)
    shapes, source = _checkpoint_shapes(weights)
    check_checkpoint_keys(expected_shapes(model), shapes, f"Mimi checkpoint {source}")
    tensors = _read_tensors(weights)
    tensors = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in tensors.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    logger.info("loaded Mimi from %s (%d tensors) on %s as %s", source, len(tensors), device, dtype)
    return finish_model(model)


def save_mimi(model: Mimi, path: str | Path) -> None:
    """Write the model's weights as a Kyutai-format safetensors file (contiguous copies of packed weights)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(tensors, str(path))


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
