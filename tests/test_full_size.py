"""Full size: a random-weight Mimi with exactly the published keys and shapes loads through `duplex serve`'s
loading path and codes a frame; loading never holds two copies of the weights (peak RSS, measured with psutil
/ VmHWM in a subprocess); the random-checkpoint writer reproduces the published 7B layout."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from duplex.model.config import LMConfig
from duplex.model.lm import LMModel
from duplex.model.random_checkpoint import (
    layout_bytes,
    published_layout,
    read_key_listing,
    write_random_checkpoint,
)
from duplex.model.safetensors_io import read_header

MAX_PEAK_OVER_WEIGHTS = 1.3

SERVE_LOAD = """
import argparse, json, sys
import torch
from duplex.model.bench_load import peak_rss_bytes, reset_peak_rss, rss_bytes
from duplex.bundle_args import add_model_arguments, load_models
parser = argparse.ArgumentParser()
add_model_arguments(parser)
args = parser.parse_args(sys.argv[1:])
baseline = rss_bytes()
exact = reset_peak_rss()
bundle = load_models(args)  # what `duplex serve` calls
peak = peak_rss_bytes()
mimi = bundle.mimi
# the model's memory: weights plus derived buffers (codebook centroids, 67 MB at full size)
weights = sum(t.numel() * t.element_size() for t in [*mimi.parameters(), *mimi.buffers()])
frame = torch.randn(1, 1, bundle.frame_size) * 0.1  # [1, 1, 1920]
with torch.no_grad():
    codes = mimi.encode(frame)  # [1, 8, 1]
    audio = mimi.decode(codes)  # [1, 1, 1920]
print(json.dumps({"baseline": baseline, "peak": peak, "exact": exact, "mimi_bytes": weights,
                  "codes": list(codes.shape), "audio": list(audio.shape), "finite": bool(audio.isfinite().all()),
                  "in_range": bool(((codes >= 0) & (codes < 2048)).all()), "n_q": mimi.config.quantizer.n_q}))
"""


def run_python(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_full_size_mimi_loads_through_the_serve_loader(fixtures_dir, tiny_tokenizer_path, tmp_path):
    layout = read_key_listing(fixtures_dir / "mimi_keys.tsv")
    path = tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors"
    total = write_random_checkpoint(path, layout)
    assert 380e6 < total < 390e6 and len(read_header(path).entries) == 318
    out = run_python(SERVE_LOAD, "--mimi-weight", str(path), "--moshi-weight",
                     str(fixtures_dir / "lm_tiny" / "model.safetensors"), "--config",
                     str(fixtures_dir / "lm_tiny" / "config.json"), "--tokenizer", str(tiny_tokenizer_path),
                     "--device", "cpu")
    assert out["n_q"] == 32 and out["codes"] == [1, 8, 1] and out["audio"] == [1, 1, 1920]
    assert out["finite"] and out["in_range"]
    assert out["exact"]  # VmHWM was reset just before loading: the peak is the load's own
    increase = out["peak"] - out["baseline"]
    assert increase < MAX_PEAK_OVER_WEIGHTS * out["mimi_bytes"], (increase, out["mimi_bytes"])


def small_lm_config() -> LMConfig:
    """About 170 M parameters (340 MB in bfloat16): the Moshi structure, narrower and shallower."""
    return replace(LMConfig.moshi_7b(), dim=1024, num_heads=16, num_layers=4, depformer_dim=512,
                   depformer_num_heads=8, depformer_num_layers=2, depformer_dim_feedforward=int(4.125 * 512))


def test_lm_load_holds_one_copy_of_the_weights(tmp_path):
    config = small_lm_config()
    with torch.device("meta"):
        layout = published_layout(LMModel(config), torch.bfloat16)
    path = tmp_path / "lm.safetensors"
    write_random_checkpoint(path, layout)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({k: v for k, v in vars(config).items() if k != "extra"}))
    done = subprocess.run([sys.executable, "-m", "duplex.cli", "bench", "load", "--weights", str(path),
                           "--config", str(config_path), "--steps", "1", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert path.exists()  # an existing --weights file is loaded, not rewritten nor deleted
    assert figures["write_s"] == 0 and figures["peak_exact"]
    assert abs(figures["weights_gb"] * 1e9 - layout_bytes(layout)) < 1e6
    assert figures["peak_increase_over_weights"] < MAX_PEAK_OVER_WEIGHTS, figures
    assert len(figures["step_s"]) == 1 and figures["load_s"] > 0


def test_random_7b_layout_is_the_published_key_listing(fixtures_dir):
    listed = read_key_listing(fixtures_dir / "moshi_7b_keys.tsv", torch.bfloat16)
    with torch.device("meta"):
        ours = published_layout(LMModel(LMConfig.moshi_7b()), torch.bfloat16)
    assert sorted(listed) == sorted(ours) and len(ours) == 355
    assert 15.3e9 < layout_bytes(ours) < 15.5e9


def test_key_listing_errors_name_the_line(tmp_path):
    bad = tmp_path / "keys.tsv"
    bad.write_text("a.weight\t(2, 3)\ttorch.float32\nb.weight\t2, x\ttorch.float32\n")
    with pytest.raises(ValueError, match=r"keys.tsv:2: not 'key<TAB>\(shape\)<TAB>torch.dtype'"):
        read_key_listing(bad)


def test_bench_load_writes_a_missing_file_then_removes_it_unless_kept(fixtures_dir, tmp_path, capsys):
    from duplex.cli import main

    config = str(fixtures_dir / "lm_tiny" / "config.json")
    path = tmp_path / "written.safetensors"
    assert main(["bench", "load", "--config", config, "--weights", str(path), "--steps", "2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not path.exists() and figures["write_s"] > 0 and len(figures["step_s"]) == 2
    assert main(["bench", "load", "--config", config, "--weights", str(path), "--steps", "0", "--keep"]) == 0
    table = capsys.readouterr().out
    assert path.exists() and "peak increase / weights" in table and "load time" in table
    header = read_header(path)
    with torch.device("meta"):
        expected = published_layout(LMModel(LMConfig.from_kyutai(config)), torch.bfloat16)
    assert [(k, e.dtype, e.shape) for k, e in sorted(header.entries.items())] == expected
