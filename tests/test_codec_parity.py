"""Mimi reproduces the reference outputs of the `mimi_tiny` fixture (README tolerances)."""

from __future__ import annotations

import pytest
import torch
from codec_util import assert_codes_match, load_tiny, load_tiny_io

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return load_tiny(fixtures_dir)


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return load_tiny_io(fixtures_dir)


@pytest.fixture(scope="module")
def latent(tiny, io):
    return tiny.encode_latent(io["audio"])


def test_unquantized_latent_matches_reference(latent, io):
    assert latent.shape == io["latent_unquantized"].shape == (2, 32, 50)
    assert (latent - io["latent_unquantized"]).abs().max() < TOL


@pytest.mark.parametrize("num_codebooks", [8, 16])
def test_codes_match_reference(tiny, io, latent, num_codebooks):
    tiny.num_codebooks = num_codebooks
    try:
        codes = tiny.encode(io["audio"])
    finally:
        tiny.num_codebooks = 8
    ref = io[f"codes_q{num_codebooks}"]
    assert codes.dtype == torch.int64 and codes.shape == ref.shape
    assert torch.equal(codes[:, :8], ref[:, :8]), "the first 8 codebooks must be identical"
    assert_codes_match(tiny, latent, codes, ref)


@pytest.mark.parametrize("num_codebooks", [8, 16])
def test_dequantized_latent_matches_reference(tiny, io, num_codebooks):
    quantized = tiny.dequantize(io[f"codes_q{num_codebooks}"])
    assert quantized.shape == (2, 32, 50)
    assert (quantized - io[f"latent_q{num_codebooks}"]).abs().max() < TOL


@pytest.mark.parametrize("num_codebooks", [8, 16])
def test_decoded_audio_matches_reference(tiny, io, num_codebooks):
    audio = tiny.decode(io[f"codes_q{num_codebooks}"])
    ref = io[f"decoded_q{num_codebooks}"]
    assert audio.dtype == torch.float32 and audio.shape == ref.shape == (2, 1, 96000)
    assert (audio - ref).abs().max() < TOL


def test_codec_constants(tiny):
    assert tiny.sample_rate == 24000
    assert tiny.frame_rate == 12.5
    assert tiny.frame_size == 1920
    assert tiny.total_codebooks == 16
    assert tiny.num_codebooks == 8


def test_bfloat16_load_stays_close(fixtures_dir, io):
    folder = fixtures_dir / "mimi_tiny"
    from duplex.codec import Mimi

    mimi = Mimi.from_pretrained(folder / "model.safetensors", config=folder / "config.json", dtype=torch.bfloat16)
    assert mimi.downsample.conv.conv.conv.weight.dtype == torch.bfloat16
    audio = mimi.decode(io["codes_q8"][:, :, :10])
    assert audio.dtype == torch.float32
    assert (audio - io["decoded_q8"][:, :, : 10 * 1920]).abs().max() < 0.05
