"""The two spellings of attention weights in Kyutai checkpoints, and the mapping between them.

duplex's modules keep one projection per weight set (``self_attn.in_projs.{i}.weight`` [3D, D],
``self_attn.out_projs.{i}.weight`` [D, D]): the *per-step* spelling, which newer upstream tools
also write. Every checkpoint Kyutai published instead *fuses* them, step-major:
``self_attn.in_proj_weight`` [sets * 3D, D] and ``self_attn.out_proj.weight`` [sets * D, D].

A checkpoint may use either spelling for each attention, never both for one attention. Loading
checks the file's spelling here, and ``StreamingAttention`` splits fused tensors into row views
(no copy) when they are loaded; saving writes the published, fused spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
_PER_STEP = re.compile(r"^(?P<attention>.+\.self_attn)\.(?P<kind>in_projs|out_projs)\.(?P<index>\d+)\.weight$")
_FUSED_SUFFIX = {"in_projs": "in_proj_weight", "out_projs": "out_proj.weight"}


@dataclass(frozen=True)
class FusedGroup:
    """One fused projection of one attention and the per-step keys it stands for (in step order)."""

    attention: str  # e.g. "transformer.layers.0.self_attn"
    fused_key: str  # e.g. "transformer.layers.0.self_attn.in_proj_weight"
    step_keys: tuple[str, ...]  # e.g. ("...self_attn.in_projs.0.weight", ...)


class MixedSpellingError(ValueError):
    """A checkpoint spells one attention both ways (fused and per-step)."""


def fused_groups(per_step_keys: Iterable[str]) -> list[FusedGroup]:
    """The fused groups of a per-step key set (the module's own keys), in a stable order."""
    found: dict[tuple[str, str], dict[int, str]] = {}
    for key in per_step_keys:
        match = _PER_STEP.match(key)
        if match:
            found.setdefault((match["attention"], match["kind"]), {})[int(match["index"])] = key
    groups = []
    for (attention, kind), by_index in sorted(found.items()):
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{attention}.{kind} has gaps in its step indices: {sorted(by_index)}")
        steps = tuple(by_index[i] for i in range(len(by_index)))
        groups.append(FusedGroup(attention, f"{attention}.{_FUSED_SUFFIX[kind]}", steps))
    return groups


def fused_shape(shapes: Mapping[str, Shape], group: FusedGroup) -> Shape:
    """Shape of a group's fused tensor: the per-step shapes stacked along the output rows."""
    first = shapes[group.step_keys[0]]
    return (sum(shapes[key][0] for key in group.step_keys), *first[1:])


def published_shapes(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """A module's key -> shape as the published (fused) layout spells it."""
    out = dict(shapes)
    for group in fused_groups(shapes):
        out[group.fused_key] = fused_shape(shapes, group)
        for key in group.step_keys:
            del out[key]
    return out


def _uses_per_step(group: FusedGroup, file_keys: set[str]) -> bool:
    return any(key.startswith(group.attention + ".in_projs.") or key.startswith(group.attention + ".out_projs.")
               for key in file_keys)


def _uses_fused(group: FusedGroup, file_keys: set[str]) -> bool:
    return (group.attention + ".in_proj_weight") in file_keys or (group.attention + ".out_proj.weight") in file_keys


def shapes_in_file_spelling(shapes: Mapping[str, Shape], file_keys: Iterable[str], source: str) -> dict[str, Shape]:
    """The module's key -> shape, spelled per attention as the file spells it (fused by default).

    Raises MixedSpellingError naming the keys of every attention the file spells both ways.
    """
    file_keys = set(file_keys)
    out = dict(shapes)
    mixed = []
    for group in fused_groups(shapes):
        per_step, fused = _uses_per_step(group, file_keys), _uses_fused(group, file_keys)
        if per_step and fused:
            both = sorted(k for k in file_keys if k.startswith(group.attention + ".") and "proj" in k)
            mixed.append(f"{group.attention} ({', '.join(both)})")
        if not per_step:
            out[group.fused_key] = fused_shape(shapes, group)
            for key in group.step_keys:
                del out[key]
    if mixed:
        raise MixedSpellingError(f"{source} mixes the fused (in_proj_weight / out_proj.weight) and per-step "
                                 f"(in_projs.N / out_projs.N) spellings for one attention: {'; '.join(sorted(set(mixed)))}")
    return out


def fuse_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module state dict in the published (fused) spelling, every tensor contiguous on the CPU."""
    out = {key: value.detach() for key, value in state.items()}
    for group in fused_groups(state):
        out[group.fused_key] = torch.cat([out.pop(key) for key in group.step_keys], dim=0)
    return {key: value.contiguous().cpu() for key, value in out.items()}
