"""Streaming equals offline (past the attention context, batched, any chunking), per-slot resets, causality."""

from __future__ import annotations

import pytest
import torch
from codec_util import assert_codes_match, load_tiny, load_tiny_io

FRAME = 1920


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return load_tiny(fixtures_dir, num_codebooks=16)


@pytest.fixture(scope="module")
def audio(fixtures_dir):
    return load_tiny_io(fixtures_dir)["audio"]  # [2, 1, 96000]: 50 frames, 100 transformer steps > context 10


def stream_encode(mimi, audio, state=None):
    state = state or mimi.init_state(audio.shape[0])
    return torch.cat([mimi.encode_step(frame, state) for frame in audio.split(FRAME, dim=-1)], dim=-1)


def stream_decode(mimi, codes, state=None):
    state = state or mimi.init_state(codes.shape[0])
    return torch.cat([mimi.decode_step(codes[:, :, t : t + 1], state) for t in range(codes.shape[-1])], dim=-1)


def test_streaming_equals_offline_past_context(tiny, audio):
    offline_codes = tiny.encode(audio)
    state = tiny.init_state(2)
    codes = stream_encode(tiny, audio, state)
    assert codes.shape == (2, 16, 50)
    assert torch.equal(codes, offline_codes)
    decoded = stream_decode(tiny, codes, state)  # the same state object carries the decoder side too
    assert decoded.shape == (2, 1, 96000)
    assert (decoded - tiny.decode(codes)).abs().max() < 1e-5


@pytest.mark.parametrize("chunk_frames", [3, 7, 50])
def test_offline_chunking_does_not_change_results(tiny, audio, chunk_frames):
    reference_latent = tiny.encode_latent(audio)
    reference_codes = tiny.encode(audio)
    reference_audio = tiny.decode(reference_codes)
    tiny.offline_chunk_frames = chunk_frames
    try:
        latent = tiny.encode_latent(audio)
        codes = tiny.encode(audio)
        decoded = tiny.decode(reference_codes)
    finally:
        tiny.offline_chunk_frames = 1
    assert (latent - reference_latent).abs().max() < 1e-5
    assert torch.equal(codes[:, :8], reference_codes[:, :8])
    assert_codes_match(tiny, reference_latent, codes, reference_codes)
    assert (decoded - reference_audio).abs().max() < 1e-5


def test_batch_slots_are_independent(tiny, audio):
    both = tiny.encode(audio)
    second_alone = tiny.encode(audio[1:])
    latent = tiny.encode_latent(audio[1:])
    assert_codes_match(tiny, latent, second_alone, both[1:])
    assert (tiny.decode(both)[1:] - tiny.decode(both[1:])).abs().max() < 1e-5


def test_reset_one_slot_mid_stream(tiny, audio):
    """Slot 0 restarts on new audio after 20 frames; slot 1 carries on."""
    torch.manual_seed(0)
    new_audio = 0.3 * torch.randn(1, 1, 30 * FRAME)
    state = tiny.init_state(2)
    first = stream_encode(tiny, audio[:, :, : 20 * FRAME], state)
    stream_decode(tiny, first, state)
    state.reset(torch.tensor([True, False]))
    mixed = torch.cat([new_audio, audio[1:, :, 20 * FRAME :]], dim=0)  # [2, 1, 30 frames]
    codes = stream_encode(tiny, mixed, state)
    decoded = stream_decode(tiny, codes, state)

    fresh_codes = tiny.encode(new_audio)
    assert_codes_match(tiny, tiny.encode_latent(new_audio), codes[:1], fresh_codes)
    assert (decoded[:1] - tiny.decode(codes[:1])).abs().max() < 1e-5
    uninterrupted = tiny.encode(audio)
    assert torch.equal(codes[1:], uninterrupted[1:, :, 20:])
    assert (decoded[1:] - tiny.decode(uninterrupted[1:])[:, :, 20 * FRAME :]).abs().max() < 1e-5


def test_reset_encoder_only_keeps_decoder_running(tiny, audio):
    codes = tiny.encode(audio)
    state = tiny.init_state(2)
    stream_encode(tiny, audio[:, :, : 5 * FRAME], state)
    first = stream_decode(tiny, codes[:, :, :5], state)
    state.reset_encoder(torch.tensor([False, True]))
    continued = stream_encode(tiny, audio[:, :, 5 * FRAME : 15 * FRAME], state)
    rest = stream_decode(tiny, codes[:, :, 5:], state)
    assert (torch.cat([first, rest], dim=-1) - tiny.decode(codes)).abs().max() < 1e-5  # decoders untouched
    assert torch.equal(continued[:1], codes[:1, :, 5:15])  # slot 0 goes on
    restarted = audio[1:, :, 5 * FRAME : 15 * FRAME]
    assert_codes_match(tiny, tiny.encode_latent(restarted), continued[1:], tiny.encode(restarted))


def test_reset_decoder_only(tiny, audio):
    codes = tiny.encode(audio[:, :, : 12 * FRAME])
    state = tiny.init_state(2)
    stream_decode(tiny, codes[:, :, :6], state)
    state.reset_decoder(torch.tensor([True, False]))
    rest = stream_decode(tiny, codes[:, :, 6:], state)
    assert (rest[:1] - tiny.decode(codes[:1, :, 6:])).abs().max() < 1e-5  # restarted
    assert (rest[1:] - tiny.decode(codes[1:])[:, :, 6 * FRAME :]).abs().max() < 1e-5  # carried on


def test_encoder_is_causal(tiny, audio):
    changed = audio.clone()
    cut = 17 * FRAME + 500
    changed[:, :, cut:] = torch.randn_like(changed[:, :, cut:])
    before, after = tiny.encode(audio), tiny.encode(changed)
    assert torch.equal(before[:, :, :17], after[:, :, :17])
    assert not torch.equal(before[:, :, 18:], after[:, :, 18:])


def test_decoder_is_causal(tiny, audio):
    codes = tiny.encode(audio)
    changed = codes.clone()
    changed[:, :, 23:] = torch.randint(0, tiny.cardinality, changed[:, :, 23:].shape)
    before, after = tiny.decode(codes), tiny.decode(changed)
    assert torch.equal(before[:, :, : 23 * FRAME], after[:, :, : 23 * FRAME])
    assert not torch.equal(before[:, :, 23 * FRAME :], after[:, :, 23 * FRAME :])


def test_encode_pads_the_tail(tiny, audio):
    part = audio[:, :, : 10 * FRAME + 7]
    codes = tiny.encode(part)
    assert codes.shape == (2, 16, 11)
    padded = torch.nn.functional.pad(part, (0, FRAME - 7))
    assert torch.equal(codes, tiny.encode(padded))
    assert torch.equal(codes[:, :, :10], tiny.encode(audio)[:, :, :10])


def test_num_codebooks_setting(tiny, audio):
    try:
        tiny.num_codebooks = 1
        codes = tiny.encode(audio[:, :, : 4 * FRAME])
        assert codes.shape == (2, 1, 4)
        assert tiny.decode(codes).shape == (2, 1, 4 * FRAME)
        state = tiny.init_state(2)
        assert tiny.encode_step(audio[:, :, :FRAME], state).shape == (2, 1, 1)
    finally:
        tiny.num_codebooks = 16


def test_streaming_steps_never_sync_off_the_cpu(fixtures_dir):
    """On a device, encode_step/decode_step skip the value checks that would block on a host copy.

    The meta device stands in for an accelerator: reading a value there raises, as a sync would cost.
    """
    mimi = load_tiny(fixtures_dir).to("meta")
    state = mimi.init_state(2)
    frame = torch.full((2, 1, FRAME), float("nan"), device="meta")
    assert mimi.encode_step(frame, state).shape == (2, 8, 1)
    assert mimi.decode_step(torch.zeros(2, 8, 1, dtype=torch.long, device="meta"), state).shape == (2, 1, FRAME)


def test_streaming_validation_switch(tiny):
    state = tiny.init_state(1)
    nan_frame = torch.full((1, 1, FRAME), float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny.encode_step(nan_frame, state)  # CPU input: checked by default
    tiny.encode_step(nan_frame, state, validate=False)  # the fast path trusts its caller
    with pytest.raises(ValueError, match=r"0\.\.63"):
        tiny.decode_step(torch.full((1, 16, 1), 64), state)
    tiny.decode_step(torch.full((1, 16, 1), 3), state, validate=False)
