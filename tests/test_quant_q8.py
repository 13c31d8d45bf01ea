"""Kyutai's q8 checkpoints (lm_tiny_q8): parity in both attention spellings, int8 in memory, bad files."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import torch
from lm_test_utils import run
from safetensors.torch import load_file, save_file

from duplex.model.checkpoint import CheckpointMismatchError
from duplex.model.generate import LMGen
from duplex.model.lm import LMModel
from duplex.model.quant import Int8Linear, QuantizeError, weight_bytes
from duplex.bundle_args import add_model_arguments, load_models

FUSED = re.compile(r"^(?P<attn>.+\.self_attn)\.(?P<kind>in_proj_weight|out_proj\.weight)(?P<scb>_scb)?$")


def per_step_spelling(state: dict[str, torch.Tensor], sets_of) -> dict[str, torch.Tensor]:
    """The q8 state dict with every fused attention tensor (and its _scb) split per step."""
    out = {}
    for key, value in state.items():
        match = FUSED.match(key)
        if not match:
            out[key] = value
            continue
        kind = "in_projs" if match["kind"] == "in_proj_weight" else "out_projs"
        pieces = value.chunk(sets_of(match["attn"]), dim=0)
        for index, piece in enumerate(pieces):
            out[f"{match['attn']}.{kind}.{index}.weight{match['scb'] or ''}"] = piece.clone()
    return out


@pytest.fixture(scope="module")
def q8_dir(fixtures_dir):
    return fixtures_dir / "lm_tiny_q8"


@pytest.fixture(scope="module")
def io(q8_dir):
    return load_file(str(q8_dir / "io.safetensors"))


@pytest.fixture(scope="module", params=["published", "per_step"])
def q8_weights(request, q8_dir, tmp_path_factory):
    """The fixture's weights file in the published spelling, or converted to the per-step one."""
    if request.param == "published":
        return q8_dir / "model.q8.safetensors"
    config = json.loads((q8_dir / "config.json").read_text())
    state = load_file(str(q8_dir / "model.q8.safetensors"))
    converted = per_step_spelling(state, lambda attn: config["dep_q"] if attn.startswith("depformer") else 1)
    assert any(".in_projs.7.weight_scb" in key for key in converted)
    folder = tmp_path_factory.mktemp("q8_per_step")
    shutil.copy(q8_dir / "config.json", folder / "config.json")
    save_file(converted, str(folder / "model.q8.safetensors"))
    return folder / "model.q8.safetensors"


def test_q8_forward_matches_reference(q8_weights, io):
    lm = LMModel.from_pretrained(q8_weights, dtype=torch.float32)  # config.json found next to the file
    with torch.no_grad():
        out = lm(io["codes"])
    assert torch.equal(out.mask, io["mask"]) and torch.equal(out.text_mask, io["text_mask"])
    torch.testing.assert_close(out.logits[io["mask"]], io["logits"][io["mask"]], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.text_logits[io["text_mask"]], io["text_logits"][io["text_mask"]],
                               atol=1e-3, rtol=1e-3)


def test_q8_greedy_tokens_identical(q8_weights, io):
    lm = LMModel.from_pretrained(q8_weights, dtype=torch.float32)
    gen = LMGen(lm, use_sampling=False)
    tokens, _ = run(gen, gen.init_state(2), io["gen_user_codes"])
    assert torch.equal(tokens[:, :, gen.max_delay:], io["gen_output"])


def test_q8_weights_stay_int8_in_memory(q8_dir):
    lm = LMModel.from_pretrained(q8_dir / "model.q8.safetensors", dtype=torch.float32)
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
    layers = [m for m in lm.modules() if isinstance(m, Int8Linear)]
    # 2 temporal layers x 4 + depth 2 layers x 8 steps x 4 + text_linear + 8 depformer_in + 8 linears
    assert len(layers) == 2 * 4 + 2 * 8 * 4 + 1 + 8 + 8
    assert all(layer.qweight.dtype == torch.int8 for layer in layers)
    assert {t.dtype for t in lm.parameters()} == {torch.float32}  # embeddings and norms
    state = load_file(str(q8_dir / "model.q8.safetensors"))
    int8_bytes = sum(t.numel() for t in state.values() if t.dtype == torch.int8)
    float_bytes = sum(4 * t.numel() for t in state.values() if t.dtype != torch.int8)  # scales + embeddings
    assert weight_bytes(lm) == int8_bytes + float_bytes
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"


def test_q8_state_dict_and_explicit_int8(q8_dir, io):
    """A state dict is recognised too; quantize="int8" on a q8 file keeps its int8 weights as they are."""
    config = q8_dir / "config.json"
    state = load_file(str(q8_dir / "model.q8.safetensors"))
    from duplex.model.config import LMConfig

    lm = LMModel.from_pretrained(state, config=LMConfig.from_kyutai(config), dtype=torch.float32, quantize="int8")
    key = "transformer.layers.0.self_attn.in_proj_weight"
    assert torch.equal(lm.transformer.layers[0].self_attn.in_projs[0].qweight, state[key])
    with torch.no_grad():
        out = lm(io["codes"])
    torch.testing.assert_close(out.logits[io["mask"]], io["logits"][io["mask"]], atol=1e-3, rtol=1e-3)


def _broken_copy(q8_dir, tmp_path, edit) -> str:
    state = load_file(str(q8_dir / "model.q8.safetensors"))
    edit(state)
    shutil.copy(q8_dir / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.q8.safetensors"))
    return str(tmp_path / "model.q8.safetensors")


def test_missing_scale_is_one_clear_error(q8_dir, tmp_path):
    key = "depformer.layers.1.gating.3.linear_out.weight_scb"
    path = _broken_copy(q8_dir, tmp_path, lambda state: state.pop(key))
    with pytest.raises(CheckpointMismatchError, match=r"depformer.layers.1.gating.3.linear_out.weight is int8 "
                                                      r"but its scale .*_scb is missing"):
        LMModel.from_pretrained(path, dtype=torch.float32)


def test_scale_of_wrong_shape_is_one_clear_error(q8_dir, tmp_path):
    key = "transformer.layers.0.self_attn.in_proj_weight_scb"
    path = _broken_copy(q8_dir, tmp_path, lambda state: state.update({key: state[key][:-1].clone()}))
    with pytest.raises(CheckpointMismatchError, match=r"in_proj_weight_scb has shape \(191,\), expected \(192,\)"):
        LMModel.from_pretrained(path, dtype=torch.float32)


def test_scale_without_int8_weight_is_refused(q8_dir, tmp_path):
    def dequantize_one(state):
        key = "text_linear.weight"
        state[key] = state[key].float() * state[key + "_scb"][:, None] / 127

    with pytest.raises(CheckpointMismatchError, match=r"text_linear.weight_scb scales text_linear.weight, which "
                                                      r"is torch.float32, not int8"):
        LMModel.from_pretrained(_broken_copy(q8_dir, tmp_path, dequantize_one), dtype=torch.float32)


def test_unknown_quantize_value_is_one_clear_error(q8_dir):
    with pytest.raises(QuantizeError, match=r"unknown quantize value 'int3': choose int8, int4 or none"):
        LMModel.from_pretrained(q8_dir / "model.q8.safetensors", quantize="int3")


def test_unknown_config_quantize_value(q8_dir, tmp_path):
    config = json.loads((q8_dir / "config.json").read_text())
    config["quantize"] = "fp8"
    from duplex.model.config import LMConfig

    with pytest.raises(QuantizeError, match=r"unknown quantize value 'fp8' in the LM config"):
        LMModel.from_pretrained(q8_dir / "model.q8.safetensors", config=LMConfig.from_kyutai(config))


def test_config_says_quantize_but_file_is_float(fixtures_dir, q8_dir):
    from duplex.model.config import LMConfig

    config = LMConfig.from_kyutai(q8_dir / "config.json")
    with pytest.raises(CheckpointMismatchError, match=r"says \"quantize\": true but .* holds no q8 scales"):
        LMModel.from_pretrained(fixtures_dir / "lm_tiny/model.safetensors", config=config)


def test_models_bundle_loads_q8_repo(q8_dir, fixtures_dir, tiny_tokenizer_path):
    """The server's model loading (duplex serve / infer) runs a q8 checkpoint as it is."""
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args([
        "--moshi-weight", str(q8_dir / "model.q8.safetensors"), "--config", str(q8_dir / "config.json"),
        "--mimi-weight", str(fixtures_dir / "mimi_tiny/model.safetensors"),
        "--mimi-config", str(fixtures_dir / "mimi_tiny/config.json"),
        "--tokenizer", str(tiny_tokenizer_path), "--device", "cpu"])
    models = load_models(args)
    assert isinstance(models.lm.text_linear, Int8Linear)
