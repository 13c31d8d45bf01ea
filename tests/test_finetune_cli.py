"""`duplex finetune` end to end on the tiny models; its output serves with --lora-weight and --adapter."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from duplex.model.finetune_demo import make_demo_dataset as make_dataset
from lm_test_utils import fixture_lm

from duplex.cli import main as duplex_main
from duplex.model.lora import read_adapter
from duplex.model.tokenizer import TextTokenizer
from duplex.bundle_args import add_model_arguments, load_models
from duplex.sources import ModelSourceError


def model_argv(fixtures, tokenizer) -> list[str]:
    return ["--moshi-weight", str(fixtures / "lm_tiny/model.safetensors"),
            "--config", str(fixtures / "lm_tiny/config.json"),
            "--mimi-weight", str(fixtures / "mimi_tiny/model.safetensors"),
            "--mimi-config", str(fixtures / "mimi_tiny/config.json"),
            "--tokenizer", str(tokenizer), "--device", "cpu"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def trained(fixtures_dir, tiny_tokenizer_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    manifest = make_dataset(folder / "data", TextTokenizer(tiny_tokenizer_path), files=2, seconds=2.0)
    out = folder / "out"
    code = duplex_main(["finetune", str(manifest), "--output", str(out), "--rank", "4", "--lr", "1e-3",
                        "--steps", "4", "--batch-size", "2", "--duration", "2", "--checkpoint-every", "2",
                        "--no-progress", "--threads", "1", *model_argv(fixtures_dir, tiny_tokenizer_path)])
    assert code == 0
    return out, manifest


def test_finetune_writes_an_upstream_adapter_and_checkpoints(trained, fixtures_dir):
    out, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["lora"] is True and config["lora_rank"] == 4 and config["lora_scaling"] == 2.0
    assert config["dim"] == 64 and config["delays"] == json.loads((fixtures_dir / "lm_tiny/config.json").read_text())["delays"]
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    adapter = read_adapter(out / "lora.safetensors", lm)
    assert any(b.abs().sum() > 0 for _, b in adapter.pairs.values())  # it trained
    for step in (2, 4):
        assert (out / "checkpoints" / f"step_{step:06d}" / "lora.safetensors").is_file()


def test_finetune_resumes(trained, fixtures_dir, tiny_tokenizer_path, capsys):
    out, manifest = trained
    code = duplex_main(["finetune", str(manifest), "--output", str(out), "--rank", "4", "--steps", "6",
                        "--batch-size", "2", "--duration", "2", "--checkpoint-every", "2", "--resume",
                        "--no-progress", *model_argv(fixtures_dir, tiny_tokenizer_path)])
    assert code == 0
    assert "2 step(s)" in capsys.readouterr().err  # steps 5 and 6 only
    assert (out / "checkpoints" / "step_000006" / "trainer.pt").is_file()


def test_output_serves_merged_and_per_conversation(trained, fixtures_dir, tiny_tokenizer_path):
    out, _ = trained
    argv = model_argv(fixtures_dir, tiny_tokenizer_path)
    plain = load_models(parse(*argv))
    merged = load_models(parse(*argv, "--lora-weight", str(out / "lora.safetensors")))
    changed = [name for name, p in merged.lm.named_parameters()
               if not torch.equal(p, dict(plain.lm.named_parameters())[name])]
    assert "text_linear.weight" in changed
    served = load_models(parse(*argv, "--adapter", f"mine={out}", "--adapter",
                               f"fixture={fixtures_dir / 'lm_tiny_lora' / 'lora.safetensors'}"))
    assert served.lm.adapter_set.names == ["mine", "fixture"]


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "no-equals-sign"], "NAME=PATH"),
    (["--adapter", "x=/nowhere/lora.safetensors"], "adapter config not found"),
    (["--lora-weight", "/nowhere/lora.safetensors"], "adapter config not found"),
])
def test_bad_adapter_flags_are_one_line_errors(fixtures_dir, tiny_tokenizer_path, flags, message):
    with pytest.raises(ModelSourceError, match=message) as err:
        load_models(parse(*model_argv(fixtures_dir, tiny_tokenizer_path), *flags))
    assert "\n" not in str(err.value)


def test_finetune_reports_dataset_errors(tmp_path, capsys, fixtures_dir, tiny_tokenizer_path):
    code = duplex_main(["finetune", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o"),
                        *model_argv(fixtures_dir, tiny_tokenizer_path)])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"duplex finetune: error: dataset not found: {tmp_path / 'none.jsonl'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav"}\n')
    assert duplex_main(["finetune", str(bad), "--output", str(tmp_path / "o"),
                        *model_argv(fixtures_dir, tiny_tokenizer_path)]) == 1
    assert "bad.jsonl:1: expected" in capsys.readouterr().err


def test_full_finetune_writes_a_loadable_checkpoint(trained, fixtures_dir, tiny_tokenizer_path, tmp_path):
    _, manifest = trained
    out = tmp_path / "full"
    assert duplex_main(["finetune", str(manifest), "--output", str(out), "--full", "--lr", "1e-4", "--steps", "2",
                        "--batch-size", "1", "--duration", "2", "--checkpoint-every", "0", "--no-progress",
                        *model_argv(fixtures_dir, tiny_tokenizer_path)]) == 0
    from duplex.model.loading import load_lm

    tuned = load_lm(out / "model.safetensors", dtype=torch.float32)  # config.json beside it
    base, _ = fixture_lm(fixtures_dir, "lm_tiny")
    assert not torch.equal(tuned.text_linear.weight, base.text_linear.weight)
    assert "lora" not in json.loads((out / "config.json").read_text())


def test_finetune_refuses_serving_adapters(trained, fixtures_dir, tiny_tokenizer_path, tmp_path, capsys):
    _, manifest = trained
    assert duplex_main(["finetune", str(manifest), "--output", str(tmp_path), "--adapter", "a=b",
                        *model_argv(fixtures_dir, tiny_tokenizer_path)]) == 1
    assert "--adapter is for serving" in capsys.readouterr().err


def test_finetune_refuses_a_dataset_without_the_main_speaker(trained, fixtures_dir, tiny_tokenizer_path, tmp_path,
                                                              capsys):
    _, manifest = trained
    assert duplex_main(["finetune", str(manifest), "--output", str(tmp_path), "--main-speaker", "MOSHI",
                        *model_argv(fixtures_dir, tiny_tokenizer_path)]) == 1
    assert "no word of the alignments is by 'MOSHI' (speakers found: SPEAKER_MAIN, SPEAKER_OTHER)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lora-weight", "--adapter"])
def test_adapters_with_quantize_are_refused_with_one_clear_line(trained, fixtures_dir, tiny_tokenizer_path, flag):
    """Adapters and --quantize: refused at load (merge into a float checkpoint first), never a silent float path."""
    out, _ = trained
    value = str(out / "lora.safetensors") if flag == "--lora-weight" else f"mine={out}"
    args = parse(*model_argv(fixtures_dir, tiny_tokenizer_path), "--quantize", "int8", flag, value)
    with pytest.raises(ModelSourceError, match=f"cannot attach {flag} to a quantized LM: merge it"):
        load_models(args)
