"""Both attention spellings load strictly: every fixture gives its reference outputs from the published
(fused) file and from the per-step file; mixed, missing, unexpected and mis-shaped keys are named before
any tensor is read; floating dtypes are cast, never rejected."""

from __future__ import annotations

import pytest
import torch
from codec_util import assert_codes_match
from lm_test_utils import run
from safetensors.torch import load_file, save_file

from duplex.codec import Mimi
from duplex.model import safetensors_io
from duplex.model.checkpoint import CheckpointMismatchError
from duplex.model.config import LMConfig
from duplex.model.generate import LMGen
from duplex.model.lm import LMModel

SPELLINGS = ["model.safetensors", "model.in_projs.safetensors"]
LM_FIXTURES = ["lm_tiny", "lm_options_tiny"]
DEPTH_ATTENTION = "depformer.layers.0.self_attn"


def load_fixture_lm(fixtures_dir, name: str, spelling: str, dtype=torch.float32) -> LMModel:
    folder = fixtures_dir / name
    return LMModel.from_pretrained(folder / spelling, config=folder / "config.json", dtype=dtype)


def load_fixture_mimi(fixtures_dir, spelling: str, num_codebooks: int = 8) -> Mimi:
    folder = fixtures_dir / "mimi_tiny"
    return Mimi.from_pretrained(folder / spelling, config=folder / "config.json", num_codebooks=num_codebooks)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor data is read from a safetensors file."""
    def must_not_read(*args, **kwargs):
        raise AssertionError("tensor data was read before the keys and shapes were checked")

    monkeypatch.setattr(safetensors_io, "_fill_from", must_not_read)


# ---------------------------------------------------------------- reference outputs in both spellings
def test_the_two_files_really_differ_in_spelling(fixtures_dir):
    for name in [*LM_FIXTURES, "mimi_tiny"]:
        fused = safetensors_io.read_header(fixtures_dir / name / SPELLINGS[0]).shapes()
        per_step = safetensors_io.read_header(fixtures_dir / name / SPELLINGS[1]).shapes()
        assert any(k.endswith("in_proj_weight") for k in fused) and not any(".in_projs." in k for k in fused)
        assert any(".in_projs." in k for k in per_step) and not any(k.endswith("in_proj_weight") for k in per_step)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", LM_FIXTURES)
def test_lm_fixture_outputs_in_both_spellings(fixtures_dir, name, spelling):
    lm = load_fixture_lm(fixtures_dir, name, spelling)
    io = load_file(str(fixtures_dir / name / "io.safetensors"))
    with torch.no_grad():
        out = lm(io["codes"])
    assert torch.equal(out.mask, io["mask"])
    torch.testing.assert_close(out.logits[io["mask"]], io["logits"][io["mask"]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.text_logits[io["text_mask"]], io["text_logits"][io["text_mask"]],
                               atol=1e-4, rtol=1e-4)
    gen = LMGen(lm, use_sampling=False)
    tokens, _ = run(gen, gen.init_state(2), io["gen_user_codes"])
    assert torch.equal(tokens[:, :, gen.max_delay:], io["gen_output"])


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_mimi_fixture_outputs_in_both_spellings(fixtures_dir, spelling):
    io = load_file(str(fixtures_dir / "mimi_tiny" / "io.safetensors"))
    for num_codebooks in (8, 16):
        mimi = load_fixture_mimi(fixtures_dir, spelling, num_codebooks)
        latent = mimi.encode_latent(io["audio"])
        assert (latent - io["latent_unquantized"]).abs().max() < 1e-4
        codes = mimi.encode(io["audio"])
        assert_codes_match(mimi, latent, codes, io[f"codes_q{num_codebooks}"])
        decoded = mimi.decode(io[f"codes_q{num_codebooks}"])
        torch.testing.assert_close(decoded, io[f"decoded_q{num_codebooks}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_pipeline_fixture_in_both_spellings(fixtures_dir, spelling):
    io = load_file(str(fixtures_dir / "pipeline_tiny" / "io.safetensors"))
    mimi = load_fixture_mimi(fixtures_dir, spelling)
    lm = load_fixture_lm(fixtures_dir, "lm_tiny", spelling)
    user_codes = mimi.encode(io["audio_in"])
    assert torch.equal(user_codes, io["user_codes"])
    gen = LMGen(lm, use_sampling=False)
    tokens, _ = run(gen, gen.init_state(2), user_codes)
    tokens = tokens[:, :, gen.max_delay:]
    assert torch.equal(tokens[:, :1], io["text_tokens"]) and torch.equal(tokens[:, 1:], io["audio_tokens"])
    torch.testing.assert_close(mimi.decode(tokens[:, 1:]), io["audio_out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", LM_FIXTURES)
def test_both_spellings_give_identical_parameters(fixtures_dir, name):
    fused = load_fixture_lm(fixtures_dir, name, SPELLINGS[0]).state_dict()
    per_step = load_fixture_lm(fixtures_dir, name, SPELLINGS[1]).state_dict()
    assert fused.keys() == per_step.keys()
    assert all(torch.equal(fused[k], per_step[k]) for k in fused)


# ---------------------------------------------------------------- malformed files, named before reading
def _write(tmp_path, tensors: dict, name: str = "bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lm_config(fixtures_dir, name: str = "lm_tiny") -> LMConfig:
    return LMConfig.from_kyutai(fixtures_dir / name / "config.json")


def test_mixed_spelling_is_one_clear_error_naming_the_keys(fixtures_dir, tmp_path, no_tensor_reads):
    tensors = load_file(str(fixtures_dir / "lm_tiny" / SPELLINGS[0]))
    fused_out = tensors.pop(f"{DEPTH_ATTENTION}.out_proj.weight")  # [8 * D, D]
    for index, piece in enumerate(fused_out.chunk(8)):
        tensors[f"{DEPTH_ATTENTION}.out_projs.{index}.weight"] = piece
    path = _write(tmp_path, tensors)
    with pytest.raises(CheckpointMismatchError) as caught:
        LMModel.from_pretrained(path, config=_lm_config(fixtures_dir))
    message = str(caught.value)
    assert "mixes the fused" in message and DEPTH_ATTENTION in message
    assert f"{DEPTH_ATTENTION}.in_proj_weight" in message and f"{DEPTH_ATTENTION}.out_projs.0.weight" in message
    assert "\n" not in message


def test_mixed_spelling_in_mimi_is_named(fixtures_dir, tmp_path, no_tensor_reads):
    tensors = load_file(str(fixtures_dir / "mimi_tiny" / SPELLINGS[0]))
    attention = "encoder_transformer.transformer.layers.0.self_attn"
    tensors[f"{attention}.in_projs.0.weight"] = tensors[f"{attention}.in_proj_weight"].clone()
    path = _write(tmp_path, tensors)
    with pytest.raises(CheckpointMismatchError, match=rf"mixes .*{attention} \(.*in_proj_weight.*in_projs.0.weight"):
        Mimi.from_pretrained(path, config=fixtures_dir / "mimi_tiny" / "config.json")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_missing_attention_key_is_named_in_the_files_spelling(fixtures_dir, tmp_path, no_tensor_reads, spelling):
    tensors = load_file(str(fixtures_dir / "lm_tiny" / spelling))
    gone = f"{DEPTH_ATTENTION}.in_projs.3.weight" if "in_projs" in spelling else f"{DEPTH_ATTENTION}.in_proj_weight"
    del tensors[gone]
    path = _write(tmp_path, tensors)
    with pytest.raises(CheckpointMismatchError, match=rf"1 missing key\(s\): {gone}$|1 missing key\(s\): {gone} "):
        LMModel.from_pretrained(path, config=_lm_config(fixtures_dir))


def test_unexpected_and_misshaped_keys_are_named(fixtures_dir, tmp_path, no_tensor_reads):
    tensors = load_file(str(fixtures_dir / "lm_tiny" / SPELLINGS[0]))
    rows, dim = tensors[f"{DEPTH_ATTENTION}.in_proj_weight"].shape
    tensors[f"{DEPTH_ATTENTION}.in_proj_weight"] = torch.zeros(rows - 3 * dim, dim)  # one step set short
    tensors["depformer_in.99.weight"] = torch.zeros(2, 2)
    path = _write(tmp_path, tensors)
    with pytest.raises(CheckpointMismatchError) as caught:
        LMModel.from_pretrained(path, config=_lm_config(fixtures_dir))
    message = str(caught.value)
    assert "1 unexpected key(s): depformer_in.99.weight" in message
    assert (f"1 mis-shaped key(s): {DEPTH_ATTENTION}.in_proj_weight (checkpoint ({rows - 3 * dim}, {dim}), "
            f"model ({rows}, {dim}))") in message


def test_a_wrong_config_fails_before_reading(fixtures_dir, no_tensor_reads):
    with pytest.raises(CheckpointMismatchError, match="lm_options_tiny/model.safetensors does not match"):
        LMModel.from_pretrained(fixtures_dir / "lm_options_tiny" / SPELLINGS[0], config=_lm_config(fixtures_dir))
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        Mimi.from_pretrained(fixtures_dir / "mimi_tiny" / SPELLINGS[1], config=fixtures_dir / "mimi_full_config.json")


def test_truncated_file_is_a_clear_error(fixtures_dir, tmp_path):
    data = (fixtures_dir / "lm_tiny" / SPELLINGS[0]).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="cannot read LM weights .*cut.safetensors"):
        LMModel.from_pretrained(path, config=_lm_config(fixtures_dir))


# ---------------------------------------------------------------- floating dtypes are cast
@pytest.mark.parametrize(("file_dtype", "load_dtype"), [(torch.bfloat16, torch.float32),
                                                        (torch.float32, torch.bfloat16),
                                                        (torch.float16, torch.float32)])
def test_floating_dtypes_are_cast(fixtures_dir, tmp_path, file_dtype, load_dtype):
    reference = load_file(str(fixtures_dir / "lm_tiny" / SPELLINGS[0]))
    path = _write(tmp_path, {k: v.to(file_dtype) for k, v in reference.items()})
    lm = LMModel.from_pretrained(path, config=_lm_config(fixtures_dir), dtype=load_dtype)
    assert {p.dtype for p in lm.parameters()} == {load_dtype}
    fused = lm.state_dict()[f"{DEPTH_ATTENTION}.in_projs.1.weight"]
    rows = fused.shape[0]
    expected = reference[f"{DEPTH_ATTENTION}.in_proj_weight"][rows:2 * rows].to(file_dtype).to(load_dtype)
    assert torch.equal(fused, expected)


def test_mimi_bfloat16_file_loads_as_float32(fixtures_dir, tmp_path):
    reference = load_file(str(fixtures_dir / "mimi_tiny" / SPELLINGS[1]))
    path = _write(tmp_path, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.items()})
    mimi = Mimi.from_pretrained(path, config=fixtures_dir / "mimi_tiny" / "config.json", dtype=torch.float32)
    state = mimi.state_dict()
    assert {state[k].dtype for k in reference} == {torch.float32}
    key = "decoder_transformer.transformer.layers.0.self_attn.out_projs.0.weight"
    assert torch.equal(state[key], reference[key].to(torch.bfloat16).float())


def test_keep_dtype_keeps_named_keys(fixtures_dir):
    from duplex.model.checkpoint import load_strict

    with torch.device("meta"):
        lm = LMModel(_lm_config(fixtures_dir))
    load_strict(lm, fixtures_dir / "lm_tiny" / SPELLINGS[0], "LM", "cpu", torch.bfloat16,
                keep_dtype=lambda key: key.startswith("out_norm"))
    assert lm.out_norm.alpha.dtype == torch.float32 and lm.text_linear.weight.dtype == torch.bfloat16


def test_integer_dtype_is_not_a_load_dtype(fixtures_dir):
    with pytest.raises(ValueError, match="floating-point"):
        LMModel.from_pretrained(fixtures_dir / "lm_tiny" / SPELLINGS[0], config=_lm_config(fixtures_dir),
                                dtype=torch.int8)


def test_spelling_helpers_map_row_wise_companions_and_ignore_lora_factors():
    from duplex.model.spelling import published_shapes, shapes_in_file_spelling, split_fused

    attention = "transformer.layers.0.self_attn"
    shapes = {f"{attention}.in_projs.{i}.weight": (6, 2) for i in range(2)}
    shapes.update({f"{attention}.in_projs.{i}.weight_scb": (6,) for i in range(2)})
    shapes.update({f"{attention}.out_projs.{i}.weight": (2, 2) for i in range(2)})
    shapes[f"{attention}.in_projs.0.lora_A.weight"] = (4, 2)
    fused = published_shapes(shapes)
    assert fused == {f"{attention}.in_proj_weight": (12, 2), f"{attention}.in_proj_weight_scb": (12,),
                     f"{attention}.out_proj.weight": (4, 2), f"{attention}.in_projs.0.lora_A.weight": (4, 2)}
    # A fused base with a per-step LoRA factor is not a mixed spelling.
    assert shapes_in_file_spelling(shapes, fused, "file") == fused
    tensors = {key: torch.arange(torch.Size(shape).numel()).view(shape) for key, shape in fused.items()}
    split = split_fused(tensors, shapes)
    assert set(split) == set(shapes)
    assert torch.equal(split[f"{attention}.in_projs.1.weight_scb"], torch.arange(6, 12))
    storage = tensors[f"{attention}.in_proj_weight"].untyped_storage().data_ptr()
    assert split[f"{attention}.in_projs.1.weight"].untyped_storage().data_ptr() == storage  # a view, no copy


def test_integer_weights_and_kept_scales_load_for_quantized_modules(tmp_path):
    """What an int8 loader needs from load_strict: int8 tensors keep their dtype, chosen scales stay float32."""
    from duplex.model.checkpoint import load_strict

    class Int8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(4, 3, dtype=torch.int8), requires_grad=False)
            self.register_buffer("weight_scb", torch.empty(4))

    with torch.device("meta"):
        model = torch.nn.Sequential(Int8Linear())
    weights = {"0.weight": torch.randint(-127, 128, (4, 3), dtype=torch.int8), "0.weight_scb": torch.rand(4)}
    path = _write(tmp_path, weights)
    load_strict(model, path, "int8 LM", "cpu", torch.bfloat16, keep_dtype=lambda key: key.endswith("_scb"))
    assert model[0].weight.dtype == torch.int8 and torch.equal(model[0].weight, weights["0.weight"])
    assert model[0].weight_scb.dtype == torch.float32 and torch.equal(model[0].weight_scb, weights["0.weight_scb"])
