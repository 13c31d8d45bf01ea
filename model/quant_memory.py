"""Resident memory of the full-size 7B loaded with int8 / int4 layers, without a 15 GB file.

``RandomCheckpoint`` serves the 7B's tensors in the published layout (fused attention, bfloat16),
made up one at a time when the loader asks for them, so ``load_quantized_lm`` runs its real
tensor-by-tensor path. ``python -m duplex.model.quant_memory int8`` prints the peak resident set
of the load (VmHWM, reset before loading) and the bytes the weights take.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .checkpoint import tensor_shapes
from .config import LMConfig
from .lm import LMModel
from .quant import weight_bytes
from .quant_loading import load_quantized_lm
from .quant_reader import TensorReader
from .spelling import published_shapes


class RandomCheckpoint(TensorReader):
    """A checkpoint whose tensors are random, made when read: key -> bfloat16 [shape]."""

    def __init__(self, config: LMConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        with torch.device("meta"):
            model = LMModel(config)
        self.what = "(random weights, published layout)"
        self.shapes = published_shapes(tensor_shapes(model.state_dict()))
        self.dtypes = {key: dtype for key in self.shapes}
        self._state, self._path = None, None
        self._generator = torch.Generator().manual_seed(seed)

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        tensor = torch.empty(shape, dtype=self.dtypes[key])
        return tensor.normal_(0.0, shape[-1] ** -0.5, generator=self._generator)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(mode: str, config: LMConfig | None = None) -> dict[str, float]:
    """Load the (7B) config with random weights quantized to ``mode``; memory figures in GiB."""
    config = config or LMConfig.moshi_7b()
    checkpoint = RandomCheckpoint(config)
    with torch.device("meta"):  # page in the code a load runs (~35 MB), outside the measurement
        LMModel(config)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    before = _status_bytes("VmRSS")
    lm = load_quantized_lm(checkpoint, config, dtype=torch.bfloat16, quantize=mode)
    peak = _status_bytes("VmHWM")
    return {"mode": mode, "weights_gib": weight_bytes(lm) / 2**30, "peak_rss_growth_gib": (peak - before) / 2**30,
            "peak_rss_gib": peak / 2**30, "parameters_b": sum(t.numel() for t in lm.parameters()) / 1e9}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO)
    mode = (argv or sys.argv[1:] or ["int8"])[0]
    print(json.dumps(measure(mode)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
