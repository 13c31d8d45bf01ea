"""Causal (transposed) convolutions and SEANet: reference semantics, any chunking, per-slot reset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from duplex.codec.config import SeanetConfig
from duplex.codec.conv import StreamingConv1d, StreamingConvTranspose1d
from duplex.codec.seanet import SeanetDecoder, SeanetEncoder


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return module


def _chunked(module, x: torch.Tensor, lengths: list[int], state) -> torch.Tensor:
    outputs, start = [], 0
    for length in lengths:
        outputs.append(module(x[:, start : start + length], state))
        start += length
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize(("kernel", "stride", "dilation"), [(7, 1, 1), (3, 1, 2), (8, 4, 1), (12, 6, 1), (1, 1, 1)])
@pytest.mark.parametrize("packed", [False, True])
def test_conv_matches_left_padded_conv1d(kernel, stride, dilation, packed):
    conv = _randomize(StreamingConv1d(5, 6, kernel, stride, dilation=dilation))
    if packed:
        conv.pack_()
    x = torch.randn(2, 24 * stride, 5)  # [B, T, C]
    history = (kernel - 1) * dilation + 1 - stride
    weight, bias = conv.conv.conv.weight, conv.conv.conv.bias
    expected = F.conv1d(F.pad(x.transpose(1, 2), (history, 0)), weight, bias, stride, dilation=dilation)
    with torch.no_grad():
        assert torch.allclose(conv(x), expected.transpose(1, 2), atol=1e-5)
        state = conv.init_state(2, 2 * stride)
        chunks = [2 * stride, stride, 5 * stride, 2 * stride, 14 * stride]  # preallocated and other lengths
        assert torch.allclose(_chunked(conv, x, chunks, state), expected.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_shifted_path_with_fused_elu(packed):
    """Long stride-1 convs with enough channels take the shifted-product path; ELU can be fused in."""
    assert StreamingConv1d(16, 8, 3, dilation=2)._shifted_ok(128)
    conv = _randomize(StreamingConv1d(16, 8, 3, dilation=2))
    if packed:
        conv.pack_()
    x = torch.randn(2, 192, 16)
    expected = F.conv1d(F.pad(F.elu(x).transpose(1, 2), (4, 0)), conv.conv.conv.weight, conv.conv.conv.bias, dilation=2)
    expected = expected.transpose(1, 2)
    with torch.no_grad():
        assert torch.allclose(conv(x, activate=True), expected, atol=1e-5)
        state = conv.init_state(2, 128)
        outputs = [conv(x[:, :128], state, activate=True), conv(x[:, 128:], state, activate=True)]
        assert torch.allclose(torch.cat(outputs, dim=1), expected, atol=1e-5)


def test_elu_into_matches_torch_elu():
    from duplex.codec.conv import elu_into

    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([0.0, -0.0, 1e-8, -1e-8])]).view(1, -1, 1)
    buffer = torch.zeros(1, x.shape[1] + 3, 1)
    elu_into(x, buffer[:, 3:])
    assert (buffer[:, 3:] - F.elu(x)).abs().max() < 1e-7


def test_strided_shifted_path():
    conv = _randomize(StreamingConv1d(8, 4, 6, 3))
    assert conv._shifted_ok(128)
    x = torch.randn(2, 3 * 160, 8)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.conv.conv.weight, conv.conv.conv.bias, 3)
    with torch.no_grad():
        conv.pack_()
        state = conv.init_state(2, 3 * 130)
        out = torch.cat([conv(x[:, : 3 * 130], state), conv(x[:, 3 * 130 :], state)], dim=1)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)


def test_replicate_padding_and_reset():
    conv = _randomize(StreamingConv1d(4, 4, 4, 2, bias=False, pad_mode="replicate"))
    x = torch.randn(2, 10, 4)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (2, 0), mode="replicate"), conv.conv.conv.weight, None, 2)
    with torch.no_grad():
        state = conv.init_state(2, 2)
        assert torch.allclose(_chunked(conv, x, [2] * 5, state), expected.transpose(1, 2), atol=1e-5)
        state.reset(torch.tensor([True, False]))
        again = conv(x[:, :2], state)
    assert torch.allclose(again[0], expected.transpose(1, 2)[0, :1], atol=1e-5)  # slot 0 starts afresh
    assert not torch.allclose(again[1], expected.transpose(1, 2)[1, :1], atol=1e-5)  # slot 1 carries history


@pytest.mark.parametrize(("kernel", "stride", "groups"), [(16, 8, 1), (4, 2, 1), (4, 2, 6), (3, 3, 1)])
def test_transposed_conv_matches_right_trimmed_reference(kernel, stride, groups):
    convtr = _randomize(StreamingConvTranspose1d(6, 6, kernel, stride, groups=groups, bias=groups == 1))
    x = torch.randn(2, 9, 6)
    weight, bias = convtr.convtr.convtr.weight, convtr.convtr.convtr.bias
    full = F.conv_transpose1d(x.transpose(1, 2), weight, bias, stride, groups=groups)
    expected = full[:, :, : full.shape[-1] - (kernel - stride)].transpose(1, 2)  # trim (K - S) on the right
    with torch.no_grad():
        assert torch.allclose(convtr(x), expected, atol=1e-5)
        convtr.pack_()
        state = convtr.init_state(2)
        assert torch.allclose(_chunked(convtr, x, [1, 3, 2, 1, 2], state), expected, atol=1e-5)


def test_transposed_conv_reset_drops_pending_overlap():
    convtr = _randomize(StreamingConvTranspose1d(3, 2, 4, 2))
    x = torch.randn(2, 3, 3)
    with torch.no_grad():
        fresh = convtr(x)
        state = convtr.init_state(2)
        convtr(torch.randn(2, 3, 3), state)
        state.reset(torch.tensor([False, True]))
        after = convtr(x, state)
    assert torch.allclose(after[1], fresh[1], atol=1e-6)
    assert not torch.allclose(after[0], fresh[0], atol=1e-6)


SMALL = SeanetConfig(dimension=8, n_filters=2, ratios=(4, 3, 2), n_residual_layers=2)


def test_seanet_streams_in_any_chunking():
    encoder, decoder = _randomize(SeanetEncoder(SMALL), 1), _randomize(SeanetDecoder(SMALL), 2)
    hop = SMALL.hop_length  # 24 samples per latent step
    audio = torch.randn(2, 30 * hop, 1)
    with torch.no_grad():
        latent = encoder(audio)
        assert latent.shape == (2, 30, 8)
        state = encoder.init_state(2, 2 * hop)
        streamed = _chunked(encoder, audio, [2 * hop, hop, 7 * hop, 2 * hop, 18 * hop], state)
        assert torch.allclose(streamed, latent, atol=1e-5)
        decoded = decoder(latent)
        assert decoded.shape == (2, 30 * hop, 1)
        state = decoder.init_state(2, 1)
        assert torch.allclose(_chunked(decoder, latent, [1, 4, 1, 24], state), decoded, atol=1e-5)


def test_seanet_encoder_is_causal():
    encoder = _randomize(SeanetEncoder(SMALL), 3)
    audio = torch.randn(1, 20 * 24, 1)
    changed = audio.clone()
    changed[:, 10 * 24 :] += 1.0
    with torch.no_grad():
        assert torch.equal(encoder(audio)[:, :10], encoder(changed)[:, :10])
