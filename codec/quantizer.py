"""Split residual vector quantizer: `rvq_first` (semantic codebook) and `rvq_rest` (acoustic codebooks).

Both groups see the same input latent, each through its own 1x1 input projection; within a group every codebook
quantizes the residual left by the previous ones. Centroids are `embedding_sum / max(cluster_usage, 1e-5)`,
derived from the checkpoint buffers after loading (`refresh_centroids`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig

USAGE_EPSILON = 1e-5


class EuclideanCodebook(nn.Module):
    """One codebook: checkpoint buffers plus derived centroids and their squared norms."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_buffer("centroids", torch.zeros(bins, dim), persistent=False)
        self.register_buffer("centroid_sq_norms", torch.zeros(bins), persistent=False)

    def refresh_centroids(self) -> None:
        """Derive the centroids from `embedding_sum` and `cluster_usage` (call after loading weights)."""
        with torch.no_grad():
            usage = self.cluster_usage.float().clamp(min=USAGE_EPSILON)[:, None]  # [bins, 1]
            centroids = self.embedding_sum.float() / usage  # [bins, dim], derived in float32
            self.centroids = centroids.to(self.embedding_sum.dtype)
            self.centroid_sq_norms = centroids.pow(2).sum(dim=-1).to(self.embedding_sum.dtype)  # [bins]

    def encode(self, x: Tensor) -> Tensor:
        """x [N, dim] -> nearest centroid index [N] (Euclidean distance)."""
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
        scores = torch.addmm(self.centroid_sq_norms, x, self.centroids.t(), alpha=-2.0)  # [N, bins]
        return scores.argmin(dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [N] -> centroids [N, dim]."""
        return F.embedding(codes, self.centroids)


class _VectorQuantization(nn.Module):
    """Container for the `vq.layers.{i}._codebook` key path."""

    def __init__(self, dim: int, bins: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_CodebookHolder(dim, bins) for _ in range(num_layers))


class _CodebookHolder(nn.Module):
    """Kyutai's `VectorQuantization` wrapper: holds `_codebook`."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, bins)


class ResidualVectorQuantizer(nn.Module):
    """1x1 in-projection, residual quantization over `num_layers` codebooks, 1x1 out-projection."""

    def __init__(self, config: QuantizerConfig, num_layers: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(config.input_dimension, config.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(config.dimension, config.output_dimension, 1, bias=False)
        self.vq = _VectorQuantization(config.dimension, config.bins, num_layers)

    @property
    def num_layers(self) -> int:
        """Codebooks in this group."""
        return len(self.vq.layers)

    def codebooks(self) -> list[EuclideanCodebook]:
        """The codebooks in quantization order."""
        return [holder._codebook for holder in self.vq.layers]

    def encode(self, latent: Tensor, n_q: int) -> Tensor:
        """latent [B, T, C_in] (channels-last) -> codes [B, n_q, T] (int64)."""
        batch, steps, _ = latent.shape
        weight = self.input_proj.weight[:, :, 0]  # [D, C_in]
        residual = torch.mm(latent.reshape(batch * steps, -1), weight.t())  # [B*T, D]
        codes = latent.new_empty((n_q, batch * steps), dtype=torch.long)
        for index, codebook in enumerate(self.codebooks()[:n_q]):
            codes[index] = codebook.encode(residual)
            if index + 1 < n_q:
                residual.sub_(codebook.decode(codes[index]))
        return codes.view(n_q, batch, steps).transpose(0, 1)  # [B, n_q, T]

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, T] -> latent [B, T, C_out] (sum of centroids through the output projection)."""
        batch, num, steps = codes.shape
        flat = codes.transpose(0, 1).reshape(num, batch * steps)  # [K, B*T]
        total = None
        for index, codebook in enumerate(self.codebooks()[:num]):
            vectors = codebook.decode(flat[index])  # [B*T, D]
            total = vectors if total is None else total.add_(vectors)
        out = torch.mm(total, self.output_proj.weight[:, :, 0].t())  # [B*T, C_out]
        return out.view(batch, steps, -1)


class SplitResidualVectorQuantizer(nn.Module):
    """`rvq_first` (n_q_semantic codebooks) + `rvq_rest` (the others), both fed the same latent."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.n_q_semantic = config.n_q_semantic
        self.total_codebooks = config.n_q
        self.rvq_first = ResidualVectorQuantizer(config, config.n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(config, config.n_q - config.n_q_semantic)

    def refresh_centroids(self) -> None:
        """Derive every codebook's centroids (after loading)."""
        for group in (self.rvq_first, self.rvq_rest):
            for codebook in group.codebooks():
                codebook.refresh_centroids()

    def encode(self, latent: Tensor, n_q: int) -> Tensor:
        """latent [B, T, C] (channels-last) -> codes [B, n_q, T] (int64)."""
        semantic = min(n_q, self.n_q_semantic)
        codes = self.rvq_first.encode(latent, semantic)
        if n_q > semantic:
            codes = torch.cat([codes, self.rvq_rest.encode(latent, n_q - semantic)], dim=1)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, T] -> dequantized latent [B, T, C_out] (channels-last)."""
        latent = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            latent = latent + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return latent
