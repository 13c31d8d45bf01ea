"""Quantize-on-load never holds the float model: peak RSS of a loading subprocess, against a float load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from duplex.model.config import LMConfig
from duplex.model.lm import LMModel
from duplex.model.loading import save_lm

SCRIPT = """
import json, sys, torch
from duplex.model.config import LMConfig
from duplex.model.lm import LMModel
from duplex.model.quant import weight_bytes
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
from duplex.model.quant import quantize_model
for mode in ("int8", "int4"):  # page in the code the load runs, so that the growth counts tensors only
    quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)), mode)(torch.ones(2, 64))
with torch.device("meta"):  # the first model built on meta pages in ~35 MB of torch code
    LMModel(LMConfig.moshi_7b())
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets the peak resident set (VmHWM) to the current one
before = status_kib("VmRSS")
quantize = None if sys.argv[2] == "none" else sys.argv[2]
lm = LMModel.from_pretrained(sys.argv[1], dtype=torch.float32,
                             quantize=quantize)
if quantize is None:  # page in an mmap-backed float model, so that the control counts all of it
    sum(float(t.sum()) for t in lm.state_dict().values())
peak = status_kib("VmHWM")
print(json.dumps({"growth": peak - before, "weights": weight_bytes(lm)}))
"""


def mid_size_config() -> LMConfig:
    """~32 M parameters (~130 MB in float32) in the 7B structure, no tensor above 5 % of the total."""
    return replace(LMConfig.moshi_7b(), dim=512, num_heads=8, num_layers=4, text_card=2000, card=256,
                   depformer_dim=256, depformer_num_heads=4, depformer_num_layers=2,
                   depformer_dim_feedforward=1056, context=20)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mid")
    config = mid_size_config()
    torch.manual_seed(0)
    lm = LMModel(config)
    save_lm(lm, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(kyutai_dict(config)))
    return folder / "model.safetensors"


def kyutai_dict(config: LMConfig) -> dict:
    from dataclasses import asdict

    raw = {k: v for k, v in asdict(config).items() if k != "extra"}
    raw["delays"] = list(raw["delays"])
    return raw


def load_in_subprocess(path, quantize: str) -> dict:
    # A fixed malloc mmap threshold: freed tensors go back to the system at once, so the peak
    # counts live tensors, not what glibc's heap keeps cached after a free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), quantize], capture_output=True, text=True,
                         timeout=120, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantize_on_load_peak_memory_stays_below_the_float_model(float_checkpoint):
    file_bytes = float_checkpoint.stat().st_size
    float_load = load_in_subprocess(float_checkpoint, "none")
    int8_load = load_in_subprocess(float_checkpoint, "int8")
    int4_load = load_in_subprocess(float_checkpoint, "int4")
    assert float_load["growth"] > 0.9 * file_bytes  # the measurement can see a float model
    # quantized: its own weights plus one float tensor at a time, never the float model
    assert int8_load["weights"] < 0.4 * file_bytes
    assert int8_load["growth"] < 0.5 * float_load["growth"]
    assert int8_load["growth"] < int8_load["weights"] + 0.15 * file_bytes
    assert int4_load["weights"] < int8_load["weights"]
    assert int4_load["growth"] < int8_load["weights"] + 0.15 * file_bytes
