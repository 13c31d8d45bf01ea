"""Every supported config option builds, runs the forward pass and streams exactly like it."""

from __future__ import annotations

import pytest
import torch
from lm_test_utils import assert_streaming_equals_forward, random_lm, random_user_codes

from duplex.model.generate import LMGen

VARIANTS = {
    "base": {},
    "layer_norm": {"norm": "layer_norm"},
    "rms_norm": {"norm": "rms_norm"},
    "gating_none": {"gating": "none"},
    "gating_gelu": {"gating": "gelu", "depformer_gating": "gelu"},
    "sin_positions": {"positional_embedding": "sin", "depformer_pos_emb": "sin"},
    "no_positions": {"positional_embedding": "none", "depformer_pos_emb": "rope"},
    "layer_scale": {"layer_scale": 0.2, "depformer_layer_scale": 0.3},
    "schedule": {"depformer_weights_per_step_schedule": (0, 1, 1)},
    "shared_depth_weights": {"depformer_weights_per_step": False, "depformer_gating": "none"},
    "low_rank": {"depformer_low_rank_embeddings": 4},
    "single_linear": {"depformer_multi_linear": False},
    "few_model_streams": {"n_q": 7, "dep_q": 2, "delays": (0, 0, 1, 0, 2, 1, 1, 0)},
    "unlimited_context": {"context": None},
    "no_delays": {"delays": (0,) * 7},
    "own_text_padding": {"existing_text_padding_id": None},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_option_builds_forwards_and_streams(variant):
    lm = random_lm(**VARIANTS[variant])
    config = lm.config
    codes = torch.randint(0, config.card, (2, config.num_codebooks, 9))
    codes[:, 0] = torch.randint(0, config.text_card, (2, 9))
    with torch.no_grad():
        out = lm(codes)
    assert out.logits.shape == (2, config.dep_q, 9, config.card)
    assert out.text_logits.shape == (2, 1, 9, config.text_out_card)
    assert torch.isfinite(out.logits[out.mask]).all()
    assert_streaming_equals_forward(lm, random_user_codes(lm, 2, 14))


def test_options_change_the_structure():
    keys = {name: set(random_lm(**change).state_dict()) for name, change in VARIANTS.items()}
    assert "depformer_emb.0.low_rank.weight" in keys["low_rank"] - keys["base"]
    assert "depformer_in.2.weight" in keys["base"] - keys["schedule"]
    assert "depformer_in.1.weight" in keys["base"] - keys["single_linear"]
    assert "transformer.layers.0.layer_scale_1.scale" in keys["layer_scale"]
    assert "transformer.layers.0.linear1.weight" in keys["gating_none"]
    assert random_lm(existing_text_padding_id=None).text_linear.out_features == 31


def test_missing_token_id_embeds_to_zero():
    lm = random_lm()
    codes = torch.randint(0, lm.config.card, (1, lm.config.num_codebooks, 6))
    silent = codes.clone()
    silent[:, 5] = -1  # a user stream with no input
    with torch.no_grad():
        assert torch.isfinite(lm(silent).logits[lm(silent).mask]).all()
        assert not torch.equal(lm(silent).logits, lm(codes).logits)
        codes[:, 1, 2] = -1
        assert not lm(codes).mask[0, 0, 2]  # a missing target is masked out


def test_unlimited_context_streams_exactly_up_to_max_steps():
    lm = random_lm(context=None)
    assert_streaming_equals_forward(lm, random_user_codes(lm, 2, 12), max_steps=12)


def test_unlimited_context_slides_past_max_steps_with_resets():
    """An LM without context streams forever: past max_steps it attends to the last max_steps steps
    (exactly like the same weights with context=max_steps), slots restarting at their own times."""
    window, steps = 6, 40
    unlimited, windowed = random_lm(context=None), random_lm(context=window)  # same weights
    user = random_user_codes(unlimited, 2, steps, seed=3)
    outputs = []
    for lm in (unlimited, windowed):
        gen = LMGen(lm, use_sampling=False)
        state = gen.init_state(2, max_steps=window)
        tokens = []
        for t in range(steps):
            if t > 0 and t % 15 == 0:
                state.reset(torch.tensor([True, False]))  # slot 1 runs all 40 steps
            tokens.append(gen.step(user[:, :, t:t + 1], state)[0])
        assert state.temporal.capacity == window
        outputs.append(torch.cat(tokens, dim=2))
    assert (outputs[0][:, :, -5:] >= 0).all()
    assert torch.equal(outputs[0], outputs[1])


def test_forward_trains():
    lm = random_lm().train()
    codes = torch.randint(0, lm.config.card, (2, lm.config.num_codebooks, 9))
    out = lm(codes)
    targets = codes[:, 1:1 + lm.config.dep_q]
    loss = torch.nn.functional.cross_entropy(out.logits[out.mask], targets[out.mask])
    loss = loss + torch.nn.functional.cross_entropy(out.text_logits[out.text_mask], codes[:, :1][out.text_mask])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())
