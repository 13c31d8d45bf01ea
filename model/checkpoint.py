"""Strict checkpoint loading shared by the LM and the codec loaders (and the quantized / LoRA ones).

A checkpoint is compared with the model built from its config by key and shape only, so that a
safetensors file is checked from its header before any tensor is read (a wrong config for a 7B
checkpoint fails in milliseconds instead of after reading 15 GB). Both attention spellings load
(see ``duplex.model.spelling``).

The rules, the same for Mimi and the LM:

- **dtype**: floating tensors are cast to the requested ``dtype`` (a bfloat16 file loads as
  float32 and the other way round; a file is never rejected for its floating dtype); integer and
  bool tensors keep theirs. ``keep_dtype`` names keys whose floating tensors keep the file dtype.
- **device**: tensors are read one at a time from the file (plain reads, no memory map), cast and
  moved to ``device``, and become the model's parameters (``assign``): the model is built on
  ``meta``, so the weights never exist twice in memory.

The pieces are public so that other loaders reuse them: ``checkpoint_header`` / ``file_shapes``
(the file's key -> shape), ``module_shapes`` (the model's, per-step spelling),
``expected_shapes`` (the model's in the file's spelling), ``check_checkpoint_keys`` and
``load_strict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .safetensors_io import SafetensorsFormatError, SafetensorsHeader, iter_tensors, read_header, write_tensors
from .spelling import MixedSpellingError, published_pieces, shapes_in_file_spelling, split_fused

Shape = tuple[int, ...]
MAX_LISTED_KEYS = 8  # how many offending keys an error message names per kind


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    """Key -> shape of a state dict (works for tensors on the meta device)."""
    return {key: tuple(value.shape) for key, value in tensors.items()}


def module_shapes(model: torch.nn.Module) -> dict[str, Shape]:
    """The model's own key -> shape (per-step attention spelling); works on ``meta``."""
    return tensor_shapes(model.state_dict())


def checkpoint_header(path: str | Path, what: str) -> SafetensorsHeader:
    """A safetensors file's header (keys, dtypes, shapes, offsets), reading no tensor data.

    Raises FileNotFoundError for an absent file and ValueError (naming ``what``) for one that is
    not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return read_header(path)
    except (OSError, SafetensorsFormatError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def safetensors_shapes(path: str | Path, what: str) -> dict[str, Shape]:
    """Key -> shape from a safetensors file's header, reading no tensor data."""
    return checkpoint_header(path, what).shapes()


def file_shapes(weights, what: str) -> dict[str, Shape]:
    """Key -> shape of a checkpoint: a state dict's, or a safetensors file's header (no tensor read)."""
    if isinstance(weights, Mapping):
        return tensor_shapes(weights)
    return safetensors_shapes(weights, what)


source_shapes = file_shapes  # the earlier name


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED_KEYS else "")


def check_checkpoint_keys(expected: Mapping[str, Shape], found: Mapping[str, Shape], source: str) -> None:
    """Raise CheckpointMismatchError naming the missing, unexpected and mis-shaped keys.

    expected: the model's key -> shape; found: the checkpoint's; source: what the checkpoint is
    (e.g. "the LM checkpoint model.safetensors"), used in the message.
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


def expected_shapes(shapes: Mapping[str, Shape], found: Mapping[str, Shape], source: str) -> dict[str, Shape]:
    """The model's key -> shape (``shapes``) spelled per attention as the checkpoint (``found``) spells it.

    A checkpoint mixing both spellings for one attention raises CheckpointMismatchError naming the keys.
    """
    try:
        return shapes_in_file_spelling(shapes, found, source)
    except MixedSpellingError as err:
        raise CheckpointMismatchError(str(err)) from err


def read_tensors(weights, what: str, device: torch.device, dtype: torch.dtype,
                 keep_dtype: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time, floats cast to ``dtype`` (unless ``keep_dtype(key)``), on ``device``."""
    def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
        floating = tensor.is_floating_point() and not (keep_dtype and keep_dtype(key))
        return tensor.to(device=device, dtype=dtype if floating else tensor.dtype)

    if isinstance(weights, Mapping):
        for key, tensor in weights.items():
            yield key, cast(key, tensor)
        return
    header = checkpoint_header(weights, what)
    try:
        for key, tensor in iter_tensors(header):
            yield key, cast(key, tensor)
    except (OSError, SafetensorsFormatError) as err:
        raise ValueError(f"cannot read {what} {weights}: {err}") from err


def describe_source(weights, name: str) -> str:
    """How messages name a checkpoint: "the LM checkpoint /path/model.safetensors"."""
    return f"the {name} checkpoint" if isinstance(weights, Mapping) else f"the {name} checkpoint {weights}"


def check_strict(model: torch.nn.Module, weights, name: str) -> dict[str, Shape]:
    """Check ``weights`` against ``model`` by keys, spelling and shapes only; return the file's key -> shape."""
    source = describe_source(weights, name)
    found = file_shapes(weights, f"{name} weights")
    check_checkpoint_keys(expected_shapes(module_shapes(model), found, source), found, source)
    return found


def load_strict(model: torch.nn.Module, weights, name: str, device: str | torch.device,
                dtype: torch.dtype, keep_dtype: Callable[[str], bool] | None = None) -> int:
    """Check ``weights`` against ``model`` (built on ``meta``) strictly, then make them its tensors.

    ``weights``: a safetensors path or a state dict, either attention spelling per attention;
    keys, spellings and shapes are checked before any tensor is read. ``name`` ("LM", "Mimi")
    appears in error messages. Returns how many tensors the checkpoint held.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    found = check_strict(model, weights, name)
    own_shapes = module_shapes(model)
    tensors = split_fused(dict(read_tensors(weights, f"{name} weights", device, dtype, keep_dtype)), own_shapes)
    assign_tensors(model, tensors)
    del tensors  # from here on the model's parameters are the only references to the weights
    state = model.state_dict()
    leftover = [key for key in own_shapes if state[key].is_meta]
    if leftover:
        raise CheckpointMismatchError(f"tensors left unloaded after loading: {_listed(leftover)}")
    return len(found)


def assign_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make ``tensors`` (the model's own keys, already checked) its parameters and persistent buffers.

    Assigned directly rather than through ``load_state_dict``, whose post-load hooks (Mimi re-packs
    its conv weights there) would copy weights while this dict still holds the originals; loaders
    derive their buffers afterwards (``duplex.codec.loading.finish_model``).
    """
    expected = set(model.state_dict())
    if set(tensors) != expected:
        raise CheckpointMismatchError(f"internal key mismatch: {_listed(sorted(set(tensors) ^ expected))}")
    for key, tensor in tensors.items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            grad = old.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=grad)
        elif leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            raise CheckpointMismatchError(f"{key} is neither a parameter nor a buffer of the model")


def save_published(model: torch.nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write the model's weights as safetensors in the published (fused) layout, tensor by tensor.

    Fused attention tensors are written from their per-step parts (no concatenated copy), so
    saving needs no memory beyond the model's own.
    """
    write_tensors(path, published_pieces(model.state_dict()), metadata)  # each piece copied to the host as written
