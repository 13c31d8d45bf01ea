"""DuplexEngine: the batched step against the pipeline fixture, first frame rule, slot independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from server_harness import load_tiny_models

from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotSampling

GREEDY = {"use_sampling": False}


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.fixture(scope="module")
def pipeline(fixtures_dir):
    return load_file(str(fixtures_dir / "pipeline_tiny" / "io.safetensors"))


def run_slots(engine: DuplexEngine, streams: dict[int, tuple[int, np.ndarray]], steps: int):
    """Feed each slot its frames from its start step on; collect (tokens, pcm) per slot with output."""
    outputs = {slot: ([], []) for slot in streams}
    for step in range(steps):
        frames = np.zeros((engine.batch_size, FRAME_SIZE), dtype=np.float32)  # [B, 1920]
        for slot, (start, audio) in streams.items():
            index = step - start
            if index == 0:
                engine.join(slot, SlotSampling(use_sampling=False))
            if 0 <= index < audio.size // FRAME_SIZE:
                frames[slot] = audio[index * FRAME_SIZE:(index + 1) * FRAME_SIZE]
        out = engine.step(frames)
        np.testing.assert_array_equal(out.tokens[:, 0] >= 0, out.has_output)  # host mirror == LM clocks
        for slot, (start, audio) in streams.items():
            if 0 <= step - start < audio.size // FRAME_SIZE and out.has_output[slot]:
                outputs[slot][0].append(out.tokens[slot].copy())
                outputs[slot][1].append(out.pcm[slot].copy())
    return {slot: (np.stack(t, axis=1), np.concatenate(p)) for slot, (t, p) in outputs.items()}


def test_engine_matches_pipeline_fixture_after_the_discarded_first_frame(models, pipeline):
    """A junk first frame, then the fixture's 50 frames: the 49 outputs equal the reference pipeline."""
    engine = DuplexEngine(models.mimi, models.lm, batch_size=3, lm_gen_kwargs=GREEDY)
    audio_in = pipeline["audio_in"][:, 0].numpy()  # [2, 96000]
    junk = np.random.default_rng(0).standard_normal(FRAME_SIZE).astype(np.float32) * 0.3
    streams = {0: (0, np.concatenate([junk, audio_in[0]])), 2: (3, np.concatenate([junk * 2, audio_in[1]]))}
    result = run_slots(engine, streams, steps=60)
    for slot, row in ((0, 0), (2, 1)):
        tokens, pcm = result[slot]
        assert tokens.shape == (9, 49)
        np.testing.assert_array_equal(tokens[0], pipeline["text_tokens"][row, 0].numpy())
        np.testing.assert_array_equal(tokens[1:], pipeline["audio_tokens"][row].numpy())
        np.testing.assert_allclose(pcm, pipeline["audio_out"][row, 0].numpy(), atol=1e-4)


def test_slot_output_is_independent_of_neighbours_and_rejoins(models):
    """Same input in a busy batch, after a slot was reused, equals a solo run."""
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(12 * FRAME_SIZE) * 0.2).astype(np.float32)
    solo = run_slots(DuplexEngine(models.mimi, models.lm, 1, GREEDY), {0: (0, audio)}, steps=12)[0]
    engine = DuplexEngine(models.mimi, models.lm, 3, GREEDY)
    noise = (rng.standard_normal(30 * FRAME_SIZE) * 0.3).astype(np.float32)
    busy = run_slots(engine, {0: (2, audio), 1: (0, noise), 2: (5, noise[: 9 * FRAME_SIZE])}, steps=30)
    np.testing.assert_array_equal(busy[0][0], solo[0])
    np.testing.assert_allclose(busy[0][1], solo[1], atol=1e-5)
    again = run_slots(engine, {0: (0, audio), 1: (4, noise)}, steps=12)  # slot 0 reused
    np.testing.assert_array_equal(again[0][0], solo[0])
    assert solo[0].shape == (9, 10)  # 12 frames: the first is discarded, the LM delay takes one more


def test_sampling_is_per_slot_and_seeded(models):
    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(10 * FRAME_SIZE) * 0.2).astype(np.float32)
    engine = DuplexEngine(models.mimi, models.lm, 3, GREEDY)
    sampled = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, top_k=0, top_k_text=0, seed=1234)
    runs = []
    for _ in range(2):
        tokens = []
        for step in range(10):
            if step == 0:
                engine.join(0, sampled)
                engine.join(1, SlotSampling(use_sampling=False))
                engine.join(2, SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, seed=step + len(runs)))
            frames = np.stack([audio[step * FRAME_SIZE:(step + 1) * FRAME_SIZE]] * 3)
            out = engine.step(frames)
            tokens.append(out.tokens.copy())
        runs.append(np.stack(tokens))  # [steps, B, 9]
    np.testing.assert_array_equal(runs[0][:, 0], runs[1][:, 0])  # same seed, different neighbour seeds
    greedy = run_slots(DuplexEngine(models.mimi, models.lm, 1, GREEDY), {0: (0, audio)}, steps=10)[0][0]
    np.testing.assert_array_equal(runs[0][2:, 1].T, greedy)
    assert not np.array_equal(runs[0][2:, 0].T, greedy)  # sampling at temperature 1 differs from argmax


def test_timings_and_input_validation(models):
    engine = DuplexEngine(models.mimi, models.lm, 2, GREEDY)
    out = engine.step(np.zeros((2, FRAME_SIZE), dtype=np.float32))
    assert out.pcm.shape == (2, FRAME_SIZE) and out.tokens.shape == (2, 9)
    assert min(out.timings.encode, out.timings.lm, out.timings.decode) >= 0
    with pytest.raises(ValueError, match="slot 2 out of range"):
        engine.join(2)
    with pytest.raises(ValueError, match="batch_size"):
        DuplexEngine(models.mimi, models.lm, 0, GREEDY)
    with pytest.raises(ValueError, match="one 80 ms frame per slot"):
        engine.step(torch.zeros(3, FRAME_SIZE))
