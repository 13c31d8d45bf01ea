"""Token embeddings of the LM: id -1 means "no input" and embeds to zeros; optional low rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZERO_TOKEN_ID = -1  # "no input at this position": contributes a zero vector


class TokenEmbedding(nn.Module):
    """Embedding table ``weight`` [num, rank or dim]; with ``low_rank`` a linear map up to ``dim``.

    Keys: ``weight`` and, for low-rank tables, ``low_rank.weight`` [dim, rank].
    """

    def __init__(self, num_embeddings: int, dim: int, low_rank: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        width = dim if low_rank is None else low_rank
        self.weight = nn.Parameter(torch.randn(num_embeddings, width, device=device, dtype=dtype))
        self.low_rank = None
        if low_rank is not None:
            self.low_rank = nn.Linear(low_rank, dim, bias=False, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (int64, -1 = zero vector) -> [..., dim]."""
        vectors = F.embedding(ids.clamp(min=0), self.weight)  # [..., width]
        vectors = vectors.masked_fill((ids == ZERO_TOKEN_ID)[..., None], 0.0)
        if self.low_rank is not None:
            vectors = self.low_rank(vectors)
        return vectors

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Like forward for ids known to be >= 0 (the generation hot path): ids [...] -> [..., dim]."""
        vectors = F.embedding(ids, self.weight)
        if self.low_rank is not None:
            vectors = self.low_rank(vectors)
        return vectors
