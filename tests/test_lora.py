"""LoRA adapters in upstream's format: the lm_tiny_lora fixture merged, unmerged and batched; strict reading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lm_test_utils import fixture_lm, run
from safetensors.torch import load_file, save_file

from duplex.model.generate import LMGen
from duplex.model.lora import AdapterError, merge_adapter, read_adapter
from duplex.model.lora_multi import apply_adapter, attach_adapters


@pytest.fixture()
def lora_io(fixtures_dir):
    return load_file(str(fixtures_dir / "lm_tiny_lora" / "io.safetensors"))


def assert_matches_fixture(lm, io):
    with torch.no_grad():
        out = lm(io["codes"])
    for ours, ref, mask in ((out.logits, io["logits"], io["mask"]),
                            (out.text_logits, io["text_logits"], io["text_mask"])):
        torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    gen = LMGen(lm, use_sampling=False)
    state = gen.init_state(2)
    selection = getattr(lm, "_test_selection", None)
    if selection is not None:
        for slot in range(2):
            selection.set_slot(slot, 1)
    tokens, _ = run(gen, state, io["gen_user_codes"])
    assert torch.equal(tokens[:, :, gen.max_delay:], io["gen_output"])


def test_merged_adapter_matches_fixture(fixtures_dir, lora_io):
    lm, base_io = fixture_lm(fixtures_dir, "lm_tiny")
    adapter = read_adapter(fixtures_dir / "lm_tiny_lora" / "lora.safetensors", lm)
    assert adapter.rank == 4 and adapter.scaling == 2.0
    assert merge_adapter(lm, adapter) == len(adapter.pairs)
    assert_matches_fixture(lm, lora_io)
    assert not torch.allclose(lora_io["text_logits"][lora_io["text_mask"]],
                              base_io["text_logits"][base_io["text_mask"]], atol=1e-2)


def test_unmerged_adapter_matches_fixture(fixtures_dir, lora_io):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    apply_adapter(lm, read_adapter(fixtures_dir / "lm_tiny_lora", lm))  # a folder works too
    assert_matches_fixture(lm, lora_io)


@pytest.mark.parametrize("strategy", ["gather", "concat"])
def test_batched_adapter_path_matches_fixture(fixtures_dir, lora_io, strategy):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    adapter = read_adapter(fixtures_dir / "lm_tiny_lora" / "lora.safetensors", lm)
    adapters = attach_adapters(lm, [adapter], batch_size=2, strategy=strategy)
    lm._test_selection = adapters.selection
    for slot in range(2):  # the teacher-forced pass maps B * T depth rows onto the 2 slots
        adapters.selection.set_slot(slot, 1)
    assert_matches_fixture(lm, lora_io)


def _copy_adapter(fixtures_dir, tmp_path, tensors, config_changes=None):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / "lora.safetensors"))
    config = json.loads((fixtures_dir / "lm_tiny_lora" / "config.json").read_text())
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "lora.safetensors"


def _fused(tensors, prefix, kind, sets, shared_a_from=0):
    """Replace per-step pairs prefix.{kind}s.{i} by one fused pair (A taken from one step)."""
    per_step = f"{prefix}.{kind}s."
    a = tensors[f"{per_step}{shared_a_from}.lora_A.weight"]
    bs = [tensors.pop(f"{per_step}{i}.lora_B.weight") for i in range(sets)]
    for i in range(sets):
        tensors.pop(f"{per_step}{i}.lora_A.weight")
    tensors[f"{prefix}.{kind}.lora_A.weight"] = a
    tensors[f"{prefix}.{kind}.lora_B.weight"] = torch.cat(bs, dim=0)


def test_fused_spelling_equals_per_step(fixtures_dir, tmp_path, lora_io):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    source = load_file(str(fixtures_dir / "lm_tiny_lora" / "lora.safetensors"))
    # The temporal transformer has one weight set: fused and per-step spellings are the same numbers.
    fused = dict(source)
    for layer in range(2):
        for kind in ("in_proj", "out_proj"):
            _fused(fused, f"transformer.layers.{layer}.self_attn", kind, sets=1)
    adapter = read_adapter(_copy_adapter(fixtures_dir, tmp_path, fused), lm)
    merge_adapter(lm, adapter)
    assert_matches_fixture(lm, lora_io)
    # The depth transformer has 8 sets: one shared A, B rows split over the per-step modules.
    shared = dict(source)
    for i in range(8):
        shared[f"depformer.layers.0.self_attn.in_projs.{i}.lora_A.weight"] = \
            source["depformer.layers.0.self_attn.in_projs.0.lora_A.weight"].clone()
    fused = dict(shared)
    _fused(fused, "depformer.layers.0.self_attn", "in_proj", sets=8)
    assert fused["depformer.layers.0.self_attn.in_proj.lora_B.weight"].shape == (8 * 96, 4)
    one = read_adapter(_copy_adapter(fixtures_dir, tmp_path, fused), lm)
    two = read_adapter(_copy_adapter(fixtures_dir, tmp_path, shared), lm)
    assert set(one.pairs) == set(two.pairs)
    for path in two.pairs:
        assert torch.equal(one.pairs[path][0], two.pairs[path][0]) and torch.equal(one.pairs[path][1], two.pairs[path][1])


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({"transformer.layers.0.nope.lora_A.weight": torch.zeros(4, 64),
                         "transformer.layers.0.nope.lora_B.weight": torch.zeros(64, 4)}),
     "unknown target(s) (not a linear layer of this LM): transformer.layers.0.nope"),
    (lambda t: [t.pop("text_linear.lora_A.weight"), t.pop("text_linear.lora_B.weight")],
     "linear layer(s) without an adapter: text_linear"),
    (lambda t: t.pop("text_linear.lora_B.weight"), "half pair(s): text_linear (no lora_B)"),
    (lambda t: t.update({"linears.0.lora_B.weight": torch.zeros(65, 4)}),
     "mis-shaped pair(s): linears.0 (lora_A (4, 32), lora_B (65, 4); expected (4, 32), (64, 4))"),
    (lambda t: t.update({"text_linear.weight": torch.zeros(100, 64)}),
     "not lora_A / lora_B weights: text_linear.weight"),
])
def test_strict_reading_names_the_problem(fixtures_dir, tmp_path, damage, message):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    tensors = load_file(str(fixtures_dir / "lm_tiny_lora" / "lora.safetensors"))
    damage(tensors)
    with pytest.raises(AdapterError) as err:
        read_adapter(_copy_adapter(fixtures_dir, tmp_path, tensors), lm)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 0
    if "without an adapter" not in message:
        assert "without an adapter" not in str(err.value)  # each problem reported once


def test_wrong_rank_and_bad_config_are_clear_errors(fixtures_dir, tmp_path):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    tensors = load_file(str(fixtures_dir / "lm_tiny_lora" / "lora.safetensors"))
    with pytest.raises(AdapterError, match=r"rank 8\).*mis-shaped"):
        read_adapter(_copy_adapter(fixtures_dir, tmp_path, tensors, {"lora_rank": 8}), lm)
    with pytest.raises(AdapterError, match="lora\": true"):
        read_adapter(_copy_adapter(fixtures_dir, tmp_path, tensors, {"lora": False}), lm)
    with pytest.raises(AdapterError, match="lora_scaling must be a number"):
        read_adapter(_copy_adapter(fixtures_dir, tmp_path, tensors, {"lora_scaling": "2"}), lm)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(fixtures_dir / "lm_tiny_lora" / "lora.safetensors", lonely / "lora.safetensors")
    with pytest.raises(AdapterError, match="adapter config not found"):
        read_adapter(lonely / "lora.safetensors", lm)
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "missing.safetensors", lm)
