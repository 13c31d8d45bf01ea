"""Model sources (duplex.bundle_args): local paths, file:// URLs, hf:// through a fake local Hub
cache, config.json keys, and clear errors for missing files or an unreachable hub."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from duplex import sources as model_sources
from duplex.bundle_args import (
    DEFAULT_HF_REPO,
    ModelSourceError,
    add_model_arguments,
    load_models,
    pick_device,
    pick_dtype,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


def tiny_argv(fixtures: Path, tokenizer: Path, url: bool = False) -> list[str]:
    def src(path: Path) -> str:
        return path.resolve().as_uri() if url else str(path)

    return [
        "--moshi-weight", src(fixtures / "lm_tiny/model.safetensors"),
        "--config", src(fixtures / "lm_tiny/config.json"),
        "--mimi-weight", src(fixtures / "mimi_tiny/model.safetensors"),
        "--mimi-config", src(fixtures / "mimi_tiny/config.json"),
        "--tokenizer", src(tokenizer),
        "--device", "cpu",
    ]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, fixtures_dir, tiny_tokenizer_path):
    """A Hugging Face cache holding a tiny model repo, with the hub in offline mode."""
    from huggingface_hub import constants

    repo_dir = tmp_path / "hub" / "models--acme--tiny-moshi"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    config = json.loads((fixtures_dir / "lm_tiny/config.json").read_text())
    config.update(
        moshi_name="lm.safetensors", mimi_name="codec.safetensors", tokenizer_name="text.model",
        mimi_config_name="codec.json", model_type="moshi",
        lm_gen_config={"use_sampling": True, "temp": 0.5, "top_k_text": 7},
    )
    (snapshot / "config.json").write_text(json.dumps(config))
    shutil.copy(fixtures_dir / "lm_tiny/model.safetensors", snapshot / "lm.safetensors")
    shutil.copy(fixtures_dir / "mimi_tiny/model.safetensors", snapshot / "codec.safetensors")
    shutil.copy(fixtures_dir / "mimi_tiny/config.json", snapshot / "codec.json")
    shutil.copy(tiny_tokenizer_path, snapshot / "text.model")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def assert_tiny_models(models) -> None:
    assert models.lm.config.dim == 64 and models.lm.config.n_q == 16
    assert models.mimi.num_codebooks == 8
    assert models.device == torch.device("cpu") and models.dtype == torch.float32
    assert models.tokenizer is not None


def test_local_paths_load_the_tiny_models(fixtures_dir, tiny_tokenizer_path):
    models = load_models(parse(*tiny_argv(fixtures_dir, tiny_tokenizer_path)))
    assert_tiny_models(models)
    assert models.lm_gen_defaults["use_sampling"] is False  # lm_tiny's lm_gen_config: greedy
    assert models.lm_gen_defaults["temp"] == 0.8  # untouched defaults stay
    assert models.model_name == "lm_tiny/model.safetensors"


def test_file_urls_load_the_same_models(fixtures_dir, tiny_tokenizer_path):
    models = load_models(parse(*tiny_argv(fixtures_dir, tiny_tokenizer_path, url=True)))
    assert_tiny_models(models)
    reference = load_models(parse(*tiny_argv(fixtures_dir, tiny_tokenizer_path)))
    for (name, a), (_, b) in zip(models.lm.state_dict().items(), reference.lm.state_dict().items()):
        assert torch.equal(a, b), name


def test_hub_repo_config_keys_are_honoured(fake_hub):
    models = load_models(parse("--hf-repo", "acme/tiny-moshi", "--device", "cpu"))
    assert_tiny_models(models)
    assert models.model_name == "acme/tiny-moshi"
    assert models.lm_gen_defaults == {
        "use_sampling": True, "temp": 0.5, "temp_text": 0.7, "top_k": 250, "top_k_text": 7,
    }
    assert models.config["moshi_name"] == "lm.safetensors"


def test_hf_urls_for_single_files(fake_hub, fixtures_dir, tiny_tokenizer_path):
    argv = tiny_argv(fixtures_dir, tiny_tokenizer_path)
    argv[argv.index("--moshi-weight") + 1] = "hf://acme/tiny-moshi/lm.safetensors"
    argv[argv.index("--mimi-config") + 1] = "hf://acme/tiny-moshi/codec.json"
    models = load_models(parse(*argv))
    assert_tiny_models(models)
    assert models.model_name == "acme/tiny-moshi/lm.safetensors"


def test_hf_weights_take_the_config_of_their_own_repo(fake_hub, fixtures_dir, tiny_tokenizer_path):
    # No --config: the LM config comes from acme/tiny-moshi (the weights' repo), not the default --hf-repo.
    models = load_models(parse(
        "--moshi-weight", "hf://acme/tiny-moshi/lm.safetensors",
        "--mimi-weight", str(fixtures_dir / "mimi_tiny/model.safetensors"),
        "--mimi-config", str(fixtures_dir / "mimi_tiny/config.json"),
        "--tokenizer", str(tiny_tokenizer_path), "--device", "cpu",
    ))
    assert_tiny_models(models)
    assert models.lm_gen_defaults["top_k_text"] == 7  # the fake repo's lm_gen_config


def test_missing_local_file_is_one_clear_error(fixtures_dir, tiny_tokenizer_path, tmp_path):
    argv = tiny_argv(fixtures_dir, tiny_tokenizer_path)
    argv[argv.index("--mimi-weight") + 1] = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelSourceError, match=r"Mimi codec weights: file not found: .*nope\.safetensors"):
        load_models(parse(*argv))


def test_file_not_in_offline_cache_is_a_clear_error(fake_hub, fixtures_dir, tiny_tokenizer_path):
    argv = tiny_argv(fixtures_dir, tiny_tokenizer_path)
    argv[argv.index("--moshi-weight") + 1] = "hf://acme/tiny-moshi/missing.safetensors"
    with pytest.raises(ModelSourceError, match="missing.safetensors.*not in the local cache"):
        load_models(parse(*argv))


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(repo_id, filename, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ModelSourceError, match="cannot fetch config.json .*huggingface.co"):
        load_models(parse("--device", "cpu"))  # default repo: config.json is fetched first

    calls = []

    def unreachable_and_not_cached(repo_id, filename, **kwargs):  # what huggingface_hub raises offline-less
        calls.append(filename)
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable_and_not_cached)
    with pytest.raises(ModelSourceError, match="Hub is unreachable .*HF_HUB_OFFLINE=1"):
        load_models(parse("--device", "cpu"))
    assert calls == ["config.json"]  # one clear error at once, no second wait for the weights


def test_bad_sources_and_model_types(tmp_path, fixtures_dir, tiny_tokenizer_path):
    with pytest.raises(ModelSourceError, match="expected hf://OWNER/REPO/FILE"):
        model_sources.resolve_source("hf://just-a-repo", "thing")
    config = json.loads((fixtures_dir / "lm_tiny/config.json").read_text())
    config["model_type"] = "hibiki"
    (tmp_path / "c.json").write_text(json.dumps(config))
    argv = tiny_argv(fixtures_dir, tiny_tokenizer_path)
    argv[argv.index("--config") + 1] = str(tmp_path / "c.json")
    with pytest.raises(ModelSourceError, match="model_type 'hibiki' is not supported"):
        load_models(parse(*argv))
    argv[argv.index("--config") + 1] = str(fixtures_dir / "lm_tiny/config.json")
    (tmp_path / "tok.model").write_bytes(b"not a sentencepiece model")
    argv[argv.index("--tokenizer") + 1] = str(tmp_path / "tok.model")
    with pytest.raises(ModelSourceError, match=r"text tokenizer: cannot load .*tok\.model"):
        load_models(parse(*argv))
    (tmp_path / "bad.json").write_text("{not json")
    argv[argv.index("--config") + 1] = str(tmp_path / "bad.json")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        load_models(parse(*argv))


def test_config_next_to_local_weights_then_7b_preset(fixtures_dir, tiny_tokenizer_path, tmp_path, monkeypatch):
    import huggingface_hub

    def must_not_download(*args, **kwargs):
        raise AssertionError("the hub must not be contacted when every file is given")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    argv = tiny_argv(fixtures_dir, tiny_tokenizer_path)
    i = argv.index("--config")
    del argv[i : i + 2]  # lm_tiny/config.json sits next to the weights: used, lm_gen_config included
    models = load_models(parse(*argv))
    assert_tiny_models(models)
    assert models.lm_gen_defaults["use_sampling"] is False
    # alone in a folder, the weights meet the Moshi 7B preset, which they do not fit
    shutil.copy(fixtures_dir / "lm_tiny/model.safetensors", tmp_path / "lm.safetensors")
    argv[argv.index("--moshi-weight") + 1] = str(tmp_path / "lm.safetensors")
    with pytest.raises(ModelSourceError, match=r"Moshi LM weights: cannot load .*lm\.safetensors.*mis-shaped"):
        load_models(parse(*argv))


def test_defaults_and_help_texts(monkeypatch):
    args = parse()
    assert args.hf_repo == DEFAULT_HF_REPO
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelSourceError, match="CUDA is not available"):
        load_models(parse("--device", "cuda"))
    assert pick_device(None) == torch.device("cpu")
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
