"""--quantize in every command, the KV-cache capacity log, and the LoRA rule for quantized models."""

from __future__ import annotations

import copy
import re
import logging

import numpy as np
import pytest
import soundfile
import torch
from lm_test_utils import fixture_lm

from duplex.cli import main as duplex_main
from duplex.model.config import LMConfig
from duplex.model.generate import LMGen
from duplex.model.lm import LMModel
from duplex.model.quant import Int4Linear, Int8Linear, QuantizeError, quantize_model
from duplex.model.quant_cli import kv_cache_bytes, log_kv_capacity, refuse_adapter_on_quantized
from duplex.model.quant_loading import fast_compute_dtype, load_quantized_lm
from duplex.bundle import load_models_from_paths


def model_flags(fixtures_dir, tokenizer) -> list[str]:
    return ["--moshi-weight", str(fixtures_dir / "lm_tiny/model.safetensors"),
            "--mimi-weight", str(fixtures_dir / "mimi_tiny/model.safetensors"),
            "--mimi-config", str(fixtures_dir / "mimi_tiny/config.json"),
            "--tokenizer", str(tokenizer), "--device", "cpu"]


@pytest.mark.parametrize("command", [["serve"], ["infer"], ["bench", "lm"], ["bench", "serve"], ["bench", "load"],
                                     ["bench", "server"]])
def test_every_command_documents_quantize(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        duplex_main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "--quantize {int8,int4}" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["infer", "a.wav", "b.wav"], ["bench", "lm"]])
def test_unknown_quantize_value_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        duplex_main([*command, "--quantize", "int3"])
    assert exit_info.value.code == 2
    pattern = r"argument --quantize: invalid choice: 'int3' \(choose from '?int8'?, '?int4'?\)"
    assert re.search(pattern, capsys.readouterr().err)


@pytest.mark.parametrize("mode, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_models_bundle_quantizes_on_load(fixtures_dir, tiny_tokenizer_path, mode, layer):
    models = load_models_from_paths(
        fixtures_dir / "lm_tiny/model.safetensors", fixtures_dir / "mimi_tiny/model.safetensors",
        tiny_tokenizer_path, config=fixtures_dir / "lm_tiny/config.json",
        mimi_config=fixtures_dir / "mimi_tiny/config.json", quantize=mode)
    kinds = {type(m) for m in models.lm.modules()}
    assert layer in kinds and torch.nn.Linear not in kinds
    # float32 on the CPU: the quantized layers compute in bfloat16, the rest of the model in float32
    assert models.lm.transformer.layers[0].self_attn.in_projs[0].compute_dtype == torch.bfloat16
    assert models.lm.dtype == torch.float32
    assert fast_compute_dtype(torch.float32, "cpu") == torch.bfloat16
    assert fast_compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16


def test_infer_runs_quantized(fixtures_dir, tiny_tokenizer_path, tmp_path):
    source = tmp_path / "in.wav"
    soundfile.write(source, np.zeros(12000, dtype=np.float32), 24000, subtype="FLOAT")
    argv = ["infer", str(source), str(tmp_path / "out.wav"), "--quantize", "int4", "--no-progress",
            *model_flags(fixtures_dir, tiny_tokenizer_path)]
    assert duplex_main(argv) == 0
    assert (tmp_path / "out.wav").stat().st_size > 0


def test_bench_lm_quantize_prints_float_and_quantized_rows(fixtures_dir, capsys):
    threads = torch.get_num_threads()
    try:
        code = duplex_main(["bench", "lm", "--config", str(fixtures_dir / "lm_tiny" / "config.json"), "--steps", "2",
                            "--warmup", "1", "--batch-sizes", "1", "2", "--threads", "1", "--device", "cpu",
                            "--quantize", "int8"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    labels = [line.rsplit(maxsplit=8)[0].strip() for line in out.splitlines()
              if len(line.split()) >= 9 and line.split()[-7].isdigit()]
    assert labels == ["float32"] * 2 + ["bfloat16"] * 2 + ["int8 f32+bf16 layers"] * 2 + ["int8 bf16"] * 2
    assert "relative logit error" in out and "top-1 agreement" in out


def test_kv_cache_bytes_match_what_generation_allocates(fixtures_dir):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    state = LMGen(lm).init_state(1)
    allocated = sum(t.numel() * t.element_size() for transformer in (state.temporal, state.depth)
                    for t in (*transformer.keys, *transformer.values))
    assert kv_cache_bytes(lm.config, torch.float32) == allocated
    # the 7B: 32 layers x (keys + values) x 4096 x 3000 steps in bfloat16 ~ 1.5 GiB, plus the depth transformer
    assert kv_cache_bytes(LMConfig.moshi_7b(), torch.bfloat16) == 2 * 32 * 4096 * 3000 * 2 + 2 * 6 * 1024 * 8 * 2


def test_capacity_is_logged(fixtures_dir, caplog):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    with caplog.at_level(logging.INFO, logger="duplex.model.quant_cli"):
        per_conversation, fits = log_kv_capacity(lm, torch.device("cpu"))
    assert per_conversation == kv_cache_bytes(lm.config, torch.float32)
    assert fits is None or fits > 1000
    assert "MB per conversation" in caplog.text and "conversations fit" in caplog.text


def test_adapter_on_a_quantized_model_is_refused(fixtures_dir):
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    refuse_adapter_on_quantized(lm)  # a float model takes adapters
    with pytest.raises(QuantizeError, match="cannot attach a LoRA adapter to a quantized LM: merge it"):
        refuse_adapter_on_quantized(quantize_model(lm, "int8"))


def test_weight_hook_merges_before_quantizing(fixtures_dir):
    """A LoRA-style delta merged layer by layer while loading == merged into the float model, then quantized."""
    folder = fixtures_dir / "lm_tiny"
    target = "transformer.layers.1.gating.linear_in"
    torch.manual_seed(0)
    delta = 0.05 * torch.randn(352, 4) @ torch.randn(4, 64)  # a rank-4 update [N, K]
    seen = []

    def merge(name, weight):
        seen.append(name)
        return weight + delta if name == target else weight

    config = LMConfig.from_kyutai(folder / "config.json")
    hooked = load_quantized_lm(folder / "model.safetensors", config, dtype=torch.float32, quantize="int8",
                               weight_hook=merge)
    reference, _ = fixture_lm(fixtures_dir, "lm_tiny")
    merged = copy.deepcopy(reference)
    with torch.no_grad():
        merged.get_submodule(target).weight += delta
    quantize_model(merged, "int8")
    assert len(seen) == sum(isinstance(m, torch.nn.Linear) for m in reference.modules())
    assert torch.equal(hooked.get_submodule(target).qweight, merged.get_submodule(target).qweight)
    assert not torch.equal(hooked.get_submodule(target).qweight,
                           quantize_model(reference, "int8").get_submodule(target).qweight)


def test_unknown_quantize_in_python_api(fixtures_dir):
    with pytest.raises(QuantizeError, match="unknown quantize value 'fp4'"):
        LMModel.from_pretrained(fixtures_dir / "lm_tiny/model.safetensors", quantize="fp4")


def test_bench_load_quantizes(fixtures_dir, tmp_path, capsys):
    code = duplex_main(["bench", "load", "--config", str(fixtures_dir / "lm_tiny/config.json"), "--steps", "1",
                        "--dtype", "float32", "--weights", str(tmp_path / "lm.safetensors"), "--quantize", "int4",
                        "--json"])
    assert code == 0
    assert '"weights_gb"' in capsys.readouterr().out
