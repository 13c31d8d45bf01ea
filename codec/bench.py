"""`duplex bench codec`: Mimi encode_step / decode_step latency per 80 ms frame (full size, random weights)."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `duplex bench codec`."""
    parser.add_argument("--frames", type=int, default=60,
                        help="timed frames per measurement (medians are over these; default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed frames before measuring (default 10)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="batch sizes (parallel streams) to measure (default: 1 8)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run: cpu, cuda, or auto = cpu plus cuda when available (default auto)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--codebooks", type=int, default=8, help="codebooks encoded/decoded per frame (default 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weights and activations dtype (default float32)")


@dataclass
class BenchResult:
    """Median per-frame latencies of one (device, batch size) measurement."""

    device: str
    batch_size: int
    encode_ms: float
    decode_ms: float
    cpu_ms: float  # process CPU time per frame (all threads), encode + decode

    @property
    def real_time_factor(self) -> float:
        """Compute time per frame divided by the 80 ms of audio a frame holds (< 1 is faster than real time)."""
        return (self.encode_ms + self.decode_ms) / 80.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mimi, batch_size: int, frames: int, warmup: int, seed: int = 0) -> BenchResult:
    """Stream `warmup + frames` random frames through encode_step then decode_step; median ms of each."""
    device = mimi.downsample.conv.conv.conv.weight.device
    generator = torch.Generator().manual_seed(seed)
    audio = (0.1 * torch.randn(batch_size, 1, mimi.frame_size * (warmup + frames), generator=generator)).to(device)
    state = mimi.init_state(batch_size)
    encode_times, decode_times, cpu_times = [], [], []
    with torch.inference_mode():
        for index, frame in enumerate(audio.split(mimi.frame_size, dim=-1)):
            _sync(device)
            cpu_start = time.process_time()
            start = time.perf_counter()
            codes = mimi.encode_step(frame, state)
            _sync(device)
            middle = time.perf_counter()
            mimi.decode_step(codes, state)
            _sync(device)
            end = time.perf_counter()
            cpu_end = time.process_time()
            if index >= warmup:
                encode_times.append(1000 * (middle - start))
                decode_times.append(1000 * (end - middle))
                cpu_times.append(1000 * (cpu_end - cpu_start))
    return BenchResult(str(device), batch_size, statistics.median(encode_times), statistics.median(decode_times),
                       statistics.median(cpu_times))


def _devices(choice: str) -> list[str]:
    if choice == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return [choice]


def _check_args(args: argparse.Namespace) -> None:
    if args.frames < 1 or args.warmup < 0:
        raise ValueError("--frames must be >= 1 and --warmup >= 0")
    if args.threads < 1 or any(b < 1 for b in args.batch_sizes):
        raise ValueError("--threads and --batch-sizes must be positive")


def main(args: argparse.Namespace) -> int:
    """Print a table of per-frame latencies and real-time factors."""
    try:
        _check_args(args)
        devices = _devices(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _run(args, devices)
    finally:
        torch.set_num_threads(previous_threads)
    return 0


def _run(args: argparse.Namespace, devices: list[str]) -> None:
    from .loading import random_mimi

    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    print(f"Mimi full size, random weights, {args.codebooks} codebooks, {args.dtype}, "
          f"{args.threads} CPU threads, medians over {args.frames} frames after {args.warmup} warm-up frames")
    print(f"{'device':<8} {'batch':>5} {'encode ms':>10} {'decode ms':>10} {'total ms':>9} {'RTF':>6} {'cpu ms':>7}")
    for device in devices:
        mimi = random_mimi(num_codebooks=args.codebooks, device=device, dtype=dtype)
        for batch_size in args.batch_sizes:
            result = measure(mimi, batch_size, args.frames, args.warmup)
            total = result.encode_ms + result.decode_ms
            print(f"{device:<8} {batch_size:>5} {result.encode_ms:>10.2f} {result.decode_ms:>10.2f} "
                  f"{total:>9.2f} {result.real_time_factor:>6.3f} {result.cpu_ms:>7.2f}")
    print("Per frame for the whole batch. RTF = (encode + decode wall time) / 80 ms of audio.")
    print("cpu ms = process CPU time per frame over all threads (wall >> cpu/threads means a busy machine).")
