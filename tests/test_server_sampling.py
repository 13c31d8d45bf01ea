"""Query parameters resolve per stream (text, audio), and the two seeds key independent noise."""

from __future__ import annotations

import numpy as np
import pytest
from server_harness import load_tiny_models

from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotSampling
from duplex.server.protocol import SessionParams
from duplex.server.service import resolve_sampling

SAMPLING_DEFAULTS = {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
GREEDY_DEFAULTS = {**SAMPLING_DEFAULTS, "use_sampling": False}


def modes(params: SessionParams, defaults: dict) -> tuple[bool, bool, float, float]:
    sampling, resolved = resolve_sampling(params, defaults)
    assert sampling.use_sampling == (resolved["text_sampling"] or resolved["audio_sampling"])
    return resolved["text_sampling"], resolved["audio_sampling"], sampling.temp_text, sampling.temp


def test_a_temperature_of_zero_makes_only_its_stream_greedy():
    assert modes(SessionParams(text_temperature=0.0), SAMPLING_DEFAULTS) == (False, True, 0.0, 0.8)
    assert modes(SessionParams(audio_temperature=0.0), SAMPLING_DEFAULTS) == (True, False, 0.7, 0.0)
    assert modes(SessionParams(text_temperature=0.0, audio_temperature=0.0), SAMPLING_DEFAULTS)[:2] == (False, False)
    assert resolve_sampling(SessionParams(text_temperature=0.0, audio_temperature=0.0),
                            SAMPLING_DEFAULTS)[0].use_sampling is False


def test_a_parameter_for_one_stream_never_turns_the_other_on():
    assert modes(SessionParams(audio_topk=5), GREEDY_DEFAULTS) == (False, True, 0.0, 0.8)
    assert modes(SessionParams(text_temperature=1.2), GREEDY_DEFAULTS) == (True, False, 1.2, 0.0)
    assert modes(SessionParams(text_topk=10), GREEDY_DEFAULTS)[:2] == (True, False)
    assert modes(SessionParams(), GREEDY_DEFAULTS)[:2] == (False, False)
    assert modes(SessionParams(), SAMPLING_DEFAULTS) == (True, True, 0.7, 0.8)


def test_seeds_are_separate_and_reported():
    sampling, resolved = resolve_sampling(SessionParams(text_seed=5), SAMPLING_DEFAULTS)
    assert sampling.text_seed == 5 and resolved["text_seed"] == 5
    assert isinstance(sampling.audio_seed, int) and resolved["audio_seed"] == sampling.audio_seed  # picked


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def run_tokens(models, slots: list[SlotSampling], audio: np.ndarray) -> np.ndarray:
    """Every slot hears ``audio``; -> tokens [B, steps, 9] of the valid steps."""
    engine = DuplexEngine(models.mimi, models.lm, len(slots), {"use_sampling": False})
    for slot, sampling in enumerate(slots):
        engine.join(slot, sampling)
    steps = []
    for t in range(audio.size // FRAME_SIZE):
        frames = np.stack([audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE]] * len(slots))  # [B, 1920]
        out = engine.step(frames)
        if out.has_output.all():
            steps.append(out.tokens.copy())
    return np.stack(steps, axis=1)


def test_each_seed_keys_only_its_own_stream(models):
    """Text sampled, audio greedy: the audio seed cannot change anything; and the other way round."""
    audio = (np.random.default_rng(3).standard_normal(12 * FRAME_SIZE) * 0.2).astype(np.float32)
    text_only = dict(use_sampling=True, temp_text=1.0, temp=0.0, top_k_text=0)
    audio_only = dict(use_sampling=True, temp_text=0.0, temp=1.0, top_k=0)
    tokens = run_tokens(models, [
        SlotSampling(**text_only, text_seed=1, audio_seed=1),
        SlotSampling(**text_only, text_seed=1, audio_seed=2),
        SlotSampling(**text_only, text_seed=3, audio_seed=1),
        SlotSampling(**audio_only, text_seed=1, audio_seed=1),
        SlotSampling(**audio_only, text_seed=2, audio_seed=1),
        SlotSampling(**audio_only, text_seed=1, audio_seed=3),
    ], audio)
    np.testing.assert_array_equal(tokens[0], tokens[1])  # another audio seed: identical
    assert not np.array_equal(tokens[0, :, 0], tokens[2, :, 0])  # another text seed: other text
    np.testing.assert_array_equal(tokens[3], tokens[4])  # another text seed: identical
    assert not np.array_equal(tokens[3, :, 1:], tokens[5, :, 1:])  # another audio seed: other audio
