"""Strict checkpoint loading shared by the LM and the codec loaders.

A checkpoint is compared with the model built from its config by key and shape only, so that a
safetensors file can be checked from its header before any tensor is read (a wrong config for a
7B checkpoint fails in milliseconds instead of after reading 15 GB onto the device). Both attention
spellings load (see ``duplex.model.spelling``). Rules, the same for Mimi and the LM: floating
tensors are cast to the requested dtype (never rejected for their file dtype), integer tensors
keep theirs; tensors are read one at a time straight onto the target device and become the
model's parameters, so the weights never exist twice in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

Shape = tuple[int, ...]
MAX_LISTED_KEYS = 8  # how many offending keys an error message names per kind


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    """Key -> shape of a state dict (works for tensors on the meta device)."""
    return {key: tuple(value.shape) for key, value in tensors.items()}


def safetensors_shapes(path: str | Path, what: str) -> dict[str, Shape]:
    """Key -> shape from a safetensors file's header, reading no tensor data.

    Raises FileNotFoundError for an absent file and ValueError (naming ``what``) for one that is
    not a readable safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises several error types for corrupt files
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED_KEYS else "")


def check_checkpoint_keys(expected: Mapping[str, Shape], found: Mapping[str, Shape], source: str) -> None:
    """Raise CheckpointMismatchError naming the missing, unexpected and mis-shaped keys.

    expected: the model's key -> shape; found: the checkpoint's; source: what the checkpoint is
    (e.g. "LM checkpoint model.safetensors"), used in the message.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{key} (checkpoint {tuple(found[key])}, model {tuple(expected[key])})"
        for key in set(expected) & set(found) if tuple(found[key]) != tuple(expected[key]))
    problems = [f"{len(items)} {title} key(s): {_listed(items)}"
                for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise CheckpointMismatchError(f"{source} does not match its config: " + "; ".join(problems)
                                      + " (wrong config for these weights?)")


def source_shapes(weights, what: str) -> dict[str, Shape]:
    """Key -> shape of a checkpoint: a state dict's, or a safetensors file's header (no tensor read)."""
    if isinstance(weights, Mapping):
        return tensor_shapes(weights)
    return safetensors_shapes(weights, what)


def iter_tensors(weights, what: str, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time, floats cast to ``dtype``, on ``device``."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    if isinstance(weights, Mapping):
        for key, tensor in weights.items():
            yield key, cast(tensor)
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, cast(handle.get_tensor(key))
    except Exception as err:  # safetensors raises several error types for truncated or corrupt files
        raise ValueError(f"cannot read {what} {weights}: {err}") from err


def describe_source(weights, name: str) -> str:
    """How messages name a checkpoint: "the LM checkpoint /path/model.safetensors"."""
    return f"the {name} checkpoint" if isinstance(weights, Mapping) else f"the {name} checkpoint {weights}"


def load_strict(model: torch.nn.Module, weights, name: str, device: str | torch.device,
                dtype: torch.dtype) -> int:
    """Check ``weights`` against ``model`` (built on ``meta``) strictly, then make them its tensors.

    Either attention spelling is accepted per attention; keys, spellings and shapes are checked
    before any tensor is read. Returns how many tensors the checkpoint held.
    """
    from .spelling import shapes_in_file_spelling

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    what = f"{name} weights"
    source = describe_source(weights, name)
    internal = tensor_shapes(model.state_dict())
    found = source_shapes(weights, what)
    try:
        expected = shapes_in_file_spelling(internal, found, source)
    except ValueError as err:
        raise CheckpointMismatchError(str(err)) from err
    check_checkpoint_keys(expected, found, source)
    tensors = dict(iter_tensors(weights, what, device, dtype))
    model.load_state_dict(tensors, strict=True, assign=True)  # fused attention tensors split on the way
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointMismatchError(f"tensors left unloaded after loading: {', '.join(leftover[:MAX_LISTED_KEYS])}")
    return len(found)


def save_published(model: torch.nn.Module, path: str | Path) -> None:
    """Write the model's weights as safetensors in the published (fused) layout."""
    from safetensors.torch import save_file

    from .spelling import fuse_state_dict

    save_file(fuse_state_dict(model.state_dict()), str(path))
