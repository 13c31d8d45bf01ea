"""DuplexEngine: the batched step against the reference server's algorithm, first frame rule, slot independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from server_harness import load_tiny_models, reference_server_run

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


def test_engine_follows_the_reference_server_algorithm(models, pipeline):
    """Two slots of a busy batch, joined at different steps: N frames in, N - 1 frames out, each exactly
    the reference server's (first frame encoded then the encoder reset, LM stepped on every frame)."""
    engine = DuplexEngine(models.mimi, models.lm, batch_size=3, lm_gen_kwargs=GREEDY)
    audio_in = pipeline["audio_in"][:, 0].numpy()  # [2, 96000] = 50 frames each
    noise = (np.random.default_rng(0).standard_normal(20 * FRAME_SIZE) * 0.3).astype(np.float32)
    streams = {0: (0, audio_in[0]), 1: (0, noise), 2: (3, audio_in[1])}
    result = run_slots(engine, streams, steps=60)
    for slot, row in ((0, 0), (2, 1)):
        tokens, pcm = result[slot]
        assert tokens.shape == (9, 49)  # 50 frames in, Moshi's max_delay of 1
        ref_tokens, ref_pcm = reference_server_run(models, audio_in[row])
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_allclose(pcm, ref_pcm, atol=1e-5)
        # The second frame is encoded as a first frame, so the answer differs from the offline pipeline.
        assert not np.array_equal(tokens[1:], pipeline["audio_tokens"][row].numpy())


def test_first_frame_codes_have_no_effect_on_the_lm(models, pipeline):
    """Fixture check of the rule's LM part: the LM stepped on every frame, with frame 0's codes replaced
    by junk, produces exactly the pipeline's tokens (offset 0 reads only initial tokens)."""
    from duplex.model.generate import LMGen

    user_codes = pipeline["user_codes"].clone()  # [2, 8, 50]
    user_codes[:, :, 0] = torch.randint(0, models.lm.config.card, (2, 8))
    lm_gen = LMGen(models.lm, use_sampling=False)
    state = lm_gen.init_state(2)
    outputs = [lm_gen.step(user_codes[:, :, t:t + 1], state)[0] for t in range(50)]  # [2, 9, 1] each
    tokens = torch.cat(outputs[1:], dim=2)  # [2, 9, 49]: the valid steps
    assert bool((outputs[0] == -1).all())
    torch.testing.assert_close(tokens[:, :1], pipeline["text_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 1:], pipeline["audio_tokens"], rtol=0, atol=0)


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
    engine.reset_all()  # what the scheduler does after a failed step: every slot starts afresh
    after_reset = run_slots(engine, {0: (0, audio), 2: (1, noise)}, steps=12)
    np.testing.assert_array_equal(after_reset[0][0], solo[0])
    np.testing.assert_allclose(after_reset[0][1], solo[1], atol=1e-5)
    assert solo[0].shape == (9, 11)  # 12 frames: the LM delay of one step (the first frame's) leaves 11


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
    np.testing.assert_array_equal(runs[0][1:, 1].T, greedy)
    assert not np.array_equal(runs[0][1:, 0].T, greedy)  # sampling at temperature 1 differs from argmax


def test_a_new_occupant_gets_the_defaults_not_its_predecessors_settings(models):
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(8 * FRAME_SIZE) * 0.2).astype(np.float32)
    fresh = run_slots(DuplexEngine(models.mimi, models.lm, 1, GREEDY), {0: (0, audio)}, steps=8)[0][0]
    engine = DuplexEngine(models.mimi, models.lm, 1, GREEDY)
    engine.join(0, SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, seed=7))  # a sampling predecessor
    for step in range(3):
        engine.step(audio[None, step * FRAME_SIZE:(step + 1) * FRAME_SIZE])
    tokens = []
    engine.join(0)  # no settings: the engine's defaults (greedy here), not the predecessor's sampling
    for step in range(8):
        out = engine.step(audio[None, step * FRAME_SIZE:(step + 1) * FRAME_SIZE])
        if out.has_output[0]:
            tokens.append(out.tokens[0].copy())
    np.testing.assert_array_equal(np.stack(tokens, axis=1), fresh)


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
