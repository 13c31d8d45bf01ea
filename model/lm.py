"""The Moshi-style LM: stream embeddings, temporal transformer, text head, depth transformer.

Module names are the checkpoint's key names (``emb.{k}``, ``text_emb``, ``transformer``,
``out_norm``, ``text_linear``, ``depformer_in.{j}``, ``depformer_emb.{k}``,
``depformer_text_emb``, ``depformer``, ``linears.{k}``), so Kyutai's safetensors load unchanged.

Stream layout of ``codes [B, 1 + n_q, T]``: row 0 text, rows 1..dep_q the model's audio
codebooks, the remaining rows the user's. Stream k at time t enters the temporal transformer at
step t + 1 + delays[k] (everything is shifted by one initial step of special "initial" tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import LMConfig
from .embeddings import ZERO_TOKEN_ID, TokenEmbedding
from .transformer import StreamingTransformer, TransformerState, make_norm


@dataclass
class LMOutput:
    """Training / scoring outputs, aligned with the input codes (position t predicts codes[..., t]).

    logits [B, dep_q, T, card], mask [B, dep_q, T], text_logits [B, 1, T, text_card(+1)],
    text_mask [B, 1, T]; masked-out positions hold NaN.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    text_logits: torch.Tensor
    text_mask: torch.Tensor


def delay_codes(codes: torch.Tensor, delays: list[int] | tuple[int, ...], initial: torch.Tensor) -> torch.Tensor:
    """Shift stream k right by delays[k], filling with initial[k]: codes [B, K, T] -> [B, K, T]."""
    steps = codes.shape[-1]
    rows = []
    for k, delay in enumerate(delays):
        row = codes[:, k]  # [B, T]
        if delay > 0:
            head = initial[k].expand(row.shape[0], min(delay, steps))
            row = torch.cat([head, row[:, :max(steps - delay, 0)]], dim=1)
        rows.append(row)
    return torch.stack(rows, dim=1)


def undelay_outputs(values: torch.Tensor, delays: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift stream k left by delays[k]: values [B, K, T, V] -> (same shape with NaN tails, mask [B, K, T])."""
    batch, streams, steps = values.shape[:3]
    rows = []
    mask = torch.ones(batch, streams, steps, dtype=torch.bool, device=values.device)
    for k, delay in enumerate(delays):
        row = values[:, k]  # [B, T, V]
        if delay > 0:
            tail = torch.full_like(row[:, :min(delay, steps)], float("nan"))
            row = torch.cat([row[:, delay:], tail], dim=1)
            mask[:, k, max(steps - delay, 0):] = False
        rows.append(row)
    return torch.stack(rows, dim=1), mask


class LMModel(nn.Module):
    """Moshi's LM over text + n_q audio streams; ``forward(codes)`` is the teacher-forced pass."""

    def __init__(self, config: LMConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        c = config
        factory = {"device": device, "dtype": dtype}
        self.emb = nn.ModuleList(TokenEmbedding(c.card + 1, c.dim, **factory) for _ in range(c.n_q))
        self.text_emb = TokenEmbedding(c.text_card + 1, c.dim, **factory)
        self.transformer = StreamingTransformer(c.temporal_config(), **factory)
        self.out_norm = make_norm(c.norm, c.dim, **factory)
        self.text_linear = nn.Linear(c.dim, c.text_out_card, bias=False, **factory)
        self.depformer_in = nn.ModuleList(
            nn.Linear(c.dim, c.depformer_dim, bias=False, **factory) for _ in range(c.num_depformer_inputs))
        low_rank = c.depformer_low_rank_embeddings
        # The last model codebook is never an input of the depth transformer: dep_q - 1 tables.
        self.depformer_emb = nn.ModuleList(
            TokenEmbedding(c.card + 1, c.depformer_dim, low_rank, **factory) for _ in range(c.dep_q - 1))
        self.depformer_text_emb = TokenEmbedding(c.text_card + 1, c.depformer_dim, low_rank, **factory)
        self.depformer = StreamingTransformer(c.depformer_config(), **factory)
        self.linears = nn.ModuleList(
            nn.Linear(c.depformer_dim, c.card, bias=False, **factory) for _ in range(c.dep_q))

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, weights: str | Path | Mapping[str, torch.Tensor],
                        config: LMConfig | Mapping[str, Any] | str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> "LMModel":
        """Load a Kyutai LM checkpoint strictly (``duplex.model.loading.load_lm``).

        ``weights``: a safetensors path in the published (fused) or per-step spelling, or a state
        dict. ``config``: an ``LMConfig``, a Kyutai config dict, a path to a ``config.json``, or
        None (``config.json`` next to the weights, else the Moshi 7B preset).
        Rules shared with ``Mimi.from_pretrained``: keys and shapes are checked from the file's
        header before any tensor is read; floating tensors are cast to ``dtype`` (never rejected
        for their file dtype), integer ones keep theirs; each tensor is read once, straight to
        ``device``, and becomes the model's parameter (the weights are never held twice).
        """
        from .loading import load_lm

        return load_lm(weights, config=config, device=device, dtype=dtype)

    # ----------------------------------------------------------------- building blocks
    @property
    def device(self) -> torch.device:
        return self.text_linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_linear.weight.dtype

    def initial_tokens(self, device=None) -> torch.Tensor:
        """The token fed before a stream starts, per stream: [1 + n_q] (text_card, then card)."""
        tokens = torch.full((self.config.num_codebooks,), self.config.card, dtype=torch.long, device=device)
        tokens[0] = self.config.text_card
        return tokens

    def embed_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the stream embeddings: tokens [B, 1 + n_q, T] -> [B, T, dim]."""
        total = self.emb[0](tokens[:, 1])
        for k in range(1, self.config.n_q):
            total = total + self.emb[k](tokens[:, 1 + k])
        return total + self.text_emb(tokens[:, 0])

    def temporal(self, tokens: torch.Tensor, state: TransformerState | None = None,
                 ready: torch.Tensor | None = None):
        """tokens [B, 1 + n_q, T] -> hidden [B, T, dim] (after out_norm), text logits [B, 1, T, Vt].

        ``ready`` [B] bool: only those slots advance the state (see StreamingTransformer.forward)."""
        hidden = self.out_norm(self.transformer(self.embed_frames(tokens), state, ready))
        return hidden, self.text_linear(hidden)[:, None]

    def depformer_projection(self, codebook: int, hidden: torch.Tensor) -> torch.Tensor:
        """The temporal context of model codebook ``codebook``: hidden [B, T, dim] -> [B, T, depformer_dim].

        Codebooks that share a ``depformer_in`` projection (see ``config.depformer_input_index``)
        share this value, so generation computes it once per projection.
        """
        return self.depformer_in[self.config.depformer_input_index(codebook)](hidden)

    def depformer_input(self, codebook: int, hidden: torch.Tensor, previous: torch.Tensor,
                        projection: torch.Tensor | None = None, known_tokens: bool = False) -> torch.Tensor:
        """Input of the depth transformer for model codebook ``codebook``.

        hidden [B, T, dim], previous [B, T] (the text token for codebook 0, else audio codebook - 1)
        -> [B, T, depformer_dim]. ``projection``: ``depformer_projection(codebook, hidden)`` when
        already computed; ``known_tokens``: previous holds no -1 ("no input"), which skips masking.
        """
        if projection is None:
            projection = self.depformer_projection(codebook, hidden)
        table = self.depformer_text_emb if codebook == 0 else self.depformer_emb[codebook - 1]
        return projection + (table.lookup(previous) if known_tokens else table(previous))

    # ----------------------------------------------------------------- teacher-forced pass
    def forward(self, codes: torch.Tensor) -> LMOutput:
        """codes [B, 1 + n_q, T] (int64; -1 = no token) -> LMOutput aligned with codes."""
        self._check_codes(codes)
        codes = codes.long()
        c = self.config
        batch, streams, _ = codes.shape
        initial = self.initial_tokens(codes.device)[None, :, None].expand(batch, streams, 1)  # [B, K, 1]
        delayed = delay_codes(codes, c.delays, initial[0, :, 0])  # [B, K, T]
        inputs = torch.cat([initial, delayed[:, :, :-1]], dim=2)  # [B, K, T]
        hidden, text_logits = self.temporal(inputs)
        logits = self._depth_teacher_forced(hidden, delayed)  # [B, dep_q, T, card]
        logits, mask = undelay_outputs(logits, c.delays[1:1 + c.dep_q])
        mask &= codes[:, 1:1 + c.dep_q] != ZERO_TOKEN_ID
        text_logits, text_mask = undelay_outputs(text_logits, c.delays[:1])
        text_mask &= codes[:, :1] != ZERO_TOKEN_ID
        return LMOutput(logits=logits, mask=mask, text_logits=text_logits, text_mask=text_mask)

    def _depth_teacher_forced(self, hidden: torch.Tensor, delayed: torch.Tensor) -> torch.Tensor:
        """All model codebooks at once: hidden [B, T, dim], delayed [B, K, T] -> [B, dep_q, T, card]."""
        batch, steps, _ = hidden.shape
        dep_q = self.config.dep_q
        inputs = [self.depformer_input(k, hidden, delayed[:, k]) for k in range(dep_q)]  # dep_q x [B, T, Dd]
        depth_in = torch.stack(inputs, dim=2).reshape(batch * steps, dep_q, -1)  # [B*T, dep_q, Dd]
        depth_out = self.depformer(depth_in)  # [B*T, dep_q, Dd]
        logits = [self.linears[k](depth_out[:, k]).view(batch, steps, -1) for k in range(dep_q)]
        return torch.stack(logits, dim=1)

    def _check_codes(self, codes: torch.Tensor) -> None:
        expected = self.config.num_codebooks
        if codes.dim() != 3 or codes.shape[1] != expected:
            raise ValueError(f"codes must be [B, {expected}, T] (text + {self.config.n_q} audio streams), "
                             f"got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be integer token ids, got {codes.dtype}")
