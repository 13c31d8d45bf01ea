"""DuplexEngine: one batched model step (Mimi encode -> LM step -> Mimi decode) for many slots.

Each call to :meth:`DuplexEngine.step` consumes one 80 ms frame per *ready* slot and returns, per
slot, the model's 80 ms frame and text token when the slot has output this step. Slots that are
not ready are not stepped at all: every streaming state of theirs stays as it was, so a
conversation's output never depends on when its frames arrive. Plain synchronous torch code.

Rules, each counted in the slot's own steps (details and reasons: docs/engine.md):

- :meth:`join` marks a slot as new: at its next step its states are reset and its settings applied.
- First frame rule (as the reference server): a slot's first frame steps the LM (whose output is
  invalid and whose codes have no effect) but not the Mimi encoder, so its second frame is encoded
  as a first frame. The decoder advances only on steps with output: the first ``max_delay`` steps
  have none, so N input frames give N - max_delay output frames (N - 1 for Moshi).
- A step computes only the first ``rows`` slots (views of the state tensors, no copies): the
  smallest bucket that covers the highest occupied or ready slot, and never fewer than
  :data:`BATCH_INVARIANT_ROWS`, so that a row's numbers do not depend on the bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from duplex.server.protocol import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = ("use_sampling", "temp", "temp_text", "top_k", "top_k_text")
SEED_FIELDS = ("seed", "text_seed", "audio_seed")
# The fewest rows a step computes. A matmul with fewer than 4 rows, and a convolution of batch 1, take other
# CPU kernels (another summation order: 1e-7 apart), while from 4 rows on every row's result is the same
# bit for bit whatever the batch. With this floor (on engines of more than one slot) a conversation's output
# does not depend on its bucket, i.e. on its neighbours (tests/test_engine_invariance.py; docs/engine.md).
BATCH_INVARIANT_ROWS = 4


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
    """Seconds spent in each stage of one batched step (a CUDA-graph step reports all of it as lm)."""

    encode: float = 0.0
    lm: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.lm + self.decode


@dataclass
class StepOutput:
    """What one batched step produced (CPU numpy arrays, indexed by slot)."""

    pcm: np.ndarray  # [B, FRAME_SIZE] float32 model audio (zeros where not has_output)
    tokens: np.ndarray  # [B, 1 + dep_q] int64: text token then the model's audio codes (-1: no output)
    has_output: np.ndarray  # [B] bool
    timings: StepTimings = field(default_factory=StepTimings)
    rows: int = 0  # slots computed by the step (its bucket); 0 when nothing was ready


class SlotEngine(Protocol):
    """What a scheduler needs of an engine (DuplexEngine, or a test's fake); semantics in docs/engine.md."""

    batch_size: int
    frame_size: int

    def join(self, slot: int, request) -> None: ...

    def leave(self, slot: int) -> None: ...

    def move_slot(self, src: int, dst: int) -> None: ...

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None) -> StepOutput: ...

    def reset_all(self) -> None: ...


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


def bucket_sizes(batch_size: int, buckets=None, min_rows: int = BATCH_INVARIANT_ROWS) -> tuple[int, ...]:
    """Sorted step sizes: the given ones (default powers of two), each at least ``min_rows``, always
    including the engine's rows max(batch_size, min_rows)."""
    if buckets is None:
        buckets = [1 << i for i in range(batch_size.bit_length())]
    buckets = [int(b) for b in buckets]
    if buckets and (min(buckets) < 1 or max(buckets) > batch_size):
        raise ValueError(f"buckets must lie in 1..{batch_size} (the batch size), got {list(buckets)}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1, got {min_rows}")
    return tuple(sorted({max(b, min_rows) for b in buckets} | {max(batch_size, min_rows)}))


class DuplexEngine:
    """Batched streaming Mimi + LMGen for ``batch_size`` independent conversation slots."""

    def __init__(self, mimi, lm, batch_size: int, lm_gen_kwargs: dict | None = None,
                 device: torch.device | str | None = None, buckets=None, cuda_graphs: bool = False,
                 min_rows: int | None = None) -> None:
        from duplex.model.generate import LMGen

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mimi = mimi
        self.lm = lm
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _module_device(lm)
        self.defaults = dict(lm_gen_kwargs or {})
        self.lm_gen = LMGen(lm, **self.defaults)
        self.frame_size = int(mimi.frame_size)
        self.num_codebooks = lm.config.dep_q
        if min_rows is None:  # a lone slot has no neighbours to be invariant to: it computes one row
            min_rows = BATCH_INVARIANT_ROWS if batch_size > 1 else 1
        self.buckets = bucket_sizes(batch_size, buckets, min_rows)
        # Rows of every state tensor: the slots, plus padding rows (never joined, never ready) up to the
        # smallest bucket. R below = capacity >= B.
        self.capacity = self.buckets[-1]
        with torch.inference_mode():
            self.mimi_state = mimi.init_state(self.capacity)
            self.lm_state = self.lm_gen.init_state(self.capacity)
        self._views = {self.capacity: (self.mimi_state, self.lm_state)}  # rows -> prefix views of the states
        self._pcm_in = torch.zeros(self.capacity, 1, self.frame_size, device=self.device)  # [R, 1, 1920]
        self._masks = torch.zeros(3, self.capacity, dtype=torch.bool, device=self.device)  # encode, lm, decode
        self._occupied = np.zeros(self.capacity, dtype=bool)  # [R] joined and not left
        self._first_frame = np.zeros(self.capacity, dtype=bool)  # [R] joined, first frame not yet stepped
        # [R] LM steps since each slot's restart: a host mirror of the LM clocks, so that knowing which
        # slots have output (clock >= max_delay) needs no device sync.
        self._lm_steps = np.zeros(self.capacity, dtype=np.int64)
        self._max_delay = lm.config.max_delay
        self._settings: dict[int, dict] = {}  # slot -> resolved sampling settings, applied at its first step
        # LoRA adapters attached to the LM (duplex.model.lora_multi), chosen per slot; None: none.
        # This engine's slot -> adapter choice is put in force before each of its steps.
        self.adapters = getattr(lm, "adapter_set", None)
        self._adapter_selection = self.adapters.new_selection(self.capacity) if self.adapters is not None else None
        self._adapter: dict[int, int] = {}  # slot -> adapter index for its next start (0 = base)
        if cuda_graphs and self.adapters is not None:
            logger.warning("CUDA graphs are not supported with per-conversation LoRA adapters: running eagerly")
            cuda_graphs = False
        self._graphs = None
        if cuda_graphs:
            from .engine_graphs import CudaGraphSteps

            self._graphs = CudaGraphSteps(self)

    # ------------------------------------------------------------------ slots
    def join(self, slot: int, request=None, adapter: str | None = None) -> None:
        """Start a new conversation in ``slot``: its next step is its first (see the module doc).

        ``request``: any object with SlotSampling's attribute names (missing or None = the engine's
        default; a None seed = the slot's index); other attributes are ignored. ``adapter``: the
        LoRA adapter's name (None: ``request.adapter`` when it has one, else the base model); an
        unknown name raises ValueError naming it.
        """
        self._check_slot(slot)
        settings = self._resolve(slot, request)
        index = self._adapter_index(adapter if adapter is not None else getattr(request, "adapter", None))
        self._occupied[slot] = True
        self._first_frame[slot] = True
        self._settings[slot] = settings
        self._adapter[slot] = index

    def _adapter_index(self, name: str | None) -> int:
        if name is None:
            return 0
        if self.adapters is None:
            from duplex.model.lora_multi import UnknownAdapterError

            raise UnknownAdapterError(f"unknown adapter {name!r} (this server has none)")
        return self.adapters.index_of(name)

    def leave(self, slot: int) -> None:
        """The slot's conversation is over: it is no longer stepped nor counted in the step's rows."""
        self._check_slot(slot)
        self._occupied[slot] = False
        self._first_frame[slot] = False
        self._settings.pop(slot, None)
        self._adapter.pop(slot, None)

    def move_slot(self, src: int, dst: int) -> None:
        """Move the conversation of ``src`` to ``dst`` (whole state and host mirrors); ``src`` is left free."""
        self._check_slot(src)
        self._check_slot(dst)
        if src == dst:
            return
        with torch.inference_mode():
            for tensor in self.mimi_state.slot_tensors():
                tensor[dst] = tensor[src]
            self.lm_state.move_slot(src, dst)
        for mirror in (self._occupied, self._first_frame, self._lm_steps):
            mirror[dst] = mirror[src]
        self._settings.pop(dst, None)
        if src in self._settings:
            self._settings[dst] = self._settings[src]
        self._adapter.pop(dst, None)
        if src in self._adapter:  # not started yet: its adapter applies at its first step
            self._adapter[dst] = self._adapter[src]
        if self._adapter_selection is not None:  # started: its adapter moves with it
            self._adapter_selection.set_slot(dst, int(self._adapter_selection.host[src]))
        self.leave(src)

    def reset_all(self) -> None:
        """Restart every slot's streaming state (after a failed step); slots must be joined again."""
        everyone = torch.ones(self.capacity, dtype=torch.bool, device=self.device)  # [R]
        with torch.inference_mode():
            self.mimi_state.reset(everyone)
            self.lm_state.reset(everyone)
        self._occupied[:] = False
        self._first_frame[:] = False
        self._lm_steps[:] = 0
        self._settings.clear()
        self._adapter.clear()
        if self._adapter_selection is not None:
            self._adapter_selection.clear()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.batch_size})")

    def _resolve(self, slot: int, request) -> dict:
        """The slot's full settings: a None field takes the engine's default (never the previous
        occupant's value), a None seed the slot's index. Validated now, not at the step."""
        from duplex.model.sampling import SlotSampling as DeviceSampling

        settings = {name: value if value is not None else default
                    for name, default in self.lm_gen.sampling_defaults.items()
                    for value in [getattr(request, name, None)]}
        seeds = {name: getattr(request, name, None) for name in SEED_FIELDS}
        if seeds["seed"] is None:
            seeds["seed"] = slot
        DeviceSampling.create(1, "cpu", **self.lm_gen.sampling_defaults).set_slot(0, **settings, **seeds)
        return {**settings, **seeds}

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, pcm: np.ndarray | torch.Tensor, ready: np.ndarray | None = None) -> StepOutput:
        """Advance the ready slots by one frame. ``pcm``: [B, 1920] (or [B, 1, 1920]) float32 at 24 kHz
        (rows of slots not ready are ignored); ``ready``: [B] bool, None = every slot."""
        ready = self._ready_mask(ready)  # [R]
        if self.adapters is not None:
            self.adapters.activate(self._adapter_selection)
        rows = self.rows_for(ready)
        if rows:
            self._load_input(pcm, rows, ready)  # validates before any state changes
        first = self._first_frame & ready  # [R] slots stepping their first frame
        self._first_frame &= ~ready
        self._lm_steps[first] = 0  # their LM clocks restart at this step
        has_output = ready & (self._lm_steps >= self._max_delay)  # [R], before this step's clock tick
        self._lm_steps += ready
        if rows == 0:
            return self._empty_output(has_output[: self.batch_size])
        if first.any():
            self._start_new_slots(first)
        masks = np.stack([ready & ~first, ready, has_output])[:, :rows]  # [3, rows] encode, lm, decode
        if self._graphs is not None:
            audio, tokens, timings = self._graphs.run(rows, masks)
        else:
            audio, tokens, timings = self._eager_step(rows, masks)
        return self._output(audio, tokens, has_output[: self.batch_size], rows, timings)

    def rows_for(self, ready: np.ndarray) -> int:
        """The bucket a step computes: the smallest covering every occupied or ready slot (0: none, or
        no slot ready). ``ready``: [B] or [R] bool."""
        ready = self._padded(np.asarray(ready, dtype=bool))
        busy = np.flatnonzero(ready | self._occupied)
        if busy.size == 0 or not ready.any():
            return 0
        needed = int(busy[-1]) + 1
        return next(size for size in self.buckets if size >= needed)

    def _ready_mask(self, ready) -> np.ndarray:
        if ready is None:
            return self._padded(np.ones(self.batch_size, dtype=bool))
        ready = np.asarray(ready)
        if ready.dtype != bool or ready.shape != (self.batch_size,):
            raise ValueError(f"ready must be a bool array of shape [{self.batch_size}], "
                             f"got {ready.dtype} {list(ready.shape)}")
        return self._padded(ready)

    def _padded(self, per_slot: np.ndarray) -> np.ndarray:
        """[B] -> a new [R] array, False on the padding rows (an [R] array is copied as it is)."""
        padded = np.zeros(self.capacity, dtype=bool)
        padded[: per_slot.shape[0]] = per_slot[: self.capacity]
        return padded

    def _eager_step(self, rows: int, masks: np.ndarray):
        """Run the device step eagerly; a stage whose rows are all ready runs unmasked (same values)."""
        stage_masks = [None, None, None]
        if not masks.all():
            device_masks = torch.from_numpy(masks).to(self.device, non_blocking=True)  # [3, rows]
            stage_masks = [None if masks[k].all() else device_masks[k] for k in range(3)]
        clock = _StageClock(self.device)
        audio, tokens = self._device_step(rows, *stage_masks, clock=clock)
        encode, lm, decode = clock.durations()
        return audio, tokens, StepTimings(encode=encode, lm=lm, decode=decode)

    def _device_step(self, rows: int, encode_ready, lm_ready, decode_ready, clock: _StageClock | None = None):
        """The whole model step on the first ``rows`` slots, device work only: no host sync, static
        shapes (what a CUDA graph captures). Masks: [rows] bool tensors or None (= all)."""
        mimi_state, lm_state = self._view(rows)
        mark = clock.mark if clock is not None else (lambda: None)
        mark()
        codes = self.mimi.encode_step(self._pcm_in[:rows], mimi_state, validate=False, ready=encode_ready)
        codes = codes[:, : self.lm_user_codebooks]  # [rows, 8, 1]
        mark()
        tokens, _ = self.lm_gen.step(codes, lm_state, ready=lm_ready, validate=False)  # [rows, 9, 1]
        mark()
        audio = self.mimi.decode_step(tokens[:, 1:].clamp_min(0), mimi_state, validate=False,
                                      ready=decode_ready)  # [rows, 1, 1920]
        mark()
        return audio, tokens

    def _view(self, rows: int):
        """(MimiState, LMGenState) views of the first ``rows`` slots, made once per bucket."""
        if rows not in self._views:
            self._views[rows] = (self.mimi_state.prefix(rows), self.lm_state.prefix(rows))
        return self._views[rows]

    def _start_new_slots(self, first: np.ndarray) -> None:
        """Reset the LM and Mimi states and apply the settings of slots stepping their first frame."""
        first_mask = torch.from_numpy(first).to(self.device)  # [B] bool
        self.mimi_state.reset(first_mask)
        self.lm_state.reset(first_mask)
        for slot in np.flatnonzero(first).tolist():
            settings = self._settings.get(slot) or self._resolve(slot, None)
            self.lm_state.set_slot_sampling(slot, **settings)
            if self._adapter_selection is not None:  # never the previous occupant's adapter
                self._adapter_selection.set_slot(slot, self._adapter.pop(slot, 0))

    @property
    def lm_user_codebooks(self) -> int:
        """How many user codebooks the LM reads (n_q - dep_q)."""
        config = self.lm.config
        return config.n_q - config.dep_q

    def _load_input(self, pcm: np.ndarray | torch.Tensor, rows: int, ready: np.ndarray) -> None:
        """Copy the ready slots' frames to the device (the others' rows are zeroed, never read)."""
        frames = torch.as_tensor(pcm, dtype=torch.float32)
        if frames.numel() != self.batch_size * self.frame_size:
            raise ValueError(f"step expects [{self.batch_size}, {self.frame_size}] samples (one 80 ms frame "
                             f"per slot), got shape {list(frames.shape)}")
        slots = min(rows, self.batch_size)  # rows beyond the slots are padding: their input stays zero
        frames = frames.reshape(self.batch_size, 1, self.frame_size)[:slots]  # [slots, 1, 1920]
        if not ready[:slots].all():
            frames = torch.where(torch.from_numpy(ready[:slots, None, None]).to(frames.device), frames, 0.0)
        if frames.device.type == "cpu":
            finite = torch.isfinite(frames).flatten(1).all(dim=1)  # [slots]
            if not bool(finite.all()):
                bad = np.flatnonzero(~finite.numpy()).tolist()
                raise ValueError(f"audio contains NaN or infinite samples (batch slots {bad})")
        self._pcm_in[:slots].copy_(frames, non_blocking=True)

    def _empty_output(self, has_output: np.ndarray) -> StepOutput:
        return StepOutput(pcm=np.zeros((self.batch_size, self.frame_size), dtype=np.float32),
                          tokens=np.full((self.batch_size, 1 + self.num_codebooks), -1, dtype=np.int64),
                          has_output=has_output, rows=0)

    def _output(self, audio: torch.Tensor, tokens: torch.Tensor, has_output: np.ndarray, rows: int,
                timings: StepTimings) -> StepOutput:
        out = self._empty_output(has_output)
        slots = min(rows, self.batch_size)
        out.pcm[:slots] = audio[:slots, 0].float().cpu().numpy()  # [slots, 1920]; the host sync of the step
        out.tokens[:slots] = tokens[:slots, :, 0].cpu().numpy()  # [slots, 9]
        out.pcm[~has_output] = 0.0
        out.tokens[~has_output] = -1
        out.rows, out.timings = rows, timings
        return out


def _module_device(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
