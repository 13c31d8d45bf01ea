"""The engine in a child process (`duplex serve --engine-process`, the default): the same numbers as the engine
in the server's own process, the same errors, and a clean failure when the child dies or hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch
from scheduler_fakes import Sink
from server_harness import spawn_serve

from duplex.model.lora_multi import UnknownAdapterError
from duplex.server.demo import build_demo_models
from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotSampling
from duplex.server.engine_process import (EngineProcessDied, EngineSpec, EngineStartError, ProcessEngine,
                                          RemoteModels)
from duplex.server.metrics import ServerMetrics
from duplex.server.scheduler import Scheduler

pytestmark = pytest.mark.timeout(180)
SLOTS = 4
SEEDED = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, top_k=20, top_k_text=10, seed=3)


def demo_spec(**overrides) -> EngineSpec:
    return EngineSpec(**{"batch_size": SLOTS, "demo": True, "torch_threads": 1, **overrides})


@pytest.fixture(scope="module")
def remote():
    engine = ProcessEngine(demo_spec())
    yield engine
    engine.close()


def script(engine) -> list:
    """Joins, a move, a leave and 12 steps with some slots not ready: every output, as numpy."""
    rng = np.random.default_rng(0)
    engine.join(0, SEEDED)
    engine.join(2, SlotSampling(use_sampling=False))
    outputs = []
    for step in range(12):
        if step == 4:
            engine.join(3, SEEDED)
        if step == 7:
            engine.move_slot(3, 1)
        if step == 9:
            engine.leave(2)
        ready = np.array([True, step >= 7, step < 9 and step % 3 != 1, 4 <= step < 7])
        pcm = (0.1 * rng.standard_normal((SLOTS, FRAME_SIZE))).astype(np.float32)  # [B, 1920]
        out = engine.step(pcm, ready)
        outputs.append((out.pcm.copy(), out.tokens.copy(), out.has_output.copy(), out.rows))
    engine.reset_all()
    return outputs


def test_the_child_engine_gives_the_numbers_of_an_engine_in_this_process(remote):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's
    try:
        models = build_demo_models()
        local = script(DuplexEngine(models.mimi, models.lm, SLOTS, dict(models.lm_gen_defaults)))
    finally:
        torch.set_num_threads(threads)
    far = script(remote)
    assert any(has.any() for _, _, has, _ in far), "the script produced no output to compare"
    for step, (mine, theirs) in enumerate(zip(local, far)):
        for name, a, b in zip(("pcm", "tokens", "has_output", "rows"), mine, theirs):
            assert np.array_equal(a, b), f"step {step}: {name} differs"


def test_the_server_gets_the_models_facts_but_no_weights(remote):
    models = build_demo_models()
    facts: RemoteModels = remote.models
    assert facts.lm is None and facts.mimi is None
    assert facts.model_name == models.model_name and facts.lm_gen_defaults == models.lm_gen_defaults
    assert facts.frame_size == remote.frame_size == FRAME_SIZE and remote.batch_size == SLOTS
    assert facts.adapter_names == []
    assert [facts.tokenizer.piece(i) for i in range(-2, 110)] == [models.tokenizer.piece(i) for i in range(-2, 110)]


def test_errors_in_the_child_are_raised_again_here_and_the_engine_goes_on(remote):
    with pytest.raises(ValueError, match="slot 9 out of range"):
        remote.join(9, None)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        remote.join(0, SlotSampling(adapter="nope"))
    with pytest.raises(ValueError):
        remote.step(np.zeros((SLOTS, 7), np.float32), np.ones(SLOTS, bool))  # not [B, 1920]
    remote.join(0, None)
    out = remote.step(np.zeros((SLOTS, FRAME_SIZE), np.float32), np.array([True, False, False, False]))
    assert out.pcm.shape == (SLOTS, FRAME_SIZE) and out.tokens.shape[0] == SLOTS
    remote.reset_all()


def test_a_killed_child_fails_every_call_at_once():
    engine = ProcessEngine(demo_spec())
    try:
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.join(10)
        with pytest.raises(EngineProcessDied, match="killed by SIGKILL"):
            engine.step(np.zeros((SLOTS, FRAME_SIZE), np.float32), np.ones(SLOTS, bool))
        start = time.monotonic()
        with pytest.raises(EngineProcessDied, match="gone"):
            engine.reset_all()
        assert time.monotonic() - start < 1.0
    finally:
        engine.close()


def test_a_hung_child_is_killed_after_the_answer_timeout_and_the_scheduler_stops_for_good():
    engine = ProcessEngine(demo_spec(), answer_timeout_s=2.0)
    scheduler = Scheduler(engine, ServerMetrics(), inbox_frames=8)
    fatal: list = []
    scheduler.on_fatal = fatal.append
    sink = Sink()

    async def main() -> None:
        scheduler.start()
        handle = scheduler.join(sink, None)
        await scheduler.push(handle, np.zeros(FRAME_SIZE, np.float32))
        deadline = time.monotonic() + 30
        while handle.frames_in < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the first step went through
        os.kill(engine.process.pid, signal.SIGSTOP)  # hangs: no answer any more
        await scheduler.push(handle, np.zeros(FRAME_SIZE, np.float32))
        deadline = time.monotonic() + 30
        while not fatal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    try:
        asyncio.run(main())
        assert fatal and isinstance(fatal[0], EngineProcessDied), fatal
        assert "no answer to step within 2 s" in str(fatal[0])
        assert isinstance(scheduler.error, EngineProcessDied)
        assert sink.failures and sink.failures[0][0] == "server_error"
        engine.process.join(10)
        assert engine.process.exitcode == -signal.SIGKILL
    finally:
        scheduler.stop()
        engine.close()


def test_a_model_that_cannot_load_is_a_clear_start_error(tmp_path):
    spec = EngineSpec(batch_size=1, model_args={"moshi_weight": str(tmp_path / "missing.safetensors"),
                                                "mimi_weight": str(tmp_path / "m.safetensors"),
                                                "tokenizer": str(tmp_path / "t.model"), "device": "cpu"})
    with pytest.raises(EngineStartError, match="file not found"):
        ProcessEngine(spec)


def test_serve_runs_the_engine_in_a_child_that_dies_with_it():
    process, port, lines = spawn_serve("--demo", "--host", "127.0.0.1", "--port", "0", "--threads", "1")
    try:
        children = psutil.Process(process.pid).children()
        engines = [c for c in children if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker"
                   not in " ".join(c.cmdline())]
        assert len(engines) == 1, [c.cmdline() for c in children]
        assert any("model engine in process" in line for line in lines)
        process.kill()  # no chance to close it: the kernel ends the child (PR_SET_PDEATHSIG)
        process.wait(10)
        psutil.wait_procs(engines, timeout=10)
        assert not engines[0].is_running() or engines[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_in_one_process_is_still_available():
    process, port, lines = spawn_serve("--demo", "--no-engine-process", "--host", "127.0.0.1", "--port", "0",
                                       "--threads", "1")
    try:
        assert not [c for c in psutil.Process(process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert not any("model engine in process" in line for line in lines)
    finally:
        process.kill()
        process.wait(10)


def test_model_files_and_adapters_load_in_the_child(fixtures_dir, tiny_tokenizer_path):
    """The `duplex serve` model flags reach the child: the tiny fixtures with a LoRA adapter, reported by name."""
    spec = EngineSpec(batch_size=2, torch_threads=1, model_args={
        "moshi_weight": str(fixtures_dir / "lm_tiny" / "model.safetensors"),
        "mimi_weight": str(fixtures_dir / "mimi_tiny" / "model.safetensors"),
        "config": str(fixtures_dir / "lm_tiny" / "config.json"),
        "mimi_config": str(fixtures_dir / "mimi_tiny" / "config.json"),
        "tokenizer": str(tiny_tokenizer_path), "device": "cpu",
        "adapter": [f"tiny={fixtures_dir / 'lm_tiny_lora'}"]})
    engine = ProcessEngine(spec)
    try:
        assert engine.models.adapter_names == ["tiny"]
        assert engine.models.tokenizer.vocab_size > 0
        engine.join(0, SlotSampling(adapter="tiny"))
        with pytest.raises(UnknownAdapterError, match="nope"):
            engine.join(1, SlotSampling(adapter="nope"))
        out = engine.step(np.zeros((2, FRAME_SIZE), np.float32), np.array([True, False]))
        assert out.pcm.shape == (2, FRAME_SIZE)
    finally:
        engine.close()
