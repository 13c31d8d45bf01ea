"""``duplex bench lm``: LM step latency (temporal + depth), tokens/s and peak memory, random weights."""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch

from ..codec.config import MimiConfig
from .config import LMConfig
from .devices import device_from_flags
from .generate import LMGen, LMGenState
from .lm import LMModel

logger = logging.getLogger(__name__)

FRAME_MS = 1000.0 / MimiConfig.official().frame_rate  # one Mimi frame (80 ms at 12.5 Hz)


def preset(name: str) -> LMConfig:
    """The benchmark configs: ``300m`` (dim 1024, 8 layers, depformer 512 x 4) and ``7b``."""
    moshi = LMConfig.moshi_7b()
    if name == "7b":
        return moshi
    if name == "300m":
        return replace(moshi, dim=1024, num_heads=16, num_layers=8, depformer_dim=512, depformer_num_heads=8,
                       depformer_num_layers=4, depformer_dim_feedforward=int(4.125 * 512))
    raise ValueError(f"unknown preset {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("300m", "7b"), default=None,
                        help="model size: 300m (dim 1024, 8 layers, depformer 512x4; default on CPU) "
                             "or 7b (Moshi 7B; default on CUDA)")
    parser.add_argument("--config", default=None,
                        help="a Kyutai LM config.json to benchmark instead of a preset")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weight and activation dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="batch sizes (concurrent conversations) to measure")
    parser.add_argument("--steps", type=int, default=30, help="timed generation steps per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--greedy", action="store_true",
                        help="argmax decoding instead of the default sampling (temp 0.8/0.7, top-k 250/25)")
    from .quant_cli import add_quantize_argument

    add_quantize_argument(parser)  # with it: float32, bfloat16 and the quantized LM side by side
    parser.add_argument("--floor", action="store_true",
                        help="also time the bare matrix products of one step (every weight read once), "
                             "a machine-specific lower bound to compare the step with")


def main(args: argparse.Namespace) -> int:
    try:
        device = device_from_flags(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        config = LMConfig.from_kyutai(args.config) if args.config else preset(
            args.preset or ("7b" if device.type == "cuda" else "300m"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.quantize:
        from .quant_bench import compare_quantized

        return compare_quantized(args, config, device)
    lm = build_random_lm(config, device, dtype)
    params = sum(p.numel() for p in lm.parameters())
    print(f"LM {params / 1e6:.0f} M parameters, {dtype}, {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
          f"{'greedy' if args.greedy else 'sampling'}; context {config.context}")
    print(f"{'batch':>5} {'temporal ms':>12} {'depth ms':>9} {'step ms':>8} {'p90 ms':>7} {'cpu ms':>7} "
          f"{'frames/s':>9} {'tokens/s':>9} {'peak MB':>8}" + (f" {'floor ms':>9}" if args.floor else ""))
    for batch in args.batch_sizes:
        row = measure(lm, batch, args.steps, args.warmup, not args.greedy)
        floor = f" {matmul_floor_ms(lm, batch):>9.2f}" if args.floor else ""
        print(f"{batch:>5} {row['temporal']:>12.2f} {row['depth']:>9.2f} {row['step']:>8.2f} {row['p90']:>7.2f} "
              f"{row['cpu']:>7.2f} {row['frames']:>9.1f} {row['tokens']:>9.0f} {row['peak_mb']:>8.0f}{floor}")
    print(f"(real time needs step ms < {FRAME_MS:.0f}: one 80 ms frame per step; cpu ms = process CPU time "
          "per step, all threads; floor ms = the step's matrix products alone, "
          "in CPU time on CPU)")
    return 0


@torch.inference_mode()
def build_random_lm(config: LMConfig, device: torch.device, dtype: torch.dtype) -> LMModel:
    """An LM with random weights, allocated once on the device (no float32 copy of a 7B model)."""
    with torch.device("meta"):
        lm = LMModel(config, dtype=dtype)
    lm = lm.to_empty(device=device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in lm.named_parameters():
        if name.endswith(("alpha", ".scale")) or "norm" in name:
            param.fill_(1.0 if not name.endswith(("bias", ".scale")) else (0.0 if name.endswith("bias") else 0.1))
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
    return lm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(lm: LMModel, batch: int, steps: int, warmup: int, sampling: bool) -> dict[str, float]:
    """Median temporal / depth / step latency (ms), throughput and peak memory at one batch size.

    ``cpu`` is the process CPU time per step (all threads): on a busy machine it shows what the
    step costs without the time spent waiting for a core.
    """
    device = lm.device
    gen = LMGen(lm, use_sampling=sampling)
    state = gen.init_state(batch)
    user = torch.randint(0, lm.config.card, (batch, gen.num_user_codebooks, 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for index in range(warmup + steps):
        cpu_start = time.process_time()
        times = _timed_step(gen, state, user, device)
        if index >= warmup:
            timings.append((*times, (time.process_time() - cpu_start) * 1e3))
    temporal, depth, total, cpu = (sorted(column) for column in zip(*timings, strict=True))
    step = statistics.median(total)
    return {
        "temporal": statistics.median(temporal), "depth": statistics.median(depth), "step": step,
        "p90": total[int(0.9 * (len(total) - 1))], "cpu": statistics.median(cpu),
        "frames": batch * 1000.0 / step, "tokens": batch * (1 + gen.dep_q) * 1000.0 / step,
        "peak_mb": _peak_mb(device),
    }


@torch.inference_mode()
def _timed_step(gen: LMGen, state: LMGenState, user: torch.Tensor, device: torch.device):
    """One generation step, timed in its temporal and depth phases (ms)."""
    _sync(device)
    start = time.perf_counter()
    hidden, text = gen.temporal_step(user, state)
    _sync(device)
    middle = time.perf_counter()
    audio = gen.depth_step(hidden, text, state)
    gen.finish_step(text, audio, state)
    _sync(device)
    end = time.perf_counter()
    return (middle - start) * 1e3, (end - middle) * 1e3, (end - start) * 1e3


@torch.inference_mode()
def matmul_floor_ms(lm: LMModel, batch: int, repeats: int = 5) -> float:
    """Median time of the step's matrix products alone: x @ W.T once for every linear weight (ms).

    CUDA: wall time; CPU: process CPU time (comparable with the ``cpu ms`` column).
    """
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}
    clock = time.perf_counter if lm.device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats + 1):
        _sync(lm.device)
        start = clock()
        for weight in weights:
            torch.matmul(inputs[weight.shape[1]], weight.T)
        _sync(lm.device)
        times.append((clock() - start) * 1e3)
    return statistics.median(times[1:])


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
