"""Sampling: greedy = argmax, top-k, temperature, per-slot seeds independent of batch neighbours."""

from __future__ import annotations

import pytest
import torch
from lm_test_utils import fixture_lm, random_user_codes, run

from duplex.model.generate import LMGen
from duplex.model.sampling import SlotSampling, gumbel_noise, mix32, sample_tokens, slot_keys

VOCAB = 50


def draw(logits, *, use_sampling=True, temp=1.0, top_k=0, clock=0, seeds=None):
    """Sample the audio stream of logits [B, V] with the same settings in every slot."""
    batch = logits.shape[0]
    sampling = SlotSampling.create(batch, "cpu", use_sampling=use_sampling, temp=temp, temp_text=temp,
                                   top_k=top_k, top_k_text=top_k)
    if seeds is not None:
        sampling.audio_seed.copy_(seeds)
    keys = slot_keys(sampling.audio_seed, torch.full((batch,), clock))
    plan = sampling.plan(sampling.audio, VOCAB)
    noise = None if plan is None else gumbel_noise(keys, torch.tensor([1]), mix32(torch.arange(VOCAB)))[:, 0]
    return sample_tokens(logits, plan, noise)


def test_greedy_is_argmax():
    logits = torch.randn(64, VOCAB)
    assert torch.equal(draw(logits, use_sampling=False), logits.argmax(-1))
    assert torch.equal(draw(logits, temp=0.0), logits.argmax(-1))  # temperature 0 = greedy


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(2000, VOCAB)
    tokens = draw(logits, top_k=5, temp=5.0)  # a hot temperature would pick anything if allowed
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == tokens[:, None]).any(-1).all()
    assert len(set(tokens.tolist())) > 5  # and it does sample: different slots, different picks


def test_low_temperature_approaches_greedy():
    logits = torch.randn(500, VOCAB)
    assert torch.equal(draw(logits, temp=1e-4, top_k=250), logits.argmax(-1))
    hot = (draw(logits, temp=2.0) != logits.argmax(-1)).float().mean()
    warm = (draw(logits, temp=0.3) != logits.argmax(-1)).float().mean()
    assert hot > warm > 0


def test_samples_follow_the_softmax():
    logits = torch.randn(VOCAB) * 1.5
    draws = 20000
    tokens = draw(logits.expand(draws, VOCAB).contiguous(), temp=0.7, seeds=torch.arange(draws) * 7919)
    frequencies = torch.bincount(tokens, minlength=VOCAB).float() / draws
    expected = torch.softmax(logits / 0.7, dim=-1)
    assert (frequencies - expected).abs().max() < 0.015


def test_seeds_and_clock_change_the_noise():
    logits = torch.zeros(1000, VOCAB)  # uniform: the pick is the noise alone
    a = draw(logits, seeds=torch.zeros(1000, dtype=torch.long), clock=3)
    assert torch.equal(a, draw(logits, seeds=torch.zeros(1000, dtype=torch.long), clock=3))
    assert len(set(a.tolist())) == 1  # same seed and clock in every slot: same draw
    assert not torch.equal(a, draw(logits, seeds=torch.zeros(1000, dtype=torch.long), clock=4))
    spread = draw(logits, seeds=torch.arange(1000), clock=3)
    assert len(set(spread.tolist())) > VOCAB * 0.9


@pytest.fixture(scope="module")
def lm_tiny(fixtures_dir):
    return fixture_lm(fixtures_dir, "lm_tiny")[0]


def test_fixed_seed_reproduces_and_ignores_neighbours(lm_tiny):
    user = random_user_codes(lm_tiny, 3, 16, seed=4)
    gen = LMGen(lm_tiny, use_sampling=True, temp=1.0, temp_text=1.0, top_k=20, top_k_text=20)
    state = gen.init_state(3)
    state.set_slot_sampling(0, seed=5, temp=1.5)
    state.set_slot_sampling(1, seed=42)
    state.set_slot_sampling(2, use_sampling=False)
    batch, _ = run(gen, state, user)
    solo_state = gen.init_state(1)
    solo_state.set_slot_sampling(0, seed=42)
    solo, _ = run(gen, solo_state, user[1:2])
    assert torch.equal(batch[1:2], solo)
    greedy_gen = LMGen(lm_tiny, use_sampling=False)
    greedy, _ = run(greedy_gen, greedy_gen.init_state(1), user[2:3])
    assert torch.equal(batch[2:3], greedy)
    other_state = gen.init_state(1)
    other_state.set_slot_sampling(0, seed=43)
    other, _ = run(gen, other_state, user[1:2])
    assert not torch.equal(other, solo)
    # A restarted slot with the same seed replays its conversation.
    solo_state.reset(torch.tensor([True]))
    again, _ = run(gen, solo_state, user[1:2])
    assert torch.equal(again, solo)


def _seeded_state(gen, **seeds):
    state = gen.init_state(2)
    for slot in range(2):
        state.set_slot_sampling(slot, **seeds)
    return state


@torch.inference_mode()
def test_audio_seed_never_changes_the_text_noise(lm_tiny):
    """Two runs differing only in audio_seed, the model's audio side teacher-forced to run a's tokens."""
    gen = LMGen(lm_tiny, use_sampling=True, temp=1.5, temp_text=1.5, top_k=0, top_k_text=0)
    a, b = _seeded_state(gen, seed=7), _seeded_state(gen, seed=7, audio_seed=8)
    user = random_user_codes(lm_tiny, 2, 24, seed=3)
    audio_differs = False
    for t in range(user.shape[-1]):
        hidden_a, text_a = gen.temporal_step(user[:, :, t:t + 1], a)
        hidden_b, text_b = gen.temporal_step(user[:, :, t:t + 1], b)
        assert torch.equal(text_a, text_b), f"text changed with audio_seed at step {t}"
        audio_a = gen.depth_step(hidden_a, text_a, a)
        audio_differs |= not torch.equal(audio_a, gen.depth_step(hidden_b, text_b, b))
        gen.finish_step(text_a, audio_a, a)
        gen.finish_step(text_b, audio_a, b)  # b is fed a's audio tokens
    assert audio_differs


@torch.inference_mode()
def test_text_seed_never_changes_the_audio_noise(lm_tiny):
    """Two runs differing only in text_seed, the text token teacher-forced to run a's."""
    gen = LMGen(lm_tiny, use_sampling=True, temp=1.5, temp_text=1.5, top_k=0, top_k_text=0)
    a, b = _seeded_state(gen, audio_seed=5, text_seed=1), _seeded_state(gen, audio_seed=5, text_seed=2)
    user = random_user_codes(lm_tiny, 2, 24, seed=3)
    text_differs = False
    for t in range(user.shape[-1]):
        hidden_a, text_a = gen.temporal_step(user[:, :, t:t + 1], a)
        hidden_b, text_b = gen.temporal_step(user[:, :, t:t + 1], b)
        text_differs |= not torch.equal(text_a, text_b)
        audio_a = gen.depth_step(hidden_a, text_a, a)
        audio_b = gen.depth_step(hidden_b, text_a, b)  # b's depth transformer sees a's text token
        assert torch.equal(audio_a, audio_b), f"audio changed with text_seed at step {t}"
        gen.finish_step(text_a, audio_a, a)
        gen.finish_step(text_a, audio_b, b)
    assert text_differs


def test_seed_sets_both_streams(lm_tiny):
    state = LMGen(lm_tiny).init_state(2)
    state.set_slot_sampling(1, seed=11)
    assert state.sampling.text_seed.tolist() == [0, 11] and state.sampling.audio_seed.tolist() == [0, 11]
    state.set_slot_sampling(1, seed=12, audio_seed=13)
    assert state.sampling.text_seed[1] == 12 and state.sampling.audio_seed[1] == 13
    state.set_slot_sampling(1, text_seed=14)
    assert state.sampling.text_seed[1] == 14 and state.sampling.audio_seed[1] == 13


def test_bad_sampling_settings_are_refused(lm_tiny):
    state = LMGen(lm_tiny).init_state(2)
    for kwargs in ({"temp": -1.0}, {"top_k": 2.5}, {"top_k_text": -3}, {"temp_text": float("nan")},
                   {"seed": 1.5}, {"audio_seed": 2**64}):
        with pytest.raises(ValueError):
            state.set_slot_sampling(0, **kwargs)
    with pytest.raises(ValueError, match="slot"):
        state.set_slot_sampling(2, temp=1.0)
    with pytest.raises(ValueError):
        LMGen(lm_tiny, temp=-0.5)
