"""One symmetric public API (duplex.model as duplex.codec) and the model-family seam (duplex.bundle)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from duplex.bundle import (
    MODEL_BUILDERS,
    BundleFiles,
    ModelBundle,
    build_moshi,
    builder_for,
    load_bundle,
    load_models_from_paths,
)
from duplex.codec import Mimi, MimiConfig, random_mimi, save_mimi
from duplex.model import LMConfig, LMModel
from duplex.sources import ModelSourceError


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_public_names_import_lazily():
    out = run_python(
        "import sys, duplex.model, duplex.codec\n"
        "heavy = [m for m in ('duplex.model.lm', 'duplex.model.generate', 'sentencepiece') if m in sys.modules]\n"
        "from duplex.model import LMModel, LMGen, LMConfig, TextTokenizer, load_lm, save_lm\n"
        "from duplex.codec import Mimi, MimiConfig\n"
        "import duplex.bundle_args\n"
        "print(heavy, LMModel.__name__, LMGen.__name__, TextTokenizer.__name__,\n"
        "      [m for m in sys.modules if m.startswith('duplex.server')])\n")
    assert out.split() == ["[]", "LMModel", "LMGen", "TextTokenizer", "[]"]


def test_unknown_name_is_an_attribute_error():
    import duplex.model

    with pytest.raises(AttributeError, match="NoSuchThing"):
        duplex.model.NoSuchThing  # noqa: B018
    assert {"LMModel", "LMGen", "LMConfig", "TextTokenizer"} <= set(dir(duplex.model))


def test_lm_from_pretrained_accepts_config_object_dict_or_path(fixtures_dir):
    folder = fixtures_dir / "lm_options_tiny"
    raw = json.loads((folder / "config.json").read_text())
    forms = [LMConfig.from_kyutai(raw), raw, folder / "config.json", str(folder / "config.json")]
    models = [LMModel.from_pretrained(folder / "model.safetensors", config=form, dtype=torch.float32) for form in forms]
    assert all(m.config == models[0].config for m in models)
    first = models[0].state_dict()
    assert all(torch.equal(first[k], m.state_dict()[k]) for m in models[1:] for k in first)


def test_mimi_from_pretrained_accepts_the_same_forms(fixtures_dir):
    folder = fixtures_dir / "mimi_tiny"
    raw = json.loads((folder / "config.json").read_text())
    forms = [MimiConfig.from_kyutai(raw), raw, folder / "config.json", str(folder / "config.json")]
    models = [Mimi.from_pretrained(folder / "model.safetensors", config=form) for form in forms]
    assert all(m.config == models[0].config for m in models)


def test_both_loaders_follow_the_same_dtype_rule(fixtures_dir, tmp_path):
    for name, load in (("lm_tiny", lambda p, c, d: LMModel.from_pretrained(p, config=c, dtype=d)),
                       ("mimi_tiny", lambda p, c, d: Mimi.from_pretrained(p, config=c, dtype=d))):
        folder = fixtures_dir / name
        bf16 = tmp_path / f"{name}.bf16.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}, str(bf16))
        for dtype in (torch.float32, torch.bfloat16):
            model = load(bf16, folder / "config.json", dtype)
            assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {dtype}
    from duplex.codec import load_mimi

    for loader in (LMModel.from_pretrained, load_mimi):  # Mimi.from_pretrained defers to load_mimi
        assert "never rejected" in loader.__doc__ and "before any tensor is read" in loader.__doc__


# ---------------------------------------------------------------- the model-family seam
def test_one_table_of_model_families():
    assert MODEL_BUILDERS == {"moshi": build_moshi}
    assert builder_for({}) is build_moshi and builder_for({"model_type": "moshi"}) is build_moshi


@pytest.mark.parametrize("model_type", ["hibiki", "stt", "personaplex", "tts"])
def test_other_kyutai_families_are_refused_by_name(model_type):
    with pytest.raises(ModelSourceError, match=rf"model_type '{model_type}' is not supported yet \(.+\): "
                                               r"duplex runs model_type moshi only"):
        builder_for({"model_type": model_type})


def test_unknown_family_is_refused():
    with pytest.raises(ModelSourceError, match="unknown model_type 'whisper'"):
        load_bundle(BundleFiles("a", "b", "c", {"model_type": "whisper"}))


def test_audio_constants_come_from_the_loaded_models(fixtures_dir, tiny_tokenizer_path, tmp_path):
    """A codec at 16 kHz / 10 Hz: the bundle reports its frame size, not Mimi's usual 1920."""
    raw = json.loads((fixtures_dir / "mimi_tiny" / "config.json").read_text())
    raw.update(sample_rate=16000, frame_rate=10.0)
    raw["seanet"]["ratios"] = [8, 5, 4, 5]
    save_mimi(random_mimi(MimiConfig.from_kyutai(raw)), tmp_path / "codec.safetensors")
    bundle = load_models_from_paths(fixtures_dir / "lm_tiny" / "model.safetensors", tmp_path / "codec.safetensors",
                                    tiny_tokenizer_path, config=fixtures_dir / "lm_tiny" / "config.json",
                                    mimi_config=raw)
    assert isinstance(bundle, ModelBundle) and bundle.model_type == "moshi"
    assert (bundle.frame_size, bundle.sample_rate, bundle.frame_rate) == (1600, 16000, 10.0)
    assert (bundle.num_codebooks, bundle.model_codebooks, bundle.user_codebooks) == (8, 8, 8)
