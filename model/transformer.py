"""The streaming transformer shared by Mimi and the Moshi LM.

One code path serves offline and streaming use: ``forward(x)`` without a state builds a
fresh one sized for the input, so the two can never disagree.

Key/value cache: a ring buffer per layer ``[B, H, capacity, Dh]`` plus one shared
``positions`` buffer ``[B, capacity]`` that records which time step each ring entry holds
(-1 = empty). A query at position ``p`` attends to the keys whose position ``k`` satisfies
``0 <= p - k < context``; that single rule (``attention_mask``) is used for every call.
With chunks of ``chunk_size`` steps the ring needs ``context + chunk_size - 1`` entries, or
the first query of a chunk would lose its oldest key.

Every batch slot has its own clock (``offsets``), so slots can join and leave a batch at
any time: ``reset(mask)`` zeroes the chosen clocks and empties their cache rows, on the
device, without a host synchronisation. ``forward(x, state, ready)`` advances only the slots
where ``ready`` [B] is True; the others keep every tensor of their state as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .transformer_parts import (  # noqa: F401 - re-exported
    LayerScale, RMSNorm, apply_rope, make_norm, rope_rotation, sin_embedding)

NORMS = ("layer_norm", "rms_norm", "rms_norm_f32")
GATINGS = ("none", "silu", "gelu")
POSITIONAL_EMBEDDINGS = ("rope", "sin", "none")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a stack of pre-norm transformer layers."""

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int | None = None
    causal: bool = True
    norm: str = "layer_norm"
    gating: str = "none"
    positional_embedding: str = "rope"
    max_period: float = 10000.0
    layer_scale: float | None = None
    weights_per_step: int = 0
    weights_per_step_schedule: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if not self.causal:
            raise ValueError("non-causal transformers are not supported: duplex only streams")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("gating", self.gating, GATINGS),
            ("positional_embedding", self.positional_embedding, POSITIONAL_EMBEDDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"unsupported {name} {value!r}; expected one of {allowed}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be positive or None, got {self.context}")
        if self.weights_per_step and self.gating == "none":
            raise ValueError("weights_per_step needs a gated feed-forward (gating silu or gelu)")
        if self.weights_per_step_schedule is not None:
            if not self.weights_per_step:
                raise ValueError("weights_per_step_schedule needs weights_per_step")
            if len(self.weights_per_step_schedule) != self.weights_per_step:
                raise ValueError("weights_per_step_schedule must have weights_per_step entries")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_weight_sets(self) -> int:
        """How many copies of the per-step weights the layers hold (1 when shared)."""
        if not self.weights_per_step:
            return 1
        if self.weights_per_step_schedule is not None:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    def weight_set(self, step: int) -> int:
        """Index of the weight set used at ``step`` (0 when weights are shared)."""
        if not self.weights_per_step:
            return 0
        if step >= self.weights_per_step:
            raise ValueError(f"step {step} is past weights_per_step={self.weights_per_step}")
        if self.weights_per_step_schedule is not None:
            return self.weights_per_step_schedule[step]
        return step


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query may see: q_pos [B, T], k_pos [B, C] (-1 = empty) -> [B, 1, T, C]."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, C]
    visible = (k_pos >= 0)[:, None, :] & (delta >= 0) & (delta < window)
    return visible[:, None]


class TransformerState:
    """Streaming state of a StreamingTransformer for a batch of independent slots.

    offsets [B]: each slot's clock (steps seen since its reset).
    window: how many past steps (the current one included) a query sees: the model's context,
    or ``max_steps`` for an unlimited-context model, which then streams as a sliding window.
    positions [B, C]: time step held by each ring entry (-1 = empty), C = window + chunk_size - 1.
    keys / values: per layer [B, H, C, Dh].
    steps_since_full_reset: host-side count of steps since ``reset_all`` (every slot's clock
    is at most this); it selects per-step weights for a lockstep depth transformer.
    """

    def __init__(self, config: TransformerConfig, batch_size: int, chunk_size: int, window: int,
                 device, dtype) -> None:
        capacity = window + chunk_size - 1
        shape = (batch_size, config.num_heads, capacity, config.head_dim)
        self.window = window
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.capacity = capacity
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.chunk_arange = torch.arange(chunk_size, dtype=torch.long, device=device)
        self.batch_rows = torch.arange(batch_size, dtype=torch.long, device=device)[:, None]
        self.steps_since_full_reset = 0

    def reset(self, mask: torch.Tensor) -> None:
        """Restart the slots where mask [B] is True; the others are untouched."""
        if mask.shape != (self.batch_size,) or mask.dtype != torch.bool:
            raise ValueError(f"reset mask must be bool [{self.batch_size}], got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(self.offsets.device)
        self.offsets.masked_fill_(mask, 0)
        self.positions.masked_fill_(mask[:, None], -1)
        # Empty entries are masked out, but a NaN left by the previous occupant would still leak
        # through the attention product (0 * NaN): clear the reset rows.
        rows = mask[:, None, None, None]  # [B, 1, 1, 1]
        for keys, values in zip(self.keys, self.values):
            keys.masked_fill_(rows, 0.0)
            values.masked_fill_(rows, 0.0)

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor holding per-slot state (batch first): what moving a slot copies."""
        return [self.offsets, self.positions, *self.keys, *self.values]

    def prefix(self, rows: int) -> "TransformerState":
        """A view of the first ``rows`` slots sharing this state's memory (no copy)."""
        view = object.__new__(TransformerState)
        view.__dict__.update(self.__dict__)
        view.batch_size = rows
        view.offsets = self.offsets[:rows]
        view.positions = self.positions[:rows]
        view.keys = [keys[:rows] for keys in self.keys]
        view.values = [values[:rows] for values in self.values]
        view.batch_rows = self.batch_rows[:rows]
        return view

    def reset_all(self) -> None:
        """Restart every slot (and the lockstep step counter)."""
        self.offsets.zero_()
        self.positions.fill_(-1)
        for keys, values in zip(self.keys, self.values):
            keys.zero_()
            values.zero_()
        self.steps_since_full_reset = 0


@dataclass
class _StepContext:
    """What every layer of one forward call shares: where to write, what to see, how to rotate."""

    positions: torch.Tensor  # [B, T] time step of each new entry
    batch_rows: torch.Tensor  # [B, 1] slot index of each row
    write_index: torch.Tensor  # [B, T] ring indices of the new steps
    mask: torch.Tensor  # [B, 1, T, C]
    rope: tuple[torch.Tensor, torch.Tensor] | None
    first_step: int  # host-side step index of x[:, 0] (for per-step weights)
    ready: torch.Tensor | None  # [B] bool: slots whose cache this call writes (None = all)


def _per_step_linear(x: torch.Tensor, linears: nn.ModuleList, config: TransformerConfig, first_step: int):
    """Apply linears[weight_set(step)] to each time step of x [B, T, D]."""
    if len(linears) == 1:
        return linears[0](x)
    outputs = [linears[config.weight_set(first_step + t)](x[:, t:t + 1]) for t in range(x.shape[1])]
    return torch.cat(outputs, dim=1)


def _write_ring(ring: torch.Tensor, where, new: torch.Tensor, ready: torch.Tensor | None) -> None:
    """Store new [B, H, T, Dh] at the ring [B, H, C, Dh] entries ``where``; rows not ready keep theirs."""
    rows = ring.transpose(1, 2)  # [B, C, H, Dh] view
    new = new.transpose(1, 2)  # [B, T, H, Dh]
    if ready is not None:
        new = torch.where(ready[:, None, None, None], new, rows[where])
    rows.index_put_(where, new)


class StreamingAttention(nn.Module):
    """Multi-head causal self-attention over a ring key/value cache (keys in_projs / out_projs)."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        dim, sets = config.d_model, config.num_weight_sets
        self.in_projs = nn.ModuleList(
            nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype) for _ in range(sets))
        self.out_projs = nn.ModuleList(
            nn.Linear(dim, dim, bias=False, device=device, dtype=dtype) for _ in range(sets))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Accept the published, fused spelling too: ``in_proj_weight`` [sets*3D, D], ``out_proj.weight``.

        The fused tensor is split into row views (no copy); see ``duplex.model.spelling``.
        """
        dim = self.config.d_model
        for fused, kind, rows in ((prefix + "in_proj_weight", "in_projs", 3 * dim),
                                  (prefix + "out_proj.weight", "out_projs", dim)):
            if fused in state_dict:
                for index, piece in enumerate(torch.split(state_dict.pop(fused), rows, dim=0)):
                    state_dict[f"{prefix}{kind}.{index}.weight"] = piece
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, ctx: _StepContext, keys: torch.Tensor, values: torch.Tensor):
        batch, steps, _ = x.shape
        qkv = _per_step_linear(x, self.in_projs, self.config, ctx.first_step)  # [B, T, 3D]
        qkv = qkv.view(batch, steps, 3, self.config.num_heads, self.config.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        if ctx.rope is not None:  # rotate queries and keys in one go
            q, k = apply_rope(qkv[:2], *ctx.rope).unbind(0)
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)  # 3 x [B, H, T, Dh]
        # Write through a [B, C, H, Dh] view: index_put_ touches only the new rows (scatter_ on
        # CPU bfloat16 copies the whole ring).
        where = (ctx.batch_rows, ctx.write_index)  # [B, 1], [B, T]
        _write_ring(keys, where, k, ctx.ready)
        _write_ring(values, where, v, ctx.ready)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask)  # [B, H, T, Dh]
        out = out.transpose(1, 2).reshape(batch, steps, self.config.d_model)
        return _per_step_linear(out, self.out_projs, self.config, ctx.first_step)


class GatedFeedForward(nn.Module):
    """act(linear_in(x)[:H]) * linear_in(x)[H:] -> linear_out, with H = 2 * dim_feedforward // 3."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str, device=None, dtype=None) -> None:
        super().__init__()
        hidden = 2 * dim_feedforward // 3
        self.activation = F.silu if activation == "silu" else F.gelu
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.linear_out = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.linear_in(x).unflatten(-1, (2, -1)).unbind(-2)  # 2 x [B, T, H]
        return self.linear_out(self.activation(gate) * value)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + ls1(attn(norm1(x))), then x + ls2(ff(norm2(x)))."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        dim = config.d_model
        self.self_attn = StreamingAttention(config, device=device, dtype=dtype)
        self.norm1 = make_norm(config.norm, dim, device=device, dtype=dtype)
        self.norm2 = make_norm(config.norm, dim, device=device, dtype=dtype)
        if config.gating == "none":
            self.linear1 = nn.Linear(dim, config.dim_feedforward, bias=False, device=device, dtype=dtype)
            self.linear2 = nn.Linear(config.dim_feedforward, dim, bias=False, device=device, dtype=dtype)
        elif config.weights_per_step:
            self.gating = nn.ModuleList(
                GatedFeedForward(dim, config.dim_feedforward, config.gating, device=device, dtype=dtype)
                for _ in range(config.num_weight_sets))
        else:
            self.gating = GatedFeedForward(dim, config.dim_feedforward, config.gating, device=device, dtype=dtype)
        if config.layer_scale is not None:
            self.layer_scale_1 = LayerScale(dim, config.layer_scale, device=device, dtype=dtype)
            self.layer_scale_2 = LayerScale(dim, config.layer_scale, device=device, dtype=dtype)
        else:
            self.layer_scale_1 = self.layer_scale_2 = nn.Identity()

    def _feed_forward(self, x: torch.Tensor, first_step: int) -> torch.Tensor:
        if self.config.gating == "none":
            return self.linear2(F.gelu(self.linear1(x)))
        if isinstance(self.gating, nn.ModuleList):
            return _per_step_linear(x, self.gating, self.config, first_step)
        return self.gating(x)

    def forward(self, x, ctx: _StepContext, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), ctx, keys, values))
        return x + self.layer_scale_2(self._feed_forward(self.norm2(x), ctx.first_step))


class StreamingTransformer(nn.Module):
    """A stack of TransformerLayers run over [B, T, D] with an explicit TransformerState."""

    def __init__(self, config: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerLayer(config, device=device, dtype=dtype)
                                    for _ in range(config.num_layers))

    def init_state(self, batch_size: int, chunk_size: int = 1, max_steps: int | None = None,
                   device=None, dtype=None) -> TransformerState:
        """A fresh state for ``batch_size`` slots fed ``chunk_size`` steps at most per call.

        With an unlimited context (``context=None``) a query sees the last ``max_steps`` steps:
        exact for streams up to that length, a sliding window of that size beyond it.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        window = self.config.context
        if window is None:
            if max_steps is None or max_steps < 1:
                raise ValueError("an unlimited-context transformer needs max_steps >= 1 for its cache")
            window = max_steps
        param = next(self.parameters())
        return TransformerState(self.config, batch_size, chunk_size, window,
                                device=device or param.device, dtype=dtype or param.dtype)

    def forward(self, x: torch.Tensor, state: TransformerState | None = None,
                ready: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; without a state, runs offline from a fresh one.

        ``ready`` [B] bool (None = every slot): slots not ready keep their state untouched (clock,
        positions, cache) and get meaningless output rows; no host synchronisation either way.
        """
        batch, steps, dim = x.shape
        if state is None:
            state = self.init_state(batch, chunk_size=steps, max_steps=steps, device=x.device, dtype=x.dtype)
        self._check_input(x, state, ready)
        ctx = self._step_context(state, steps, ready)
        if self.config.positional_embedding == "sin":
            x = x + sin_embedding(ctx.positions, dim, self.config.max_period, x.dtype)
        for layer, keys, values in zip(self.layers, state.keys, state.values):
            x = layer(x, ctx, keys, values)
        state.offsets.add_(steps if ready is None else ready.long() * steps)
        state.steps_since_full_reset += steps
        return x

    def _check_input(self, x: torch.Tensor, state: TransformerState, ready: torch.Tensor | None) -> None:
        batch, steps, dim = x.shape
        if dim != self.config.d_model or batch != state.batch_size:
            raise ValueError(f"expected input [{state.batch_size}, T, {self.config.d_model}], got {tuple(x.shape)}")
        if steps > state.chunk_size:
            raise ValueError(f"chunk of {steps} steps exceeds the state's chunk_size {state.chunk_size}")
        check_ready(ready, batch)

    def _step_context(self, state: TransformerState, steps: int, ready: torch.Tensor | None) -> _StepContext:
        positions = state.offsets[:, None] + state.chunk_arange[:steps]  # [B, T]
        write_index = positions % state.capacity
        if ready is None:
            state.positions.scatter_(1, write_index, positions)
            seen = state.positions
        else:
            # Every row attends as if it stepped (so no row is empty); only ready rows keep it.
            seen = state.positions.scatter(1, write_index, positions)  # [B, C]
            torch.where(ready[:, None], seen, state.positions, out=state.positions)
        rope = None
        if self.config.positional_embedding == "rope":
            rope = rope_rotation(positions, self.config.head_dim, self.config.max_period)
        return _StepContext(positions=positions, batch_rows=state.batch_rows, write_index=write_index,
                            mask=attention_mask(positions, seen, state.window),
                            rope=rope, first_step=state.steps_since_full_reset, ready=ready)


def check_ready(ready: torch.Tensor | None, batch: int) -> None:
    """A step's ready mask must be None or a bool tensor [batch] (shape checks only: no host sync)."""
    if ready is None:
        return
    if not isinstance(ready, torch.Tensor) or ready.dtype != torch.bool or tuple(ready.shape) != (batch,):
        shape = tuple(ready.shape) if isinstance(ready, torch.Tensor) else type(ready).__name__
        dtype = getattr(ready, "dtype", None)
        raise ValueError(f"ready must be a bool tensor of shape [{batch}], got {dtype} {shape}")
