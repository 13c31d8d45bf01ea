"""The engine's device step never reads a value back to the host (what a CUDA graph capture needs).

No GPU here, so two stand-ins: (1) the meta device, where reading any value raises; (2) a dispatch mode that
records every aten operator of a CPU step and fails on the ones that read values on the host or have
data-dependent shapes (``item``/``bool()``, ``nonzero``, boolean indexing, ...).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server_harness import load_tiny_models
from torch.utils._python_dispatch import TorchDispatchMode

from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotSampling

SAMPLED = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, top_k=20, top_k_text=10, seed=3)
HOST_READS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2",
              "unique_consecutive", "equal", "is_nonzero", "allclose", "repeat_interleave", "item"}


class HostReadRecorder(TorchDispatchMode):
    """Records aten operators that need the host to see tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.bad.append(name)
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.bad.append(f"{name} with a boolean index")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def masks(rows: int, device) -> list[torch.Tensor]:
    ready = torch.tensor([True, False, True, True][:rows], device=device)
    return [ready & torch.tensor([True, True, False, True][:rows], device=device), ready, ready]


def test_the_masked_and_the_plain_device_step_record_no_host_read(models):
    engine = DuplexEngine(models.mimi, models.lm, 4, {"use_sampling": False})
    engine.join(0, SAMPLED)
    engine.join(1)
    engine.join(2, SAMPLED)
    engine.step(np.zeros((4, FRAME_SIZE), np.float32))  # the join's resets and settings happen here
    with torch.inference_mode():
        engine.lm_gen.draw_plans(engine.lm_state)  # built before the step, as the graph runner does
        for stage_masks in (masks(4, "cpu"), [None, None, None], masks(2, "cpu")[:1] + [None, None]):
            rows = 4 if stage_masks[0] is None or stage_masks[0].shape[0] == 4 else 2
            recorder = HostReadRecorder()
            with recorder:
                engine._device_step(rows, *stage_masks)
            assert recorder.calls > 100  # the recorder did see the step
            assert recorder.bad == []


def test_the_device_step_runs_on_the_meta_device(models):
    """Meta tensors have no values: any host read in the step (even inside an operator) raises."""
    import copy

    mimi, lm = copy.deepcopy(models.mimi).to("meta"), copy.deepcopy(models.lm).to("meta")
    engine = DuplexEngine(mimi, lm, 4, {"use_sampling": True, "temp": 1.0, "temp_text": 1.0}, device="meta")
    with torch.inference_mode():
        engine.lm_gen.draw_plans(engine.lm_state)
        audio, tokens = engine._device_step(4, *masks(4, "meta"))
        assert audio.shape == (4, 1, FRAME_SIZE) and tokens.shape == (4, 9, 1)
        audio, tokens = engine._device_step(2, None, None, None)
        assert audio.shape == (2, 1, FRAME_SIZE)


class _RerunGraph:
    """Stands in for a CUDA graph: replay re-runs the captured step and writes into its static outputs."""

    def __init__(self, step, outputs) -> None:
        self.step, self.outputs = step, outputs
        self.replays = 0

    def replay(self) -> None:
        for static, new in zip(self.outputs, self.step()):
            static.copy_(new)
        self.replays += 1


def test_the_graph_runner_logic_on_cpu(models):
    """CudaGraphSteps with its CUDA calls replaced: static mask buffers, always-masked steps, warm-up and
    capture that leave every conversation untouched, one capture per (bucket, plan shape), new plans loaded.
    (The real capture and replay are untested here: no GPU.)"""
    from duplex.server.bench_engine import check_cuda_graphs
    from duplex.server.engine_graphs import CudaGraphSteps

    class CpuGraphs(CudaGraphSteps):
        def _check_device(self, device):
            pass

        def _pinned(self, tensor):
            return tensor

        def _warm_up(self, step):
            step()
            step()

        def _record(self, step):
            outputs = step()
            return _RerunGraph(step, outputs), outputs

        def _replay(self, graph):
            graph.replay()
            return 0.0

    made = []
    report = check_cuda_graphs(models.mimi, models.lm, torch.device("cpu"),
                               graphs=lambda engine: made.append(CpuGraphs(engine)) or made[-1])
    assert report["token_mismatches"] == 0 and report["max_pcm"] == 0.0, report["text"]
    keys = set(made[0].captured)
    assert len(keys) == 2 and len({key[0] for key in keys}) == 1, keys  # one bucket, two plan shapes
    assert sum(entry.graph.replays for entry in made[0].captured.values()) > 10
