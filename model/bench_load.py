"""``duplex bench load``: load a full-size LM checkpoint; load time, peak memory (RSS), first steps.

Unless ``--weights`` names an existing file, a random checkpoint with exactly the published key
layout (Moshi 7B by default: the keys and shapes of ``moshi_7b_keys.tsv``, 15.4 GB in bfloat16) is
written there first, tensor by tensor. Then the LM is loaded through ``LMModel.from_pretrained``
and a few generation steps are timed. The peak RSS *during the load* (Linux ``VmHWM``, reset just
before loading) is compared with the bytes of the loaded weights: loading never holds two copies,
so the ratio stays close to 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import LMConfig

logger = logging.getLogger(__name__)
GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None,
                        help="LM checkpoint to load; when it does not exist, a random one is written there first "
                             "and deleted afterwards unless --keep (default: duplex-bench-<preset>.safetensors in "
                             "the temp directory)")
    parser.add_argument("--preset", choices=("7b", "300m"), default="7b",
                        help="model size when --config is not given: 7b (Moshi 7B, default) or 300m")
    parser.add_argument("--config", default=None, help="a Kyutai LM config.json instead of a preset")
    parser.add_argument("--keys", default=None,
                        help="key listing (key<TAB>(shape)<TAB>dtype, e.g. moshi_7b_keys.tsv) for the random file; "
                             "default: the published layout of the config (the same keys for the 7B)")
    parser.add_argument("--device", default="cpu", help="torch device to load onto (default: cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                        help="dtype of the written file and of the loaded weights (default: bfloat16)")
    parser.add_argument("--steps", type=int, default=3, help="generation steps to time after loading (batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--keep", action="store_true", help="keep a checkpoint this command wrote")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line instead of a table")


def bench_config(args: argparse.Namespace) -> LMConfig:
    if args.config:
        return LMConfig.from_kyutai(args.config)
    from .bench import preset

    return preset(args.preset)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS since the last reset (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_checkpoint(path: Path, config: LMConfig, dtype: torch.dtype, keys: str | None) -> float:
    """Write a random checkpoint for ``config``; returns the seconds it took."""
    from .lm import LMModel
    from .random_checkpoint import published_layout, read_key_listing, write_random_checkpoint

    if keys:
        layout = read_key_listing(keys, dtype)
    else:
        with torch.device("meta"):
            layout = published_layout(LMModel(config), dtype)
    start = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            logger.info("writing %s: %.1f / %.1f GB", path.name, done / GB, total / GB)

    write_random_checkpoint(path, layout, progress=progress)
    return time.perf_counter() - start


def time_steps(lm, steps: int) -> list[float]:
    """Seconds of each of the first ``steps`` generation steps (batch 1, greedy, random user codes)."""
    from .generate import LMGen

    gen = LMGen(lm, use_sampling=False)
    state = gen.init_state(1)
    user = torch.randint(0, lm.config.card, (1, lm.config.num_user_codebooks, 1), device=lm.device)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            gen.step(user, state)
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
            times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict:
    from .lm import LMModel

    dtype = getattr(torch, args.dtype)
    config = bench_config(args)
    name = Path(args.config).stem if args.config else args.preset
    path = Path(args.weights or Path(tempfile.gettempdir()) / f"duplex-bench-{name}.safetensors")
    wrote = not path.exists()
    write_s = write_checkpoint(path, config, dtype, args.keys) if wrote else 0.0
    try:
        file_bytes = path.stat().st_size
        baseline = rss_bytes()
        exact_peak = reset_peak_rss()
        start = time.perf_counter()
        lm = LMModel.from_pretrained(path, config=config, device=args.device, dtype=dtype)
        load_s = time.perf_counter() - start
        peak = peak_rss_bytes()
    finally:
        if wrote and not args.keep:
            path.unlink(missing_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in lm.state_dict().values())
    steps = time_steps(lm, args.steps)
    return {
        "model": name, "device": str(lm.device), "dtype": args.dtype, "file_gb": file_bytes / GB,
        "parameters_b": sum(p.numel() for p in lm.parameters()) / 1e9, "weights_gb": weight_bytes / GB,
        "write_s": write_s, "load_s": load_s, "load_gb_per_s": weight_bytes / GB / load_s,
        "rss_before_gb": baseline / GB, "peak_rss_gb": peak / GB, "peak_exact": exact_peak,
        "peak_increase_over_weights": (peak - baseline) / weight_bytes, "step_s": steps,
    }


def print_table(figures: dict) -> None:
    rows = [
        ("model", f"{figures['model']} ({figures['parameters_b']:.2f} B parameters) on {figures['device']}, "
                  f"{figures['dtype']}"),
        ("checkpoint", f"{figures['file_gb']:.2f} GB" + (f", written in {figures['write_s']:.0f} s"
                                                           if figures["write_s"] else " (existing file)")),
        ("load time", f"{figures['load_s']:.1f} s ({figures['load_gb_per_s']:.2f} GB/s)"),
        ("RSS before load", f"{figures['rss_before_gb']:.2f} GB"),
        ("peak RSS during load", f"{figures['peak_rss_gb']:.2f} GB"
                                 + ("" if figures["peak_exact"] else " (process lifetime peak)")),
        ("peak increase / weights", f"{figures['peak_increase_over_weights']:.3f} "
                                    f"(weights {figures['weights_gb']:.2f} GB; 2.0 would be two copies)"),
        ("first steps", ", ".join(f"{s * 1000:.0f} ms" for s in figures["step_s"]) or "none"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("duplex bench load: CUDA is not available (use --device cpu)", file=sys.stderr)
        return 2
    try:
        figures = run(args)
    except (OSError, ValueError) as err:
        print(f"duplex bench load: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures)
    return 0

