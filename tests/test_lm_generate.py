"""Streaming generation: equals the teacher-forced pass, per-slot resets, long streams, bad input."""

from __future__ import annotations

import pytest
import torch
from lm_test_utils import assert_streaming_equals_forward, fixture_lm, random_lm, random_user_codes, run

from duplex.model.generate import LMGen


@pytest.fixture(scope="module", params=["lm_tiny", "lm_options_tiny"])
def fixture_model(request, fixtures_dir):
    return fixture_lm(fixtures_dir, request.param)[0]


def test_streaming_equals_teacher_forced_past_context(fixture_model):
    steps = 3 * (fixture_model.config.context or 10) + 4  # well past the sliding window
    assert_streaming_equals_forward(fixture_model, random_user_codes(fixture_model, 2, steps))


def test_reset_one_slot_mid_stream(fixture_model):
    gen = LMGen(fixture_model, use_sampling=False)
    user = random_user_codes(fixture_model, 3, 30, seed=5)
    uninterrupted, _ = run(gen, gen.init_state(3), user)
    state = gen.init_state(3)
    first, _ = run(gen, state, user[:, :, :12])
    state.reset(torch.tensor([False, True, False]))
    second, valid = run(gen, state, user[:, :, 12:])
    assert valid[1, :gen.max_delay].logical_not().all() and valid[1, gen.max_delay:].all() and valid[0].all()
    fresh, _ = run(gen, gen.init_state(1), user[1:2, :, 12:])
    assert torch.equal(second[1:2], fresh)
    for slot in (0, 2):
        assert torch.equal(torch.cat([first, second], dim=2)[slot], uninterrupted[slot])


def test_slot_output_does_not_depend_on_neighbours(fixture_model):
    gen = LMGen(fixture_model, use_sampling=False)
    user = random_user_codes(fixture_model, 3, 20, seed=9)
    batch, _ = run(gen, gen.init_state(3), user)
    alone, _ = run(gen, gen.init_state(1), user[2:3])
    assert torch.equal(batch[2:3], alone)


def test_long_stream_keeps_fixed_memory(fixtures_dir):
    lm, _ = fixture_lm(fixtures_dir, "lm_options_tiny")  # context 6
    gen = LMGen(lm, use_sampling=False)
    state = gen.init_state(1)
    sizes = [t.numel() for t in (state.cache, *state.temporal.keys, *state.temporal.values)]
    tokens, valid = run(gen, state, random_user_codes(lm, 1, 200))
    assert valid[0, gen.max_delay:].all() and (tokens[:, :, gen.max_delay:] >= 0).all()
    assert sizes == [t.numel() for t in (state.cache, *state.temporal.keys, *state.temporal.values)]
    assert state.temporal.capacity == lm.config.context


def test_user_codes_are_checked(fixture_model):
    gen = LMGen(fixture_model, use_sampling=False)
    state = gen.init_state(2)
    with pytest.raises(ValueError, match="user_codes"):
        gen.step(torch.zeros(2, gen.num_user_codebooks + 1, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="user_codes"):
        gen.step(torch.zeros(1, gen.num_user_codebooks, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="integer"):
        gen.step(torch.zeros(2, gen.num_user_codebooks, 1), state)
    with pytest.raises(ValueError, match="audio tokens"):
        gen.step(torch.full((2, gen.num_user_codebooks, 1), 10_000), state)
    with pytest.raises(ValueError, match="reset mask"):
        state.reset(torch.tensor([True]))


def test_public_attributes(fixture_model):
    gen = LMGen(fixture_model)
    config = fixture_model.config
    assert gen.lm is fixture_model and gen.dep_q == config.dep_q
    assert gen.num_user_codebooks == config.n_q - config.dep_q and gen.max_delay == max(config.delays)
    tokens, valid = gen.step(torch.zeros(2, gen.num_user_codebooks, 1, dtype=torch.long), gen.init_state(2))
    assert tokens.shape == (2, 1 + config.dep_q, 1) and tokens.dtype == torch.long
    assert valid.shape == (2,) and valid.dtype == torch.bool


def test_bfloat16_streams_and_outputs_are_ordinary_tensors():
    lm = random_lm().to(torch.bfloat16)
    gen = LMGen(lm)
    state = gen.init_state(2)
    tokens, valid = run(gen, state, random_user_codes(lm, 2, 8))
    assert (tokens[:, :, gen.max_delay:] >= 0).all() and valid[:, gen.max_delay:].all()
    tokens[:, 0] = 0  # usable outside inference mode
    assert not tokens.is_inference()


def test_future_input_never_changes_past_output(fixture_model):
    gen = LMGen(fixture_model, use_sampling=True)
    user = random_user_codes(fixture_model, 1, 16, seed=2)
    changed = user.clone()
    changed[:, :, 10:] = random_user_codes(fixture_model, 1, 6, seed=3)
    a, _ = run(gen, gen.init_state(1), user)
    b, _ = run(gen, gen.init_state(1), changed)
    assert torch.equal(a[:, :, :10], b[:, :, :10])
    assert not torch.equal(a[:, :, 10:], b[:, :, 10:])


def test_generation_builds_depth_inputs_with_the_model_method(fixture_model, monkeypatch):
    """One definition of the depth transformer's input, shared by forward() and generation."""
    calls, projections = [], []
    original_input, original_projection = fixture_model.depformer_input, fixture_model.depformer_projection

    def counted_input(codebook, hidden, previous, **kwargs):
        calls.append(codebook)
        return original_input(codebook, hidden, previous, **kwargs)

    def counted_projection(codebook, hidden):
        projections.append(codebook)
        return original_projection(codebook, hidden)

    monkeypatch.setattr(fixture_model, "depformer_input", counted_input)
    monkeypatch.setattr(fixture_model, "depformer_projection", counted_projection)
    gen = LMGen(fixture_model, use_sampling=False)
    gen.step(torch.zeros(1, gen.num_user_codebooks, 1, dtype=torch.long), gen.init_state(1))
    assert calls == list(range(gen.dep_q))
    assert len(projections) == fixture_model.config.num_depformer_inputs  # each projection once per step
