"""Random-weight checkpoints with exactly a published key layout, written tensor by tensor.

For full-size tests and ``duplex bench load``: the layout comes from a key listing
(``key<TAB>(shape)<TAB>torch.dtype`` lines, as ``mimi_keys.tsv`` / ``moshi_7b_keys.tsv``) or from a
model built on ``meta`` (its published, fused spelling). Only one tensor exists in memory at a
time, so a 15 GB checkpoint is written with a few hundred MB of RAM.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import module_shapes
from .safetensors_io import SafetensorsWriter
from .spelling import published_shapes

Shape = tuple[int, ...]
Layout = list[tuple[str, torch.dtype, Shape]]


def read_key_listing(path: str | Path, dtype: torch.dtype | None = None) -> Layout:
    """A key listing file -> [(key, dtype, shape)]; ``dtype`` overrides the listed floating dtypes."""
    layout = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            key, shape_text, dtype_text = line.split("\t")
            shape = tuple(int(size) for size in ast.literal_eval(shape_text))
            listed = getattr(torch, dtype_text.strip().removeprefix("torch."))
        except (ValueError, SyntaxError, AttributeError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not 'key<TAB>(shape)<TAB>torch.dtype': {line!r}") from err
        layout.append((key, dtype if dtype is not None and listed.is_floating_point else listed, shape))
    return layout


def published_layout(model: torch.nn.Module, dtype: torch.dtype) -> Layout:
    """The published (fused) key layout of a model (built on ``meta``), every tensor in ``dtype``."""
    return [(key, dtype, shape) for key, shape in sorted(published_shapes(module_shapes(model)).items())]


def layout_bytes(layout: Layout) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in layout)


def fill_random_(key: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Plausible random values by role: unit gains and codebook usage, N(0, 1) codebooks, else +-1/sqrt(fan_in)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("cluster_usage", "_initialized", "alpha") or (tensor.dim() == 1 and ".norm" in key and leaf == "weight"):
        tensor.fill_(1.0)
    elif leaf == "scale":
        tensor.fill_(0.01)
    elif leaf == "embedding_sum":
        tensor.normal_(generator=generator)
    elif tensor.dim() >= 2:
        tensor.uniform_(-tensor[0].numel() ** -0.5, tensor[0].numel() ** -0.5, generator=generator)
    else:
        tensor.uniform_(-0.01, 0.01, generator=generator)


def write_random_checkpoint(path: str | Path, layout: Layout, seed: int = 0,
                            fill: Callable[[str, torch.Tensor, torch.Generator], None] = fill_random_,
                            progress: Callable[[int, int], None] | None = None) -> int:
    """Write a random checkpoint with ``layout`` to ``path``, one tensor at a time; returns its data bytes.

    Floating tensors are drawn in float32 and cast (bfloat16 has no random generator of its own on every
    backend); ``progress(done_bytes, total_bytes)`` is called after each tensor.
    """
    generator = torch.Generator().manual_seed(seed)
    total, done = layout_bytes(layout), 0
    with SafetensorsWriter(path, layout, metadata={"format": "pt", "duplex": "random weights"}) as out:
        for key, dtype, shape in layout:
            if dtype.is_floating_point:
                tensor = torch.empty(shape, dtype=torch.float32)
                fill(key, tensor, generator)
                tensor = tensor.to(dtype)
            else:
                tensor = torch.zeros(shape, dtype=dtype)
            out.write(key, tensor)
            done += tensor.numel() * dtype.itemsize
            del tensor
            if progress:
                progress(done, total)
    return total
