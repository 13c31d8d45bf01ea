"""LMConfig: Kyutai's config.json schema, defaults, refusals, and the full 7B structure on meta."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from duplex.model.checkpoint import tensor_shapes
from duplex.model.spelling import published_shapes

from duplex.model.config import LMConfig
from duplex.model.lm import LMModel


def _keys_tsv(path):
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            rows[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype.strip())
    return rows


def test_7b_on_meta_matches_published_keys_and_shapes(fixtures_dir):
    config = LMConfig.from_kyutai(fixtures_dir / "moshi_7b_config.json")
    assert config == LMConfig.moshi_7b()
    with torch.device("meta"):
        model = LMModel(config, dtype=torch.bfloat16)
    # Keys and shapes as published; the file's dtypes are cast on load (the tsv's dtype column is
    # what the reference builds each tensor in, informational only).
    ours = published_shapes(tensor_shapes(model.state_dict()))
    published = {key: shape for key, (shape, _) in _keys_tsv(fixtures_dir / "moshi_7b_keys.tsv").items()}
    assert sorted(set(published) - set(ours)) == []
    assert sorted(set(ours) - set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    assert abs(sum(t.numel() for t in model.parameters()) / 1e9 - 7.69) < 0.01


def test_tiny_configs_keep_metadata_in_extra(fixtures_dir):
    config = LMConfig.from_kyutai(fixtures_dir / "lm_tiny" / "config.json")
    assert config.extra["lm_gen_config"] == {"use_sampling": False}
    assert config.n_q == 16 and config.dep_q == 8 and config.context == 16
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw.update(moshi_name="model.safetensors", mimi_name="mimi.safetensors", tokenizer_name="spm.model",
               model_type="moshi")
    config = LMConfig.from_kyutai(raw)
    assert config.extra["tokenizer_name"] == "spm.model" and config.extra["model_type"] == "moshi"
    assert config == LMConfig.moshi_7b()


def test_absent_keys_take_kyutai_defaults(fixtures_dir):
    config = LMConfig.from_kyutai(fixtures_dir / "lm_options_tiny" / "config.json")
    assert config.norm == "layer_norm" and config.positional_embedding == "sin" and config.gating == "none"
    assert config.depformer_pos_emb == "sin" and config.context == 6
    assert config.depformer_multi_linear and config.depformer_weights_per_step_schedule == (0, 1, 1)
    temporal, depth = config.temporal_config(), config.depformer_config()
    assert temporal.layer_scale == 0.1 and depth.layer_scale == 0.1  # inherited: key absent
    assert depth.gating == "silu" and depth.dim_feedforward == 32 and depth.context is None
    assert config.num_depformer_inputs == 2
    minimal = LMConfig.from_kyutai({"dim": 16, "num_heads": 2, "num_layers": 1, "n_q": 2, "dep_q": 1,
                                    "card": 8, "text_card": 10, "depformer_dim": 8, "delays": [0, 0, 0]})
    assert minimal.existing_text_padding_id == 3 and minimal.hidden_scale == 4
    assert minimal.context is None and minimal.depformer_config().dim_feedforward == 32
    assert minimal.depformer_config().num_heads == 2


def test_explicit_null_overrides_inheritance(fixtures_dir):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw["layer_scale"] = 0.5
    config = LMConfig.from_kyutai(raw)  # "depformer_layer_scale": null stays None
    assert config.temporal_config().layer_scale == 0.5 and config.depformer_config().layer_scale is None


@pytest.mark.parametrize("key, value", [("conditioners", {"description": {}}), ("cross_attention", True),
                                        ("demux_second_stream", True), ("bias_proj", True)])
def test_unsupported_options_are_refused(fixtures_dir, key, value):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw[key] = value
    with pytest.raises(ValueError, match=key):
        LMConfig.from_kyutai(raw)
    raw[key] = False if value is True else {}
    LMConfig.from_kyutai(raw)  # switched off: fine


NEUTRAL_SPELLINGS = {  # Kyutai configs may spell out an unsupported option with its "off" value
    "kv_repeat": 1, "cross_attention": False, "depformer_cross_attention": False, "conditioners": None,
    "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
              "cross": []},
    "demux_second_stream": False, "extra_heads_num_heads": 0, "extra_heads_dim": 6, "norm_emb": False,
    "bias_proj": False, "bias_ff": False, "bias_attn": False, "text_card_out": 32000, "lora": False,
}
REAL_SETTINGS = [("kv_repeat", 2), ("conditioners", {"control": {"type": "lut"}}), ("lora", True),
                 ("fuser", {"sum": ["control"], "prepend": [], "cross": []}), ("text_card_out", 4000),
                 ("extra_heads_num_heads", 4), ("depformer_cross_attention", True), ("norm_emb", True)]


def test_neutral_spellings_of_unsupported_options_are_accepted(fixtures_dir):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw.update(NEUTRAL_SPELLINGS)
    assert LMConfig.from_kyutai(raw) == LMConfig.moshi_7b()
    raw.update({"kv_repeat": None, "conditioners": {}, "fuser": None, "text_card_out": None})
    assert LMConfig.from_kyutai(raw) == LMConfig.moshi_7b()


@pytest.mark.parametrize("key, value", REAL_SETTINGS)
def test_real_settings_of_unsupported_options_are_refused(fixtures_dir, key, value):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw.update(NEUTRAL_SPELLINGS)
    raw[key] = value
    with pytest.raises(ValueError, match=f"unsupported LM option.*{key}="):
        LMConfig.from_kyutai(raw)


def test_text_card_out_follows_the_padding_rule(fixtures_dir):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw.update(existing_text_padding_id=None, text_card_out=32001)  # own padding id: one more output
    assert LMConfig.from_kyutai(raw).text_out_card == 32001
    raw["text_card_out"] = 32000
    with pytest.raises(ValueError, match="text_card_out"):
        LMConfig.from_kyutai(raw)


@pytest.mark.parametrize("change, message", [
    ({"delays": [0, 1]}, "delays"), ({"norm": "batch_norm"}, "norm"), ({"gating": "relu"}, "gating"),
    ({"positional_embedding": "alibi"}, "positional_embedding"), ({"dep_q": 17}, "dep_q"),
    ({"depformer_weights_per_step_schedule": [0, 1]}, "schedule"), ({"causal": False}, "causal"),
])
def test_bad_configs_give_clear_errors(fixtures_dir, change, message):
    raw = json.loads((fixtures_dir / "moshi_7b_config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        LMConfig.from_kyutai(raw)


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read LM config"):
        LMConfig.from_kyutai(bad)
    with pytest.raises(ValueError, match="no 'delays'"):
        LMConfig.from_kyutai({"dim": 16})


def test_config_copies_and_pickles(fixtures_dir):
    config = LMConfig.from_kyutai(fixtures_dir / "lm_tiny" / "config.json")
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and hash(clone) == hash(config)
        assert clone.extra == config.extra
