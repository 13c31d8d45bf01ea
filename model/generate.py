"""Streaming generation: one frame per step for a batch of independent conversations.

Each step takes the user's audio tokens of one frame, runs the temporal transformer once and the
depth transformer ``dep_q`` times, and returns the text token and the model's audio tokens of one
frame, re-aligned across the acoustic delays.

Token ring (``LMGenState.cache [B, 1 + n_q, max_delay + 2]``): stream k's token for time t sits
at ring index ``(t + 1 + delays[k]) % capacity``, the step at which the temporal transformer
reads it. User tokens are written ``delays[k]`` steps ahead, generated tokens one step ahead,
and a slot reads ``initial`` tokens while its clock is ``<= delays[k]`` (the same alignment as
``LMModel.forward``), so stale ring entries of a restarted slot are never read.

``step(codes, state, ready)`` advances only the slots where ``ready`` [B] is True: the others keep
their token ring, clock (hence their noise) and transformer states exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lm import LMModel
from .sampling import DrawPlan, SlotSampling, StreamSampling, gumbel_noise, mix32, sample_tokens, slot_keys
from .transformer import TransformerState, check_ready

DEFAULT_UNLIMITED_STEPS = 3000  # attention window (cache length) when the LM's context is None
NO_TOKEN = -1  # what a slot returns while it is not yet valid


@dataclass
class _Constants:
    """Per-device constants of a state: delays [K], initial tokens [K], hashed ranks [V], streams [K]."""

    delays: torch.Tensor
    initial: torch.Tensor
    rank_hashes: torch.Tensor
    streams: torch.Tensor  # 0 = text, 1 + k = model codebook k (the RNG's stream numbers)


class LMGenState:
    """Preallocated streaming state of LMGen for ``batch_size`` slots (one clock per slot)."""

    def __init__(self, batch_size: int, offsets: torch.Tensor, cache: torch.Tensor, temporal: TransformerState,
                 depth: TransformerState, sampling: SlotSampling, constants: _Constants) -> None:
        self.batch_size = batch_size
        self.offsets = offsets  # [B] steps since each slot's (re)start
        self.cache = cache  # [B, 1 + n_q, capacity] token ring
        self.temporal = temporal
        self.depth = depth
        self.sampling = sampling
        self.constants = constants

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor holding per-slot streaming state (batch first); sampling settings apart."""
        return [self.offsets, self.cache, *self.temporal.slot_tensors(), *self.depth.slot_tensors()]

    def prefix(self, rows: int) -> "LMGenState":
        """A view of the first ``rows`` slots sharing this state's memory (no copy), for a cheaper step.

        The view shares the full batch's sampling settings (see ``draw_plan`` and ``seeds``)."""
        if not 1 <= rows <= self.batch_size:
            raise ValueError(f"prefix rows must be in 1..{self.batch_size}, got {rows}")
        return LMGenState(rows, self.offsets[:rows], self.cache[:rows], self.temporal.prefix(rows),
                          self.depth.prefix(rows), self.sampling, self.constants)

    def draw_plan(self, stream: StreamSampling, vocab: int) -> DrawPlan | None:
        """The sampling plan of a stream kind for this state's slots (None: all greedy)."""
        plan = self.sampling.plan(stream, vocab)
        return None if plan is None else plan.rows(self.batch_size)

    def seeds(self, seeds: torch.Tensor) -> torch.Tensor:
        """The rows of a [full batch] seed tensor that belong to this state's slots."""
        return seeds[:self.batch_size]

    def move_slot(self, src: int, dst: int) -> None:
        """Give slot ``dst`` a copy of slot ``src``'s whole state, sampling settings included."""
        for tensor in self.slot_tensors():
            tensor[dst] = tensor[src]
        self.sampling.move_slot(src, dst)

    @torch.inference_mode()
    def reset(self, mask: torch.Tensor) -> None:
        """Restart the slots where mask [B] (bool) is True; the others are untouched. No host sync."""
        if mask.shape != (self.batch_size,) or mask.dtype != torch.bool:
            raise ValueError(f"reset mask must be bool [{self.batch_size}], got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(self.device)
        self.offsets.masked_fill_(mask, 0)
        self.temporal.reset(mask)

    @torch.inference_mode()
    def set_slot_sampling(self, slot: int, *, use_sampling: bool | None = None, temp: float | None = None,
                          temp_text: float | None = None, top_k: int | None = None,
                          top_k_text: int | None = None, seed: int | None = None,
                          text_seed: int | None = None, audio_seed: int | None = None) -> None:
        """Change the sampling settings of one slot (None keeps the current value).

        ``text_seed`` selects the random stream of the slot's text tokens, ``audio_seed`` that of
        its audio tokens (``seed`` sets both; a specific one wins over it). With the same seeds and
        inputs, a slot produces the same tokens whatever its batch neighbours do (and after a
        reset, the same again); changing one seed never changes the other stream's noise.
        """
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot must be in 0..{self.batch_size - 1}, got {slot}")
        self.sampling.set_slot(slot, use_sampling=use_sampling, temp=temp, temp_text=temp_text, top_k=top_k,
                               top_k_text=top_k_text, seed=seed, text_seed=text_seed, audio_seed=audio_seed)


class LMGen:
    """Frame-by-frame generation with an LMModel; sampling defaults apply to every new slot."""

    def __init__(self, lm: LMModel, use_sampling: bool = True, temp: float = 0.8, temp_text: float = 0.7,
                 top_k: int = 250, top_k_text: int = 25) -> None:
        self.lm = lm
        config = lm.config
        self.dep_q = config.dep_q
        self.num_user_codebooks = config.num_user_codebooks
        self.max_delay = config.max_delay
        self.sampling_defaults = dict(use_sampling=use_sampling, temp=temp, temp_text=temp_text, top_k=top_k,
                                      top_k_text=top_k_text)
        # Validate the defaults once (same checks as per-slot settings).
        SlotSampling.create(1, "cpu", **self.sampling_defaults).set_slot(0, **self.sampling_defaults)

    @torch.inference_mode()
    def init_state(self, batch_size: int, max_steps: int | None = None) -> LMGenState:
        """A fresh state for ``batch_size`` slots.

        ``max_steps`` matters only when the LM's context is None: streams are exact up to that many
        steps and go on forever as a sliding window of that size (default 3000 = 4 min).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lm, config = self.lm, self.lm.config
        device = lm.device
        if config.context is None:
            max_steps = max_steps or DEFAULT_UNLIMITED_STEPS
        temporal = lm.transformer.init_state(batch_size, max_steps=max_steps)
        depth = lm.depformer.init_state(batch_size, max_steps=config.dep_q)
        capacity = self.max_delay + 2
        cache = torch.full((batch_size, config.num_codebooks, capacity), NO_TOKEN, dtype=torch.long, device=device)
        vocab = max(config.card, config.text_out_card)
        constants = _Constants(
            delays=torch.tensor(config.delays, dtype=torch.long, device=device),
            initial=lm.initial_tokens(device),
            rank_hashes=mix32(torch.arange(vocab, dtype=torch.long, device=device)),
            streams=torch.arange(1 + config.dep_q, dtype=torch.long, device=device))
        sampling = SlotSampling.create(batch_size, device, **self.sampling_defaults)
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        return LMGenState(batch_size, offsets, cache, temporal, depth, sampling, constants)

    def draw_plans(self, state: LMGenState) -> tuple[DrawPlan | None, DrawPlan | None]:
        """The (text, audio) sampling plans the next step will use, built now (they are cached)."""
        config = self.lm.config
        return (state.sampling.plan(state.sampling.text, config.text_out_card),
                state.sampling.plan(state.sampling.audio, config.card))

    def step(self, user_codes: torch.Tensor, state: LMGenState, ready: torch.Tensor | None = None,
             validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """user_codes [B, n_q - dep_q, 1] -> tokens [B, 1 + dep_q, 1], valid [B] (bool).

        tokens: the text token, then the model's dep_q audio tokens of one frame (re-aligned
        across the delays); a slot's tokens are valid from its step ``max_delay`` on (-1 before).
        ``ready`` [B] bool (None = all): only those slots step; the others keep their whole state
        and return -1 (valid False). ``validate``: the range check of CPU codes (it needs the
        values on the host; None = on CPU only, False = never).
        """
        if torch.is_inference_mode_enabled():
            return self._step(user_codes, state, ready, validate)
        with torch.inference_mode():
            tokens, valid = self._step(user_codes, state, ready, validate)
        return tokens.clone(), valid.clone()  # ordinary tensors for callers outside inference mode

    def _step(self, user_codes: torch.Tensor, state: LMGenState, ready: torch.Tensor | None,
              validate: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, text_token = self.temporal_step(user_codes, state, ready, validate)
        audio_tokens = self.depth_step(hidden, text_token, state, ready)
        return self.finish_step(text_token, audio_tokens, state, ready)

    # The three phases of a step, public so that benchmarks can time them separately.
    def temporal_step(self, user_codes: torch.Tensor, state: LMGenState, ready: torch.Tensor | None = None,
                      validate: bool | None = None):
        """Feed one frame to the temporal transformer and sample the text token.

        Returns hidden [B, 1, dim], text_token [B]; the text noise is keyed by the slots' text seeds.
        """
        user_codes = self._check_user_codes(user_codes, state, validate)
        check_ready(ready, state.batch_size)
        consts, cache, offsets = state.constants, state.cache, state.offsets
        batch, streams, capacity = cache.shape
        first_user = 1 + self.dep_q
        ahead = (offsets[:, None] + consts.delays[None, first_user:]) % capacity  # [B, Ku]
        _write_tokens(cache[:, first_user:], ahead[:, :, None], user_codes, ready)
        now = (offsets % capacity)[:, None, None].expand(batch, streams, 1)  # [B, K, 1]
        tokens = cache.gather(2, now)  # [B, K, 1]
        starting = offsets[:, None] <= consts.delays[None, :]  # [B, K]
        tokens = torch.where(starting[:, :, None], consts.initial[None, :, None], tokens)
        hidden, text_logits = self.lm.temporal(tokens, state.temporal, ready)  # [B, 1, D], [B, 1, 1, Vt]
        plan = state.draw_plan(state.sampling.text, text_logits.shape[-1])
        noise = None
        if plan is not None:
            text_keys = slot_keys(state.seeds(state.sampling.text_seed), offsets)  # [B]
            noise = gumbel_noise(text_keys, consts.streams[:1], consts.rank_hashes[:plan.candidates])[:, 0]
        text_token = sample_tokens(text_logits[:, 0, 0], plan, noise)
        return hidden, text_token

    def depth_step(self, hidden: torch.Tensor, text_token: torch.Tensor, state: LMGenState,
                   ready: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the dep_q audio tokens of the frame, one after the other: -> [B, dep_q].

        The audio noise is keyed by the slots' audio seeds (and clocks, not yet advanced).
        """
        lm, config, consts = self.lm, self.lm.config, state.constants
        if ready is None:
            state.depth.reset_all()
        else:  # slots not ready keep even this per-frame scratch state
            state.depth.reset(ready)
            state.depth.steps_since_full_reset = 0
        plan = state.draw_plan(state.sampling.audio, config.card)
        noise = None  # [B, dep_q, N]: all the codebooks' noise at once
        if plan is not None:
            audio_keys = slot_keys(state.seeds(state.sampling.audio_seed), state.offsets)  # [B]
            noise = gumbel_noise(audio_keys, consts.streams[1:], consts.rank_hashes[:plan.candidates])
        projections: dict[int, torch.Tensor] = {}
        previous = text_token[:, None]  # [B, 1]
        tokens = []
        for k in range(self.dep_q):
            index = config.depformer_input_index(k)
            if index not in projections:
                projections[index] = lm.depformer_projection(k, hidden)  # [B, 1, Dd]
            depth_in = lm.depformer_input(k, hidden, previous, projection=projections[index],
                                          known_tokens=True)  # [B, 1, Dd]
            logits = lm.linears[k](lm.depformer(depth_in, state.depth, ready))  # [B, 1, card]
            token = sample_tokens(logits[:, 0], plan, None if noise is None else noise[:, k])
            tokens.append(token)
            previous = token[:, None]
        return torch.stack(tokens, dim=1)

    def finish_step(self, text_token: torch.Tensor, audio_tokens: torch.Tensor, state: LMGenState,
                    ready: torch.Tensor | None = None):
        """Store the frame's tokens, read back the re-aligned output frame and advance the clocks."""
        consts, cache, offsets = state.constants, state.cache, state.offsets
        batch, _, capacity = cache.shape
        generated = 1 + self.dep_q
        frame = torch.cat([text_token[:, None], audio_tokens], dim=1)[:, :, None]  # [B, 1 + dep_q, 1]
        next_index = ((offsets + 1) % capacity)[:, None, None].expand(batch, generated, 1)
        ring = cache[:, :generated]
        _write_tokens(ring, next_index, frame, ready)
        back = offsets[:, None] + 1 - self.max_delay + consts.delays[None, :generated]  # [B, 1 + dep_q]
        tokens = ring.gather(2, (back % capacity)[:, :, None])  # [B, 1 + dep_q, 1]
        valid = offsets >= self.max_delay  # [B]
        if ready is not None:
            valid = valid & ready
        tokens = tokens.masked_fill(~valid[:, None, None], NO_TOKEN)
        offsets.add_(1 if ready is None else ready.long())
        return tokens, valid

    def _check_user_codes(self, user_codes: torch.Tensor, state: LMGenState,
                          validate: bool | None = None) -> torch.Tensor:
        expected = (state.batch_size, self.num_user_codebooks, 1)
        if tuple(user_codes.shape) != expected:
            raise ValueError(f"user_codes must be {list(expected)} (batch, user codebooks, 1 frame), "
                             f"got {list(user_codes.shape)}")
        if user_codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"user_codes must be integer token ids, got {user_codes.dtype}")
        user_codes = user_codes.to(device=state.device, dtype=torch.long)
        if validate is None:
            validate = user_codes.device.type == "cpu"  # a range check costs a host sync elsewhere
        if validate:
            low, high = int(user_codes.min()), int(user_codes.max())
            if low < -1 or high > self.lm.config.card:
                raise ValueError(f"user_codes must be audio tokens in 0..{self.lm.config.card - 1} "
                                 f"(-1 = no input), got values in {low}..{high}")
        return user_codes


def _write_tokens(ring: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor, ready: torch.Tensor | None) -> None:
    """ring [B, K, C] <- tokens [B, K, 1] at index [B, K, 1]; rows not ready keep their entries."""
    if ready is not None:
        tokens = torch.where(ready[:, None, None], tokens, ring.gather(2, index))
    ring.scatter_(2, index, tokens)
