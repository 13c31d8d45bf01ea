"""DuplexEngine: one batched model step (Mimi encode -> LM step -> Mimi decode) for many slots.

The engine owns the streaming states of a fixed batch of ``batch_size`` slots. Each call to
:meth:`DuplexEngine.step` consumes one 80 ms frame per slot and returns, per slot, the model's
80 ms frame and text token when the slot has output this step. It is plain synchronous torch
code (no asyncio, no threads), shared by the server's scheduler and offline inference.

Per-slot life cycle:

- :meth:`join` marks a slot as new: at the next step its streaming states are reset and its
  sampling settings applied.
- At its first step the slot's LM and Mimi states are reset (only that slot's).
- The first frame rule (as the reference server does): a slot's very first frame is encoded and
  then only that slot's *encoder* is reset, so that the second frame is encoded as a first frame.
  The LM still steps on the first frame's codes, so its clock advances; the codes have no effect
  (at LM offset 0 every stream reads its initial token) and that step's output is invalid.
- While the LM's acoustic delay has not elapsed (the first ``max_delay`` steps, the first frame's
  included), a slot has no output; its Mimi decoder is kept fresh so that decoding starts exactly
  with the first valid tokens. N input frames thus give N - max_delay output frames (N - 1 for Moshi).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

FRAME_SIZE = 1920  # samples per 80 ms frame at 24 kHz
SAMPLE_RATE = 24000
FRAME_RATE = 12.5


@dataclass(frozen=True)
class SlotSampling:
    """Sampling settings of one slot; None = the engine's default."""

    use_sampling: bool | None = None
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    seed: int | None = None  # both streams' seed (text_seed / audio_seed win over it)
    text_seed: int | None = None  # keys the text token's noise
    audio_seed: int | None = None  # keys the audio tokens' noise
    adapter: str | None = None  # LoRA adapter name (query parameter adapter=NAME); None: the base model


@dataclass
class StepTimings:
    """Seconds spent in each stage of one batched step."""

    encode: float = 0.0
    lm: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.lm + self.decode


@dataclass
class StepOutput:
    """What one batched step produced (CPU numpy arrays, indexed by slot)."""

    pcm: np.ndarray  # [B, FRAME_SIZE] float32 model audio (meaningful where has_output)
    tokens: np.ndarray  # [B, 1 + dep_q] int64: text token then the model's audio codes (-1: no output)
    has_output: np.ndarray  # [B] bool
    timings: StepTimings = field(default_factory=StepTimings)


class _StageClock:
    """Wall-clock stage timer; on CUDA uses events so that timing adds no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds between consecutive marks (call after the step's host sync)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class DuplexEngine:
    """Batched streaming Mimi + LMGen for ``batch_size`` independent conversation slots."""

    def __init__(self, mimi, lm, batch_size: int, lm_gen_kwargs: dict | None = None,
                 device: torch.device | str | None = None) -> None:
        from duplex.model.generate import LMGen

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mimi = mimi
        self.lm = lm
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _module_device(lm)
        self.defaults = dict(lm_gen_kwargs or {})
        self.lm_gen = LMGen(lm, **self.defaults)
        self.frame_size = FRAME_SIZE
        self.num_codebooks = lm.config.dep_q
        with torch.inference_mode():
            self.mimi_state = mimi.init_state(batch_size)
            self.lm_state = self.lm_gen.init_state(batch_size)
        self._pcm_in = torch.zeros(batch_size, 1, FRAME_SIZE, device=self.device)  # [B, 1, 1920]
        self._first_frame = np.zeros(batch_size, dtype=bool)  # [B] joined, first frame not yet stepped
        # [B] LM steps since each slot's LM restart: a host mirror of the LM clocks, so that knowing
        # which slots have output (clock >= max_delay) needs no device sync.
        self._lm_steps = np.zeros(batch_size, dtype=np.int64)
        self._max_delay = lm.config.max_delay
        self._sampling: dict[int, SlotSampling] = {}
        # LoRA adapters attached to the LM (duplex.model.lora_multi), chosen per slot; None: none.
        self.adapters = getattr(lm, "adapter_set", None)
        self._adapter: dict[int, int] = {}  # slot -> adapter index for its next start (0 = base)
        # This engine's slot -> adapter choice, put in force before each of its steps.
        self._adapter_selection = self.adapters.new_selection(batch_size) if self.adapters is not None else None

    # ------------------------------------------------------------------ slots
    def join(self, slot: int, sampling: SlotSampling | None = None, adapter: str | None = None) -> None:
        """Start a new conversation in ``slot``: its next frame is its first (see the module doc).

        ``adapter``: the LoRA adapter's name (None: ``sampling.adapter`` when the request has one,
        else the base model); an unknown name raises ValueError naming it.
        """
        self._check_slot(slot)
        adapter = adapter if adapter is not None else getattr(sampling, "adapter", None)
        index = self._adapter_index(adapter)
        self._first_frame[slot] = True
        self._sampling[slot] = sampling or SlotSampling()
        self._adapter[slot] = index

    def _adapter_index(self, name: str | None) -> int:
        if name is None:
            return 0
        if self.adapters is None:
            from duplex.model.lora_multi import UnknownAdapterError

            raise UnknownAdapterError(f"unknown adapter {name!r} (this server has none)")
        return self.adapters.index_of(name)

    def reset_all(self) -> None:
        """Restart every slot's streaming state (after a failed step); slots must be joined again."""
        everyone = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)  # [B]
        with torch.inference_mode():
            self.mimi_state.reset(everyone)
            self.lm_state.reset(everyone)
        self._first_frame[:] = False
        self._lm_steps[:] = 0
        self._sampling.clear()
        self._adapter.clear()
        if self._adapter_selection is not None:
            self._adapter_selection.clear()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.batch_size})")

    def _apply_sampling(self, slots: list[int]) -> None:
        """Give each new occupant its settings; a None field takes the engine's default (never the
        previous occupant's value), and a None seed the slot's index."""
        for slot in slots:
            s = self._sampling.get(slot, SlotSampling())
            settings = {name: value if value is not None else default
                        for name, default in self.lm_gen.sampling_defaults.items()
                        for value in [getattr(s, name)]}
            seed = s.seed if s.seed is not None else slot
            self.lm_state.set_slot_sampling(slot, **settings, seed=seed, text_seed=s.text_seed,
                                            audio_seed=s.audio_seed)
            if self._adapter_selection is not None:  # never the previous occupant's adapter
                self._adapter_selection.set_slot(slot, self._adapter.pop(slot, 0))

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, pcm: np.ndarray | torch.Tensor) -> StepOutput:
        """Advance every slot by one frame. ``pcm``: [B, 1920] (or [B, 1, 1920]) float32 at 24 kHz."""
        self._load_input(pcm)
        if self.adapters is not None:
            self.adapters.activate(self._adapter_selection)
        first = self._first_frame.copy()  # [B] bool
        self._first_frame[:] = False
        self._lm_steps[first] = 0  # their LM clocks restart at this step
        has_output = self._lm_steps >= self._max_delay  # [B], before this step's clock tick
        self._lm_steps += 1
        first_mask = self._start_new_slots(first)
        clock = _StageClock(self.device)
        clock.mark()
        codes = self.mimi.encode_step(self._pcm_in, self.mimi_state)  # [B, K, 1]
        codes = codes[:, : self.lm_user_codebooks]  # [B, 8, 1]
        clock.mark()
        if first_mask is not None:
            # First frame rule: the next frame is encoded as a first frame. The LM steps anyway
            # (offset 0 reads only initial tokens, so these codes have no effect; output invalid).
            self.mimi_state.reset_encoder(first_mask)
        tokens, _ = self.lm_gen.step(codes, self.lm_state)  # [B, 9, 1]; -1 while not valid
        clock.mark()
        audio = self.mimi.decode_step(tokens[:, 1:].clamp_min(0), self.mimi_state)  # [B, 1, 1920]
        if not has_output.all():
            # Slots without output must not advance their decoder: it starts at the first valid frame.
            self.mimi_state.reset_decoder(torch.from_numpy(~has_output).to(self.device))
        clock.mark()
        return self._output(audio, tokens, has_output, clock)

    def _start_new_slots(self, first: np.ndarray) -> torch.Tensor | None:
        """Reset the LM and Mimi states and apply the sampling of slots stepping their first frame."""
        if not first.any():
            return None
        first_mask = torch.from_numpy(first).to(self.device)  # [B] bool
        self.mimi_state.reset(first_mask)
        self.lm_state.reset(first_mask)
        self._apply_sampling(np.flatnonzero(first).tolist())
        return first_mask

    @property
    def lm_user_codebooks(self) -> int:
        """How many user codebooks the LM reads (n_q - dep_q)."""
        config = self.lm.config
        return config.n_q - config.dep_q

    def _load_input(self, pcm: np.ndarray | torch.Tensor) -> None:
        frames = torch.as_tensor(pcm, dtype=torch.float32)
        if frames.numel() != self.batch_size * FRAME_SIZE:
            raise ValueError(f"step expects [{self.batch_size}, {FRAME_SIZE}] samples (one 80 ms frame per slot), "
                             f"got shape {list(frames.shape)}")
        frames = frames.reshape(self.batch_size, 1, FRAME_SIZE)  # [B, 1, 1920]
        self._pcm_in.copy_(frames, non_blocking=True)

    def _output(self, audio: torch.Tensor, tokens: torch.Tensor, has_output: np.ndarray,
                clock: _StageClock) -> StepOutput:
        pcm = audio[:, 0].float().cpu().numpy()  # [B, 1920]; the host sync of the step
        tokens_np = tokens[:, :, 0].cpu().numpy()  # [B, 9]
        encode, lm, decode = clock.durations()
        return StepOutput(pcm=pcm, tokens=tokens_np, has_output=has_output,
                          timings=StepTimings(encode=encode, lm=lm, decode=decode))


def _module_device(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
