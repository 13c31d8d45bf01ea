"""A masked engine for the real models in tests: B1's batched DuplexEngine when it takes a ready
mask, otherwise one single-slot DuplexEngine per slot (exact, slower), so that the scheduler's
server tests run on the real models either way."""

from __future__ import annotations

import inspect

import numpy as np

from duplex.server.engine import DuplexEngine, StepOutput, StepTimings


def batched_engine_is_masked() -> bool:
    return "ready" in inspect.signature(DuplexEngine.step).parameters


class PerSlotEngine:
    """Implements the scheduler's Engine protocol with one DuplexEngine(batch_size=1) per slot."""

    def __init__(self, models, batch_size: int) -> None:
        self.models = models
        self.batch_size = batch_size
        self.engines = [self._fresh() for _ in range(batch_size)]
        self.frame_size = self.engines[0].frame_size

    def _fresh(self) -> DuplexEngine:
        m = self.models
        return DuplexEngine(m.mimi, m.lm, 1, m.lm_gen_defaults, device=m.device)

    def join(self, slot: int, request=None) -> None:
        self.engines[slot].join(0, request)

    def leave(self, slot: int) -> None:
        pass

    def move_slot(self, src: int, dst: int) -> None:
        self.engines[dst], self.engines[src] = self.engines[src], self._fresh()

    def reset_all(self) -> None:
        self.engines = [self._fresh() for _ in range(self.batch_size)]

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None) -> StepOutput:
        ready = np.ones(self.batch_size, dtype=bool) if ready is None else np.asarray(ready, dtype=bool)
        out_pcm = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)  # [B, 1920]
        tokens = np.full((self.batch_size, 1 + self.models.lm.config.dep_q), -1, dtype=np.int64)  # [B, 9]
        has_output = np.zeros(self.batch_size, dtype=bool)
        timings = StepTimings()
        for slot in np.flatnonzero(ready):
            out = self.engines[slot].step(pcm[slot:slot + 1])
            out_pcm[slot], tokens[slot], has_output[slot] = out.pcm[0], out.tokens[0], out.has_output[0]
            timings.encode += out.timings.encode
            timings.lm += out.timings.lm
            timings.decode += out.timings.decode
        return StepOutput(pcm=out_pcm, tokens=tokens, has_output=has_output, timings=timings)


def masked_engine(models, batch_size: int):
    """The engine a masked server test runs on (see the module doc)."""
    if batched_engine_is_masked():
        return DuplexEngine(models.mimi, models.lm, batch_size, models.lm_gen_defaults, device=models.device)
    return PerSlotEngine(models, batch_size)
