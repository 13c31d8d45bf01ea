"""Quantized linear layers (int8 per channel, int4 group-wise) and quantize-on-load of float checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_test_utils import fixture_lm, run

from duplex.model.config import LMConfig
from duplex.model.generate import LMGen
from duplex.model.lm import LMModel
from duplex.model.quant import (
    INT4_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    QuantizeError,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    weight_bytes,
)
from duplex.model.quant_quality import compare_logits


def test_int8_round_trip_error_is_half_a_step():
    weight = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()


def test_int4_round_trip_error_is_half_a_step():
    weight = torch.randn(32, 128)
    q, scales_and_zeros = quantize_int4(weight, 32)
    assert scales_and_zeros.shape == (4, 32, 2) and int(q.min()) >= 0 and int(q.max()) <= 15
    step = scales_and_zeros[..., 0].T.repeat_interleave(32, dim=1)  # [N, K]
    assert ((dequantize_int4(q, scales_and_zeros, 32) - weight).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("in_features", [64, 21, 100])  # 21, 100: where the CPU kernel fails (K % 8 != 0)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layer_applies_its_dequantized_weight(dtype, in_features):
    layer = Int8Linear.from_float(torch.randn(48, in_features), dtype)
    x = torch.randn(2, 3, in_features, dtype=dtype)
    expected = x.float() @ layer.dequantized().T
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x).float(), expected, atol=tolerance * expected.abs().max(), rtol=0)
    assert layer(x).shape == (2, 3, 48) and layer(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_layer_applies_its_dequantized_weight(dtype):
    weight = torch.randn(32, 128)
    layer = Int4Linear.from_float(weight, 32, dtype, torch.device("cpu"))
    q, scales_and_zeros = quantize_int4(weight, 32)
    x = torch.randn(5, 128, dtype=dtype)
    expected = x.float() @ dequantize_int4(q, scales_and_zeros.to(dtype), 32).T
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x).float(), expected, atol=tolerance * expected.abs().max(), rtol=0)


def test_int4_falls_back_to_int8_for_shapes_the_kernel_cannot_take():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(88, 32, bias=False),
                                torch.nn.Linear(64, 100, bias=False))
    quantize_model(model, "int4")
    assert [type(m) for m in model] == [Int4Linear, Int8Linear, Int8Linear]


def test_unknown_mode_and_bias_are_refused():
    with pytest.raises(QuantizeError, match="unknown quantize value 'int2'"):
        quantize_model(torch.nn.Linear(4, 4, bias=False), "int2")
    with pytest.raises(QuantizeError, match="has a bias"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("spelling", ["model.safetensors", "model.in_projs.safetensors"])
def test_quantize_on_load_equals_quantizing_the_float_model(fixtures_dir, mode, spelling):
    """Either spelling, tensor by tensor while loading == the float model quantized afterwards."""
    folder = fixtures_dir / "lm_tiny"
    config = LMConfig.from_kyutai(folder / "config.json")
    loaded = LMModel.from_pretrained(folder / spelling, config, dtype=torch.float32, quantize=mode)
    reference, io = fixture_lm(fixtures_dir, "lm_tiny")
    after = quantize_model(copy.deepcopy(reference), mode)
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())
    kinds = [type(m).__name__ for m in loaded.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert kinds == [type(m).__name__ for m in after.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    if mode == "int4":
        assert kinds.count("Int4Linear") >= 40  # attention and gating inputs; odd shapes fall back to int8
    with torch.no_grad():
        assert torch.equal(loaded(io["codes"]).logits.nan_to_num(), after(io["codes"]).logits.nan_to_num())
    quality = compare_logits(reference, loaded, io["codes"])
    assert quality["rel_error"] < (0.03 if mode == "int8" else 0.3)
    assert quality["top1"] > (0.95 if mode == "int8" else 0.7)


def test_quantized_model_generates(fixtures_dir):
    lm = LMModel.from_pretrained(fixtures_dir / "lm_tiny/model.safetensors", dtype=torch.bfloat16, quantize="int4")
    gen = LMGen(lm, use_sampling=False)
    tokens, valid = run(gen, gen.init_state(2), torch.zeros(2, 8, 6, dtype=torch.long))
    assert valid[:, 1:].all() and (tokens[:, :, 1:] >= 0).all()
    assert lm.dtype == torch.bfloat16


def test_quantized_weights_are_smaller(fixtures_dir):
    path = fixtures_dir / "lm_tiny/model.safetensors"
    sizes = {mode: weight_bytes(LMModel.from_pretrained(path, dtype=torch.float32, quantize=mode))
             for mode in (None, "int8", "int4")}
    linear_floats = sum(m.weight.numel() for m in LMModel.from_pretrained(path, dtype=torch.float32).modules()
                        if isinstance(m, torch.nn.Linear))
    # int8 saves 3 of the 4 bytes of every linear weight, less one float32 scale per row
    assert sizes[None] - sizes["int8"] > 0.7 * 3 * linear_floats
    assert sizes["int4"] < sizes["int8"]
    assert INT4_GROUP_SIZE == 32


def test_quantizers_work_in_row_chunks_and_leave_the_input_alone(monkeypatch):
    from duplex.model import quant

    weight = torch.randn(48, 64)
    original = weight.clone()
    whole = quantize_int8(weight), quantize_int4(weight, 32)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 100)  # one row (64 weights) at a time
    chunked = quantize_int8(weight), quantize_int4(weight, 32)
    assert torch.equal(weight, original)
    for (q_whole, s_whole), (q_chunked, s_chunked) in zip(whole, chunked):
        assert torch.equal(q_whole, q_chunked) and torch.equal(s_whole, s_chunked)
