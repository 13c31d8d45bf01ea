"""Masked streaming, per module: stepping with a ready mask equals stepping only the ready steps, bit for bit,
and a slot that is not ready keeps every tensor of its state."""

from __future__ import annotations

import pytest
import torch
from codec_util import load_tiny
from lm_test_utils import fixture_lm
from masking_util import assert_same_outputs, masked_run, ready_only_run, ready_patterns

from duplex.codec.conv import StreamingConv1d, StreamingConvTranspose1d
from duplex.model.generate import LMGen
from duplex.model.transformer import StreamingTransformer, TransformerConfig

BATCH = 5  # not a size of any other dimension, so that batch-first tensors are told apart
STEPS = 14


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return module.eval()


def check_module(step, make_state, inputs: torch.Tensor, seed: int = 0) -> None:
    pattern = ready_patterns(inputs.shape[0], inputs.shape[1], seed)
    with torch.inference_mode():
        masked = masked_run(step, make_state, inputs, pattern)
        reference = ready_only_run(step, make_state, inputs, pattern)
    assert_same_outputs(masked, reference)


@pytest.mark.parametrize(("kernel", "stride", "dilation", "pad_mode", "activate"), [
    (7, 1, 1, "constant", False), (3, 1, 2, "constant", True), (4, 2, 1, "replicate", False),
    (8, 4, 1, "replicate", True)])
def test_conv(kernel, stride, dilation, pad_mode, activate):
    conv = _randomized(StreamingConv1d(3, 4, kernel, stride, dilation=dilation, pad_mode=pad_mode))
    chunk = 2 * stride
    inputs = torch.randn(STEPS, BATCH, chunk, 3)  # [T, B, chunk, C]
    check_module(lambda x, state, ready: conv(x, state, activate=activate, ready=ready),
                 lambda: conv.init_state(BATCH, chunk), inputs)


@pytest.mark.parametrize("groups", [1, 4])
def test_transposed_conv(groups):
    convtr = _randomized(StreamingConvTranspose1d(4, 4, 6, 3, groups=groups))
    inputs = torch.randn(STEPS, BATCH, 2, 4)
    check_module(lambda x, state, ready: convtr(x, state, activate=True, ready=ready),
                 lambda: convtr.init_state(BATCH), inputs)


@pytest.mark.parametrize(("chunk", "context"), [(1, 4), (2, 3), (1, None)])
def test_transformer(chunk, context):
    model = _randomized(StreamingTransformer(TransformerConfig(
        d_model=16, num_heads=2, num_layers=2, dim_feedforward=24, context=context, gating="silu",
        norm="rms_norm_f32")))
    inputs = torch.randn(STEPS, BATCH, chunk, 16)
    check_module(lambda x, state, ready: model(x, state, ready),
                 lambda: model.init_state(BATCH, chunk_size=chunk, max_steps=8), inputs)


def test_transformer_with_per_step_weights():
    model = _randomized(StreamingTransformer(TransformerConfig(
        d_model=16, num_heads=2, num_layers=1, dim_feedforward=24, context=4, gating="silu", weights_per_step=3)))

    def step(x, state, ready):  # the depth transformer's use: a masked reset, then 3 steps
        if ready is None:
            state.reset_all()
        else:
            state.reset(ready)
            state.steps_since_full_reset = 0
        return torch.cat([model(x[:, k:k + 1], state, ready) for k in range(3)], dim=1)

    check_module(step, lambda: model.init_state(BATCH, max_steps=3), torch.randn(STEPS, BATCH, 3, 16))


def test_mimi_encoder_and_decoder(fixtures_dir):
    mimi = load_tiny(fixtures_dir)
    audio = 0.3 * torch.randn(8, BATCH, 1, mimi.frame_size)
    check_module(lambda x, state, ready: mimi.encode_step(x, state, ready=ready),
                 lambda: mimi.init_state(BATCH), audio)
    codes = torch.randint(0, mimi.cardinality, (8, BATCH, 8, 1))
    check_module(lambda x, state, ready: mimi.decode_step(x, state, ready=ready),
                 lambda: mimi.init_state(BATCH), codes, seed=1)


@pytest.mark.parametrize("sampling", [False, True])
def test_lm_gen(fixtures_dir, sampling):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    lm_gen = LMGen(lm, use_sampling=sampling, temp=1.0, temp_text=1.0, top_k=10, top_k_text=5)

    def make_state():
        state = lm_gen.init_state(BATCH)
        for slot in range(BATCH):
            state.set_slot_sampling(slot, seed=100 + slot, use_sampling=sampling or slot == 3)
        return state

    def step(codes, state, ready):
        return lm_gen.step(codes, state, ready=ready)[0]

    codes = torch.randint(0, lm.config.card, (STEPS, BATCH, lm.config.num_user_codebooks, 1))
    check_module(step, make_state, codes, seed=2)


def test_lm_gen_not_ready_slots_return_no_tokens(fixtures_dir):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    lm_gen = LMGen(lm, use_sampling=False)
    state = lm_gen.init_state(3)
    codes = torch.zeros(3, lm.config.num_user_codebooks, 1, dtype=torch.long)
    ready = torch.tensor([True, False, True])
    for _ in range(3):
        tokens, valid = lm_gen.step(codes, state, ready=ready)
    assert valid.tolist() == [True, False, True]
    assert bool((tokens[1] == -1).all()) and state.offsets.tolist() == [3, 0, 3]
    with pytest.raises(ValueError, match="ready must be a bool tensor of shape"):
        lm_gen.step(codes, state, ready=torch.ones(2, dtype=torch.bool))
