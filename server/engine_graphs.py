"""CUDA graphs of the engine's device step: one capture per (bucket, sampling plan shape), then replays.

UNTESTED ON A GPU (no GPU was lent to the session that wrote it): run
``duplex bench engine --device cuda --cuda-graphs --check`` or ``pytest tests/test_engine_cuda.py`` on one.
How it works: docs/engine.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before a capture (cuBLAS handles, lazy inits)


@dataclass
class _Captured:
    """One captured step: its graph, its static outputs, and the draw plans whose memory it reads."""

    graph: object  # torch.cuda.CUDAGraph
    audio: torch.Tensor  # [rows, 1, frame_size]
    tokens: torch.Tensor  # [rows, 1 + dep_q, 1]
    plans: tuple  # (text, audio) DrawPlan or None, as captured

    def load_plans(self, plans: tuple) -> None:
        """Copy the current plans' values into the captured ones (same shapes: they share the key)."""
        for captured, current in zip(self.plans, plans):
            if captured is not None and current is not captured:
                captured.blocked.copy_(current.blocked)
                captured.inv_temp.copy_(current.inv_temp)
                captured.sample.copy_(current.sample)


class CudaGraphSteps:
    """Runs ``engine._device_step`` as CUDA graphs; masks always given (static shapes, one path)."""

    def __init__(self, engine) -> None:
        self._check_device(engine.device)
        self.engine = engine
        self.captured: dict[tuple, _Captured] = {}
        self._host_masks = self._pinned(torch.zeros(engine._masks.shape, dtype=torch.bool))  # [3, B]

    # The CUDA calls, one per method (tests replace them with a CPU double).
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"cuda_graphs needs a CUDA device; this engine runs on {device} "
                             "(drop the CUDA graphs option to run eagerly)")

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def _warm_up(self, step) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, step):
        """Capture ``step`` -> (graph, its static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
            outputs = step()
        return graph, outputs

    def _replay(self, graph) -> float:
        """Replay and wait for it; the seconds it took on the device."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def run(self, rows: int, masks: np.ndarray):
        """Replay (capturing first if needed) the step on ``rows`` slots with masks [3, rows]."""
        from .engine import StepTimings

        engine = self.engine
        self._host_masks.zero_()
        self._host_masks[:, :rows] = torch.from_numpy(masks)
        engine._masks.copy_(self._host_masks, non_blocking=True)
        plans = engine.lm_gen.draw_plans(engine.lm_state)  # built eagerly, outside any capture
        key = (rows, *(None if plan is None else plan.candidates for plan in plans))
        entry = self.captured.get(key)
        if entry is None:
            entry = self.captured[key] = self._capture(rows, plans)
        entry.load_plans(plans)
        seconds = self._replay(entry.graph)
        return entry.audio, entry.tokens, StepTimings(lm=seconds)

    def _mask_views(self, rows: int):
        masks = self.engine._masks
        return masks[0, :rows], masks[1, :rows], masks[2, :rows]

    def _capture(self, rows: int, plans: tuple) -> _Captured:
        """Warm up, then capture. Both run with every mask False: a masked step leaves every state
        tensor as it was, so neither changes a conversation."""
        engine = self.engine
        wanted = engine._masks.clone()
        engine._masks.zero_()
        step = lambda: engine._device_step(rows, *self._mask_views(rows))  # noqa: E731
        self._warm_up(step)
        graph, (audio, tokens) = self._record(step)
        engine._masks.copy_(wanted)
        logger.info("captured a CUDA graph of the engine step for %d slots (plans %s)", rows,
                    [None if plan is None else plan.candidates for plan in plans])
        return _Captured(graph, audio, tokens, plans)
