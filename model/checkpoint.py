"""Strict checkpoint checks shared by the LM and the codec loaders.

A checkpoint is compared with the model built from its config by key and shape only, so that a
safetensors file can be checked from its header before any tensor is read (a wrong config for a
7B checkpoint fails in milliseconds instead of after reading 15 GB onto the device).
"""

from __future__ import annotations

from collections.abc import Mapping
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
