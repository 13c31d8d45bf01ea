"""Per-slot token sampling: temperature, top-k and a counter-based RNG per batch slot.

Each slot draws its noise from a hash of (its seed, its step clock, the stream, the candidate
rank), computed on the device; restarting a slot restarts its random stream. A slot has two
seeds: ``text_seed`` keys the text stream's noise and ``audio_seed`` the audio codebooks' noise,
so changing one never changes the other stream's noise. So a slot's samples
depend on nothing but its own settings and inputs (never on its batch neighbours), there is no
generator object to keep in sync, and no host synchronisation. Sampling uses the Gumbel-max
trick over the top-k candidates: ``argmax(logits / temp + Gumbel noise)`` is a draw from
``softmax(logits / temp)`` restricted to the top k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27, so products of 32-bit values stay inside int64
_STREAM_MIX = 0x9E3779B1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64 (result in [0, 2**32))."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def slot_keys(seed: torch.Tensor, clock: torch.Tensor) -> torch.Tensor:
    """One hash per slot and step: seed, clock [B] (int64) -> [B]."""
    key = mix32(seed)
    key = mix32(key ^ (seed >> 32))
    return mix32(key ^ clock)


def gumbel_noise(step_keys: torch.Tensor, streams: torch.Tensor, rank_hashes: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise: step_keys [B], streams [S], rank_hashes [N] -> [B, S, N] float32."""
    keys = mix32(step_keys[:, None] ^ (streams[None, :] * _STREAM_MIX))  # [B, S]
    bits = mix32(keys[:, :, None] ^ rank_hashes[None, None, :])  # [B, S, N]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(uniform))


@dataclass
class DrawPlan:
    """What one kind of stream needs each step, derived from the slots' settings (cached)."""

    candidates: int  # top candidates looked at: the largest top-k among sampling slots
    blocked: torch.Tensor  # [B, N] bool: rank >= the slot's top-k
    inv_temp: torch.Tensor  # [B, 1] float32
    sample: torch.Tensor  # [B] bool: the slot samples (else argmax)

    def rows(self, count: int) -> "DrawPlan":
        """The plan of the first ``count`` slots (views; the same plan when it covers them all)."""
        if count == self.sample.shape[0]:
            return self
        return DrawPlan(self.candidates, self.blocked[:count], self.inv_temp[:count], self.sample[:count])


@dataclass
class StreamSampling:
    """Sampling settings of one kind of stream (text or audio), one entry per slot."""

    temp: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = whole vocabulary
    host_top_k: list[int] = field(default_factory=list)  # mirror for the candidate count, no sync
    plan: DrawPlan | None = None  # cache, cleared whenever a setting changes

    def draw_plan(self, use_sampling: torch.Tensor, host_use: list[bool], vocab: int) -> DrawPlan:
        """The cached plan, rebuilt after a settings change."""
        if self.plan is None:
            ks = [k if 0 < k < vocab else vocab for k, use in zip(self.host_top_k, host_use, strict=True) if use]
            count = max(ks, default=1)
            top_k = torch.where((self.top_k > 0) & (self.top_k < vocab), self.top_k, vocab)  # [B]
            ranks = torch.arange(count, device=top_k.device)
            self.plan = DrawPlan(candidates=count, blocked=ranks[None, :] >= top_k[:, None],
                                 inv_temp=(1.0 / self.temp.clamp(min=1e-30))[:, None],
                                 sample=use_sampling & (self.temp > 0))
        return self.plan


@dataclass
class SlotSampling:
    """Per-slot sampling settings and RNG seeds for a batch, on the device, with host mirrors."""

    use_sampling: torch.Tensor  # [B] bool
    text_seed: torch.Tensor  # [B] int64: keys the text stream's noise
    audio_seed: torch.Tensor  # [B] int64: keys the audio codebooks' noise
    text: StreamSampling
    audio: StreamSampling
    host_use_sampling: list[bool]

    @classmethod
    def create(cls, batch_size: int, device, *, use_sampling: bool, temp: float, temp_text: float,
               top_k: int, top_k_text: int) -> "SlotSampling":
        """Every slot with the same settings; slot i is seeded with i (text and audio)."""
        def full(value, dtype):
            return torch.full((batch_size,), value, dtype=dtype, device=device)

        return cls(
            use_sampling=full(use_sampling, torch.bool),
            text_seed=torch.arange(batch_size, dtype=torch.long, device=device),
            audio_seed=torch.arange(batch_size, dtype=torch.long, device=device),
            text=StreamSampling(full(temp_text, torch.float32), full(top_k_text, torch.long),
                                [top_k_text] * batch_size),
            audio=StreamSampling(full(temp, torch.float32), full(top_k, torch.long), [top_k] * batch_size),
            host_use_sampling=[use_sampling] * batch_size,
        )

    def set_slot(self, slot: int, *, use_sampling: bool | None = None, temp: float | None = None,
                 temp_text: float | None = None, top_k: int | None = None, top_k_text: int | None = None,
                 seed: int | None = None, text_seed: int | None = None,
                 audio_seed: int | None = None) -> None:
        """Change one slot's settings (None keeps the current value); ``seed`` sets both seeds.

        ``text_seed`` / ``audio_seed``, when given, override ``seed`` for their stream.
        """
        for name, value in (("temp", temp), ("temp_text", temp_text)):
            if value is not None and (value != value or value < 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("top_k", top_k), ("top_k_text", top_k_text)):
            if value is not None and (int(value) != value or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 (0 = no top-k), got {value}")
        for name, value in (("seed", seed), ("text_seed", text_seed), ("audio_seed", audio_seed)):
            if value is not None and (int(value) != value or not -2**63 <= value < 2**63):
                raise ValueError(f"{name} must be a 64-bit integer, got {value}")
        if use_sampling is not None:
            self.use_sampling[slot] = bool(use_sampling)
            self.host_use_sampling[slot] = bool(use_sampling)
        for stream, new_temp, new_top_k in ((self.audio, temp, top_k), (self.text, temp_text, top_k_text)):
            if new_temp is not None:
                stream.temp[slot] = float(new_temp)
            if new_top_k is not None:
                stream.top_k[slot] = int(new_top_k)
                stream.host_top_k[slot] = int(new_top_k)
            stream.plan = None
        text_seed = seed if text_seed is None else text_seed
        audio_seed = seed if audio_seed is None else audio_seed
        if text_seed is not None:
            self.text_seed[slot] = int(text_seed)
        if audio_seed is not None:
            self.audio_seed[slot] = int(audio_seed)

    def move_slot(self, src: int, dst: int) -> None:
        """Give slot ``dst`` the settings and seeds of slot ``src`` (device tensors and host mirrors)."""
        for tensor in (self.use_sampling, self.text_seed, self.audio_seed):
            tensor[dst] = tensor[src]
        self.host_use_sampling[dst] = self.host_use_sampling[src]
        for stream in (self.text, self.audio):
            stream.temp[dst] = stream.temp[src]
            stream.top_k[dst] = stream.top_k[src]
            stream.host_top_k[dst] = stream.host_top_k[src]
            stream.plan = None

    def any_sampling(self) -> bool:
        """Whether any slot samples (host-side: when False, every token is an argmax)."""
        return any(self.host_use_sampling)

    def plan(self, stream: StreamSampling, vocab: int) -> DrawPlan | None:
        """The draw plan of a stream kind, or None when every slot decodes greedily."""
        if not self.any_sampling():
            return None
        return stream.draw_plan(self.use_sampling, self.host_use_sampling, vocab)


def sample_tokens(logits: torch.Tensor, plan: DrawPlan | None, noise: torch.Tensor | None) -> torch.Tensor:
    """Draw one token per slot: logits [B, V], noise [B, >= N] -> [B] int64.

    Greedy slots (use_sampling False or temperature 0) take the argmax; the others sample from
    softmax(logits / temp) restricted to their top-k candidates, with their own noise.
    """
    greedy = logits.argmax(dim=-1)  # [B]
    if plan is None:
        return greedy
    values, indices = logits.float().topk(plan.candidates, dim=-1)  # [B, N] sorted descending
    scores = torch.addcmul(noise[:, :plan.candidates], values, plan.inv_temp)
    choice = scores.masked_fill_(plan.blocked, float("-inf")).argmax(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(plan.sample, indices.gather(-1, choice)[:, 0], greedy)
