"""Helpers shared by the codec tests: loading the tiny fixture and comparing codes up to genuine near-ties."""

from __future__ import annotations

from pathlib import Path

import torch
from duplex.codec import Mimi
from safetensors.torch import load_file


def load_tiny(fixtures_dir: Path, num_codebooks: int = 8) -> Mimi:
    """The `mimi_tiny` fixture model."""
    folder = fixtures_dir / "mimi_tiny"
    return Mimi.from_pretrained(folder / "model.safetensors", config=folder / "config.json", num_codebooks=num_codebooks)


def load_tiny_io(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    """The reference inputs/outputs of `mimi_tiny`."""
    return load_file(str(fixtures_dir / "mimi_tiny" / "io.safetensors"))


def _distance_gap(group, residual: torch.Tensor, index: int, code_a: int, code_b: int) -> float:
    """|dist(residual, c_a) - dist(residual, c_b)| for codebook `index` of an RVQ group."""
    centroids = group.codebooks()[index].centroids
    return abs(float((residual - centroids[code_a]).norm() - (residual - centroids[code_b]).norm()))


def assert_codes_match(mimi: Mimi, latent: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor,
                       max_flip_columns: int = 4, tol: float = 1e-5) -> None:
    """Codes must be equal, except a few columns where the first difference is a genuine near-tie.

    latent [B, D, S] is the unquantized latent that produced `ours` [B, K, S]. In a column where the codes
    differ, the first differing codebook must be one whose two candidates are within `tol` in distance from
    the residual; the codebooks after it in the same group may then differ too (the residual changed).
    """
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    columns = (ours != ref).any(dim=1).nonzero().tolist()  # [[b, t], ...]
    assert len(columns) <= max_flip_columns, f"codes differ in {len(columns)} columns: {columns}"
    quantizer = mimi.quantizer
    for batch, step in columns:
        first = int((ours[batch, :, step] != ref[batch, :, step]).nonzero()[0])
        semantic = quantizer.n_q_semantic
        group, offset = (quantizer.rvq_first, 0) if first < semantic else (quantizer.rvq_rest, semantic)
        x = latent[batch, :, step]  # [D]
        residual = group.input_proj.weight[:, :, 0] @ x
        for index in range(first - offset):
            residual = residual - group.codebooks()[index].centroids[ref[batch, offset + index, step]]
        gap = _distance_gap(group, residual, first - offset, int(ours[batch, first, step]), int(ref[batch, first, step]))
        assert gap <= tol * max(1.0, float(residual.norm())), (
            f"code flip at batch {batch}, codebook {first}, step {step} is not a near-tie (gap {gap:.3g})"
        )
