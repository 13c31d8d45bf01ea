"""Config reading, strict checkpoint loading, the full-size key layout, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from codec_util import load_tiny
from duplex.codec import CheckpointMismatchError, Mimi, MimiConfig
from duplex.model.checkpoint import tensor_shapes
from duplex.model.spelling import published_shapes
from safetensors.torch import load_file, save_file

FRAME = 1920


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return load_tiny(fixtures_dir)


@pytest.fixture(scope="module")
def tiny_weights(fixtures_dir):
    return load_file(str(fixtures_dir / "mimi_tiny" / "model.safetensors"))


# ---------------------------------------------------------------- config
def test_full_config_is_the_official_preset(fixtures_dir):
    config = MimiConfig.from_kyutai(fixtures_dir / "mimi_full_config.json")
    assert config == MimiConfig.official()
    assert config.frame_size == 1920 and config.encoder_frame_rate == 25.0 and config.resample_stride == 2
    assert config.seanet.ratios == (8, 6, 5, 4) and config.quantizer.n_q == 32 and config.transformer.context == 250


def test_tiny_config_from_dict(fixtures_dir):
    raw = json.loads((fixtures_dir / "mimi_tiny" / "config.json").read_text())
    config = MimiConfig.from_kyutai(raw)
    assert config.seanet.n_filters == 4 and config.seanet.dimension == 32
    assert config.quantizer.n_q == 16 and config.quantizer.bins == 64 and config.quantizer.dimension == 16
    assert config.transformer.context == 10 and config.transformer.num_heads == 2
    assert config == MimiConfig.from_kyutai(str(fixtures_dir / "mimi_tiny" / "config.json"))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("seanet", "causal", False), ("seanet", "activation", "ReLU"), ("seanet", "pad_mode", "reflect"),
     ("transformer", "conv_layout", False), ("transformer", "norm", "batch_norm")],
)
def test_unsupported_config_options_are_rejected(fixtures_dir, section, key, value):
    raw = json.loads((fixtures_dir / "mimi_full_config.json").read_text())
    raw[section][key] = value
    with pytest.raises(ValueError, match=key if key != "norm" else "norm"):
        Mimi(MimiConfig.from_kyutai(raw))


def test_config_missing_section_is_rejected():
    with pytest.raises(ValueError, match="quantizer"):
        MimiConfig.from_kyutai({"seanet": {}, "transformer": {}})


# ---------------------------------------------------------------- key layout
def test_full_size_model_on_meta_matches_published_keys(fixtures_dir):
    rows = [line.split("\t") for line in (fixtures_dir / "mimi_keys.tsv").read_text().splitlines() if line.strip()]
    published = {key: tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
                 for key, shape, _ in rows}
    with torch.device("meta"):
        mimi = Mimi(MimiConfig.from_kyutai(fixtures_dir / "mimi_full_config.json"))
    ours = published_shapes(tensor_shapes(mimi.state_dict()))
    assert sorted(set(published) - set(ours)) == []
    assert sorted(set(ours) - set(published)) == []
    assert {key: shape for key, shape in ours.items() if published[key] != shape} == {}
    assert len(ours) == len(rows) == 318
    assert {value.dtype for value in mimi.state_dict().values()} == {torch.float32}
    assert {dtype for _, _, dtype in rows} == {"torch.float32"}


# ---------------------------------------------------------------- strict loading
def _load(weights, fixtures_dir):
    return Mimi.from_pretrained(weights, config=fixtures_dir / "mimi_tiny" / "config.json")


def test_missing_key_is_named(fixtures_dir, tiny_weights):
    weights = dict(tiny_weights)
    del weights["decoder.model.2.convtr.convtr.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\): decoder\.model\.2\.convtr\.convtr\.bias"):
        _load(weights, fixtures_dir)


def test_unexpected_key_is_named(fixtures_dir, tiny_weights):
    weights = dict(tiny_weights, **{"encoder.model.99.conv.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\): encoder\.model\.99\.conv\.conv\.weight"):
        _load(weights, fixtures_dir)


def test_misshaped_key_is_named(fixtures_dir, tiny_weights, tmp_path):
    weights = dict(tiny_weights)
    weights["quantizer.rvq_rest.input_proj.weight"] = torch.zeros(16, 32, 2)
    path = tmp_path / "bad.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"quantizer\.rvq_rest\.input_proj\.weight \(checkpoint \(16, 32, 2\)"):
        _load(path, fixtures_dir)


def test_wrong_config_for_checkpoint_fails_loudly(fixtures_dir):
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped key\(s\)"):
        Mimi.from_pretrained(fixtures_dir / "mimi_tiny" / "model.safetensors")  # official config, tiny weights


def test_mismatch_is_found_before_any_tensor_is_read(fixtures_dir, monkeypatch, tmp_path):
    import safetensors.torch

    def must_not_read(*args, **kwargs):
        raise AssertionError("tensors were read before the keys and shapes were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", must_not_read)
    with pytest.raises(CheckpointMismatchError, match=r"Mimi checkpoint .*mimi_tiny/model\.safetensors"):
        Mimi.from_pretrained(fixtures_dir / "mimi_tiny" / "model.safetensors")  # official config
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read Mimi weights"):
        _load(junk, fixtures_dir)


def test_missing_file_and_bad_num_codebooks(fixtures_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nope.safetensors", fixtures_dir)
    with pytest.raises(ValueError, match="num_codebooks"):
        Mimi.from_pretrained(fixtures_dir / "mimi_tiny" / "model.safetensors",
                             config=fixtures_dir / "mimi_tiny" / "config.json", num_codebooks=17)


def test_loaded_model_has_no_meta_tensors_and_derived_centroids(tiny, tiny_weights):
    assert not any(t.is_meta for t in [*tiny.parameters(), *tiny.buffers()])
    codebook = tiny.quantizer.rvq_rest.codebooks()[3]
    usage = tiny_weights["quantizer.rvq_rest.vq.layers.3._codebook.cluster_usage"].clamp(min=1e-5)
    expected = tiny_weights["quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum"] / usage[:, None]
    assert torch.allclose(codebook.centroids, expected)


def test_save_and_reload_round_trip(tiny, tiny_weights, fixtures_dir, tmp_path):
    from duplex.codec import save_mimi

    path = tmp_path / "mimi.safetensors"
    save_mimi(tiny, path)
    saved = load_file(str(path))
    assert saved.keys() == tiny_weights.keys()
    assert all(torch.equal(saved[key], tiny_weights[key]) for key in saved)
    reloaded = _load(path, fixtures_dir)
    audio = torch.randn(1, 1, 3 * FRAME)
    assert torch.equal(reloaded.encode(audio), tiny.encode(audio))


def test_plain_load_state_dict_derives_centroids(tiny, tiny_weights, fixtures_dir):
    mimi = Mimi(MimiConfig.from_kyutai(fixtures_dir / "mimi_tiny" / "config.json"))
    mimi.load_state_dict(tiny_weights)
    audio = torch.randn(2, 1, 2 * FRAME)
    assert torch.equal(mimi.encode(audio), tiny.encode(audio))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("audio", "message"),
    [(torch.zeros(1, FRAME), r"\[B, 1, T\]"), (torch.zeros(1, 2, FRAME), r"\[B, 1, T\]"),
     (torch.zeros(1, 1, 0), r"\[B, 1, T\]"), (torch.zeros(1, 1, FRAME, dtype=torch.int16), "floating-point"),
     ([0.0] * FRAME, "torch.Tensor")],
)
def test_bad_audio_is_a_value_error(tiny, audio, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode(audio)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_audio_names_the_slot(tiny, bad):
    audio = torch.zeros(3, 1, FRAME)
    audio[2, 0, 100] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[2\]"):
        tiny.encode(audio)
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny.encode_step(audio, tiny.init_state(3))


def test_bad_streaming_input(tiny):
    state = tiny.init_state(2)
    with pytest.raises(ValueError, match="exactly 1920 samples"):
        tiny.encode_step(torch.zeros(2, 1, 1000), state)
    with pytest.raises(ValueError, match="batch size 2"):
        tiny.encode_step(torch.zeros(3, 1, FRAME), state)
    with pytest.raises(ValueError, match="exactly 1 frame"):
        tiny.decode_step(torch.zeros(2, 8, 2, dtype=torch.long), state)
    with pytest.raises(ValueError, match="MimiState"):
        tiny.decode_step(torch.zeros(2, 8, 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="bool tensor of shape \\[2\\]"):
        state.reset(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="batch_size"):
        tiny.init_state(0)


@pytest.mark.parametrize(
    ("codes", "message"),
    [(torch.zeros(1, 8, 2), "integer"), (torch.zeros(1, 17, 2, dtype=torch.long), "codebooks"),
     (torch.full((1, 8, 2), 64), r"0\.\.63"), (torch.full((1, 8, 2), -1), r"0\.\.63"),
     (torch.zeros(8, 2, dtype=torch.long), r"\[B, K, S\]")],
)
def test_bad_codes_are_a_value_error(tiny, codes, message):
    with pytest.raises(ValueError, match=message):
        tiny.decode(codes)


@pytest.mark.parametrize("value", [0, 17, 2.0, True])
def test_bad_num_codebooks(tiny, value):
    with pytest.raises(ValueError, match="num_codebooks"):
        tiny.num_codebooks = value
