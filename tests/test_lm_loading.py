"""Strict loading: dtype casting, config.json discovery, and errors naming the offending keys."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from duplex.model.config import LMConfig
from duplex.model.lm import LMModel
from duplex.model.checkpoint import CheckpointMismatchError
from duplex.model.loading import CheckpointMismatch


@pytest.fixture()
def tiny(fixtures_dir):
    folder = fixtures_dir / "lm_options_tiny"
    return LMConfig.from_kyutai(folder / "config.json"), load_file(str(folder / "model.safetensors"))


def test_loads_cast_and_finds_config(fixtures_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixtures_dir / "lm_options_tiny" / name, tmp_path / name)
    lm = LMModel.from_pretrained(tmp_path / "model.safetensors")  # config.json found beside it
    assert lm.config.dep_q == 3 and lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in lm.parameters())
    assert not lm.training


def test_missing_key_is_named(tiny):
    config, weights = tiny
    del weights["depformer_emb.1.low_rank.weight"]
    with pytest.raises(CheckpointMismatch, match=r"1 missing key\(s\): depformer_emb.1.low_rank.weight"):
        LMModel.from_pretrained(weights, config, dtype=torch.float32)


def test_unexpected_key_is_named(tiny):
    config, weights = tiny
    weights["depformer_in.2.weight"] = torch.zeros(16, 32)
    with pytest.raises(CheckpointMismatch, match=r"unexpected key\(s\): depformer_in.2.weight"):
        LMModel.from_pretrained(weights, config, dtype=torch.float32)


def test_misshaped_key_is_named(tiny):
    config, weights = tiny
    weights["text_emb.weight"] = torch.zeros(50, 32)
    with pytest.raises(CheckpointMismatch, match=r"text_emb.weight \(checkpoint \(50, 32\), model \(51, 32\)\)"):
        LMModel.from_pretrained(weights, config, dtype=torch.float32)


def test_wrong_config_lists_many_keys(fixtures_dir, tiny):
    _, weights = tiny
    config = LMConfig.from_kyutai(fixtures_dir / "lm_tiny" / "config.json")
    with pytest.raises(CheckpointMismatch, match="in all"):
        LMModel.from_pretrained(weights, config)


def test_bad_files(tmp_path, tiny):
    config, weights = tiny
    with pytest.raises(FileNotFoundError):
        LMModel.from_pretrained(tmp_path / "absent.safetensors", config)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read LM weights"):
        LMModel.from_pretrained(junk, config)
    save_file(weights, str(tmp_path / "ok.safetensors"))
    assert LMModel.from_pretrained(tmp_path / "ok.safetensors", config).config is config


def test_mismatch_is_found_before_any_tensor_is_read(fixtures_dir, tmp_path, monkeypatch):
    from duplex.model import safetensors_io

    def must_not_read(*args, **kwargs):
        raise AssertionError("tensors were read before the keys and shapes were checked")

    monkeypatch.setattr(safetensors_io, "_fill_from", must_not_read)
    wrong_config = LMConfig.from_kyutai(fixtures_dir / "lm_tiny" / "config.json")
    weights = fixtures_dir / "lm_options_tiny" / "model.safetensors"
    with pytest.raises(CheckpointMismatchError, match=r"lm_options_tiny/model.safetensors does not match"):
        LMModel.from_pretrained(weights, wrong_config)


def test_old_error_name_is_the_shared_type():
    from duplex.codec import CheckpointMismatchError as CodecError

    assert CheckpointMismatch is CheckpointMismatchError is CodecError
    assert issubclass(CheckpointMismatchError, ValueError)
