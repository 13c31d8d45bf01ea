"""Parity with the reference implementation on the lm_tiny and lm_options_tiny fixtures."""

from __future__ import annotations

import pytest
import torch
from lm_test_utils import fixture_lm, run

from duplex.model.generate import LMGen

FIXTURES = ["lm_tiny", "lm_options_tiny"]


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_matches_reference(fixtures_dir, name):
    lm, io = fixture_lm(fixtures_dir, name)
    with torch.no_grad():
        out = lm(io["codes"])
    assert torch.equal(out.mask, io["mask"])
    assert torch.equal(out.text_mask, io["text_mask"])
    for ours, ref, mask in ((out.logits, io["logits"], io["mask"]),
                            (out.text_logits, io["text_logits"], io["text_mask"])):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
        assert torch.isnan(ours[~mask]).all()


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_generation_matches_reference(fixtures_dir, name):
    lm, io = fixture_lm(fixtures_dir, name)
    gen = LMGen(lm, use_sampling=False)
    assert gen.num_user_codebooks == io["gen_user_codes"].shape[1]
    tokens, valid = run(gen, gen.init_state(2), io["gen_user_codes"])
    steps = io["gen_user_codes"].shape[-1]
    assert valid.tolist() == [[t >= gen.max_delay for t in range(steps)]] * 2
    assert (tokens[:, :, :gen.max_delay] == -1).all()
    assert torch.equal(tokens[:, :, gen.max_delay:], io["gen_output"])


def test_lm_gen_config_is_greedy(fixtures_dir):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    assert lm.config.extra["lm_gen_config"]["use_sampling"] is False
