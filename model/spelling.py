"""The two spellings of attention weights in Kyutai checkpoints, and the mapping between them.

duplex's modules keep one projection per weight set (``self_attn.in_projs.{i}.weight`` [3D, D],
``self_attn.out_projs.{i}.weight`` [D, D]): the *per-step* spelling, which newer upstream tools
also write. Every checkpoint Kyutai published instead *fuses* them, step-major:
``self_attn.in_proj_weight`` [sets * 3D, D] and ``self_attn.out_proj.weight`` [sets * D, D].

The mapping is by leaf, so row-wise companions of a weight follow it: an int8 checkpoint's
per-row scales ``in_projs.{i}.weight_scb`` [3D] fuse to ``in_proj_weight_scb`` [sets * 3D] and
``out_projs.{i}.weight_scb`` to ``out_proj.weight_scb``. (LoRA factors are not row-stackable:
adapters use the per-step spelling only.)

A checkpoint may use either spelling for each attention, never both for one attention. The
loader (``duplex.model.checkpoint.load_strict``) checks the file's spelling with
``shapes_in_file_spelling`` before reading any tensor, then ``split_fused`` turns fused tensors
into per-step row views (no copy); saving writes the fused spelling (``published_pieces``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
# leaf: "weight", or a row-wise companion of it such as "weight_scb" (int8 per-row scales), or "bias".
_PER_STEP = re.compile(
    r"^(?P<attention>.+\.self_attn)\.(?P<kind>in_projs|out_projs)\.(?P<index>\d+)\.(?P<leaf>weight(?:_\w+)?|bias)$")


def _fused_key(attention: str, kind: str, leaf: str) -> str:
    return f"{attention}.in_proj_{leaf}" if kind == "in_projs" else f"{attention}.out_proj.{leaf}"


@dataclass(frozen=True)
class FusedGroup:
    """One fused tensor of one attention and the per-step keys it stands for (in step order)."""

    attention: str  # e.g. "transformer.layers.0.self_attn"
    fused_key: str  # e.g. "transformer.layers.0.self_attn.in_proj_weight"
    step_keys: tuple[str, ...]  # e.g. ("...self_attn.in_projs.0.weight", ...)


class MixedSpellingError(ValueError):
    """A checkpoint spells one attention both ways (fused and per-step)."""


def fused_groups(per_step_keys: Iterable[str]) -> list[FusedGroup]:
    """The fused groups of a per-step key set (the module's own keys), in a stable order."""
    found: dict[tuple[str, str, str], dict[int, str]] = {}
    for key in per_step_keys:
        match = _PER_STEP.match(key)
        if match:
            group = (match["attention"], match["kind"], match["leaf"])
            found.setdefault(group, {})[int(match["index"])] = key
    groups = []
    for (attention, kind, leaf), by_index in sorted(found.items()):
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{attention}.{kind} has gaps in its step indices: {sorted(by_index)}")
        steps = tuple(by_index[i] for i in range(len(by_index)))
        groups.append(FusedGroup(attention, _fused_key(attention, kind, leaf), steps))
    return groups


def fused_shape(shapes: Mapping[str, Shape], group: FusedGroup) -> Shape:
    """Shape of a group's fused tensor: the per-step shapes stacked along the output rows."""
    first = shapes[group.step_keys[0]]
    return (sum(shapes[key][0] for key in group.step_keys), *first[1:])


def published_shapes(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """A module's key -> shape as the published (fused) layout spells it."""
    return shapes_in_file_spelling(shapes, (), "the published layout")


def _spells_per_step(attention: str, file_keys: set[str]) -> list[str]:
    """The file's per-step projection keys of one attention (LoRA factors such as
    ``in_projs.0.lora_A.weight`` are not evidence of a spelling: they exist in the per-step one only)."""
    return sorted(k for k in file_keys if (match := _PER_STEP.match(k)) and match["attention"] == attention)


def _spells_fused(attention: str, file_keys: set[str]) -> list[str]:
    return sorted(k for k in file_keys if k.startswith((attention + ".in_proj_", attention + ".out_proj.")))


def shapes_in_file_spelling(shapes: Mapping[str, Shape], file_keys: Iterable[str], source: str) -> dict[str, Shape]:
    """The module's key -> shape (``shapes``, per-step), spelled per attention as the file spells it.

    An attention the file spells per-step keeps its per-step keys; every other one (fused, or
    absent from the file) is expected fused. Raises MixedSpellingError naming the keys of every
    attention the file spells both ways.
    """
    file_keys = set(file_keys)
    out = dict(shapes)
    mixed: dict[str, list[str]] = {}
    for group in fused_groups(shapes):
        per_step, fused = _spells_per_step(group.attention, file_keys), _spells_fused(group.attention, file_keys)
        if per_step and fused:
            mixed[group.attention] = fused + per_step
        if not per_step:
            out[group.fused_key] = fused_shape(shapes, group)
            for key in group.step_keys:
                del out[key]
    if mixed:
        listed = "; ".join(f"{attention} ({', '.join(keys)})" for attention, keys in sorted(mixed.items()))
        raise MixedSpellingError(f"{source} mixes the fused (in_proj_weight / out_proj.weight) and per-step "
                                 f"(in_projs.N / out_projs.N) spellings for one attention: {listed}")
    return out


def split_fused(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape]) -> dict[str, torch.Tensor]:
    """A state dict in the module's per-step spelling: fused tensors split into row views (no copy).

    ``shapes``: the module's own key -> shape (per-step), which gives each step's row count.
    """
    out = dict(tensors)
    for group in fused_groups(shapes):
        if group.fused_key in out:
            rows = [shapes[key][0] for key in group.step_keys]
            for key, piece in zip(group.step_keys, torch.split(out.pop(group.fused_key), rows, dim=0)):
                out[key] = piece
    return out


def published_pieces(state: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """A module state dict in the published spelling, each tensor as its row pieces (nothing copied).

    A fused key maps to its per-step tensors in step order; every other key to ``[tensor]``.
    """
    out: dict[str, list[torch.Tensor]] = {key: [value.detach()] for key, value in state.items()}
    for group in fused_groups(state):
        out[group.fused_key] = [out.pop(key)[0] for key in group.step_keys]
    return out


def fuse_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module state dict in the published (fused) spelling, every tensor contiguous on the CPU (copies fused ones)."""
    return {key: (torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]).contiguous().cpu()
            for key, pieces in published_pieces(state).items()}
