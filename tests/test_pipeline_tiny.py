"""End to end on the tiny fixtures: audio -> Mimi codes -> greedy LM steps -> Mimi audio, as the reference."""

from __future__ import annotations

import torch
from lm_test_utils import fixture_lm, run
from safetensors.torch import load_file

from duplex.codec.mimi import Mimi
from duplex.model.generate import LMGen


def test_pipeline_matches_reference(fixtures_dir):
    io = load_file(str(fixtures_dir / "pipeline_tiny" / "io.safetensors"))
    folder = fixtures_dir / "mimi_tiny"
    mimi = Mimi.from_pretrained(folder / "model.safetensors", config=folder / "config.json", num_codebooks=8)
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    user_codes = mimi.encode(io["audio_in"])
    assert torch.equal(user_codes, io["user_codes"])
    gen = LMGen(lm, use_sampling=False)
    tokens, valid = run(gen, gen.init_state(2), user_codes)
    assert valid[:, gen.max_delay:].all()
    tokens = tokens[:, :, gen.max_delay:]  # [2, 9, 49]
    assert torch.equal(tokens[:, :1], io["text_tokens"])
    assert torch.equal(tokens[:, 1:], io["audio_tokens"])
    audio = mimi.decode(tokens[:, 1:])
    assert audio.shape == io["audio_out"].shape
    torch.testing.assert_close(audio, io["audio_out"], atol=1e-4, rtol=0)
