"""``duplex bench engine``: what a step costs with few active slots on a big engine (cost follows the load),
and, with ``--check``, that CUDA-graph steps equal eager ones and the device step never syncs."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from duplex.model.devices import device_from_flags

from .engine import DuplexEngine, SlotSampling

TARGETS = {1: 1.5}  # N active on a big engine vs an N-slot engine: 1.5x for one slot, else DEFAULT_TARGET
DEFAULT_TARGET = 1.2
ROUNDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", choices=("tiny", "300m"), default="tiny",
                        help="tiny: the test fixtures' Mimi and LM (float32); 300m: random weights, the "
                             "published Mimi's shape and the 341 M LM of `duplex bench lm` (context 3000)")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="folder of the reference fixtures for --models tiny "
                             "(default: $DUPLEX_FIXTURES or ../shared/fixtures next to the repository)")
    parser.add_argument("--slots", type=int, default=16, help="slots of the big engine")
    parser.add_argument("--active", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="active conversations to measure (each <= --slots)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--cuda-graphs", action="store_true", help="step through CUDA graphs (CUDA only)")
    parser.add_argument("--check", action="store_true",
                        help="instead of timing: check that CUDA-graph steps equal eager steps on a random "
                             "ready pattern and that the eager device step never syncs (CUDA only)")


def main(args: argparse.Namespace) -> int:
    try:
        device = device_from_flags(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if (args.cuda_graphs or args.check) and device.type != "cuda":
        print("error: --cuda-graphs and --check need a CUDA device (--device cuda)", file=sys.stderr)
        return 2
    bad = [n for n in args.active if not 1 <= n <= args.slots]
    if bad or args.steps < 1 or args.warmup < 0:
        print(f"error: --active values must lie in 1..{args.slots}, --steps >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        mimi, lm = load_models(args.models, args.fixtures, device)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        report = check_cuda_graphs(mimi, lm, device)
        print(report["text"])
        return 0 if report["ok"] else 1
    print_table(mimi, lm, args, device)
    return 0


def load_models(name: str, fixtures: Path | None, device: torch.device):
    """(Mimi, LM) for the benchmark, float32 on CPU (bfloat16 LM on CUDA for 300m)."""
    from duplex.codec import Mimi

    if name == "tiny":
        from duplex.model.config import LMConfig
        from duplex.model.lm import LMModel

        folder = fixtures or Path(os.environ.get("DUPLEX_FIXTURES", Path(__file__).resolve().parents[2] / "shared"
                                                 / "fixtures"))
        if not (folder / "lm_tiny").is_dir():
            raise ValueError(f"no tiny fixture models in {folder} (give --fixtures DIR)")
        mimi = Mimi.from_pretrained(folder / "mimi_tiny" / "model.safetensors",
                                    config=folder / "mimi_tiny" / "config.json", device=device)
        config = LMConfig.from_kyutai(folder / "lm_tiny" / "config.json")
        lm = LMModel.from_pretrained(folder / "lm_tiny" / "model.safetensors", config, device=device,
                                     dtype=torch.float32)
        return mimi, lm
    from duplex.codec.config import MimiConfig
    from duplex.model.bench import build_random_lm, preset

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mimi = Mimi(MimiConfig.official()).to(device).eval()
    mimi.pack_()
    return mimi, build_random_lm(preset("300m"), device, dtype)


def step_ms(engine: DuplexEngine, active: int, steps: int, warmup: int, waiting: int = 0) -> tuple[float, float]:
    """Median (wall, process CPU) time of a step with slots 0..active-1 joined, all ready but the last
    ``waiting`` of them (a masked step), the others free (ms).

    The CPU time (all threads) is what the step costs even on a machine shared with other work."""
    rng = np.random.default_rng(0)
    for slot in range(active):
        engine.join(slot, SlotSampling(seed=slot))
    ready = np.zeros(engine.batch_size, dtype=bool)
    ready[:active - waiting] = True
    wall, cpu = [], []
    for index in range(warmup + steps):
        pcm = (rng.standard_normal((engine.batch_size, engine.frame_size)) * 0.1).astype(np.float32)
        start, cpu_start = time.perf_counter(), time.process_time()
        engine.step(pcm, ready)  # ends with the device -> host copy of the output
        if index >= warmup:
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - cpu_start) * 1e3)
    for slot in range(active):
        engine.leave(slot)
    return statistics.median(wall), statistics.median(cpu)


def best_of(*measures):
    """Run the measures in alternation for ROUNDS rounds; per measure the round with the lowest figures
    (a shared machine only ever adds time)."""
    rounds = [[measure() for measure in measures] for _ in range(ROUNDS)]
    best = [min((r[i] for r in rounds), key=lambda t: t[1]) for i in range(len(measures))]
    return best[0] if len(best) == 1 else best


def print_table(mimi, lm, args: argparse.Namespace, device: torch.device) -> None:
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    on_cpu = device.type == "cpu"
    threads = f", {torch.get_num_threads()} threads" if on_cpu else ""
    clocks = "process CPU time, wall time in brackets" if on_cpu else "wall time"
    print(f"engine step (Mimi encode + LM + Mimi decode), {args.models} models (LM {params:.1f} M), {device}"
          f"{threads}{', CUDA graphs' if args.cuda_graphs else ''}; ms, the best of {ROUNDS} rounds' medians "
          f"of {args.steps} steps ({clocks})")
    make = lambda slots: DuplexEngine(mimi, lm, slots, device=device, cuda_graphs=args.cuda_graphs)  # noqa: E731
    big = make(args.slots)
    every = best_of(lambda: step_ms(big, args.slots, args.steps, args.warmup))
    pick = 1 if on_cpu else 0  # the figure the ratio uses
    print(f"{'active':>6} {'rows':>5} {f'{args.slots}-slot ms':>18} {'N-slot ms':>18} {'ratio':>6} "
          f"{'target':>7} {'one waiting ms':>18} {f'all {args.slots} active ms':>18}")
    show = lambda t: f"{t[pick]:.2f} ({t[0]:.1f})" if on_cpu else f"{t[0]:.2f}"  # noqa: E731
    for active in args.active:
        rows = big.rows_for(np.arange(args.slots) < active)
        small = big if active == args.slots else make(active)
        on_big, alone, masked = best_of(lambda: step_ms(big, active, args.steps, args.warmup),
                                        lambda: step_ms(small, active, args.steps, args.warmup),
                                        lambda: step_ms(big, active, args.steps, args.warmup, waiting=1))
        target = TARGETS.get(active, DEFAULT_TARGET)
        ratio = on_big[pick] / alone[pick]
        print(f"{active:>6} {rows:>5} {show(on_big):>18} {show(alone):>18} {ratio:>5.2f}x {target:>6.1f}x "
              f"{show(masked):>18} {show(every):>18}")
    print(f"(rows: the bucket a step computes; one waiting: the same step with one of the N not ready, a masked "
          f"step; all {args.slots} active: what every step cost before steps followed the load)")


def check_cuda_graphs(mimi, lm, device: torch.device, slots: int = 6, steps: int = 24, graphs=None) -> dict:
    """Eager vs CUDA-graph engines on the same audio and random ready pattern (joins, a leave, a move):
    tokens must be equal, audio close; and the eager device step must not sync with the host.

    ``graphs``: a replacement for CudaGraphSteps (the tests' CPU double); the sync check then is skipped."""
    rng = np.random.default_rng(0)
    engines = [DuplexEngine(mimi, lm, slots, device=device, cuda_graphs=graphed and graphs is None)
               for graphed in (False, True)]
    if graphs is not None:
        engines[1]._graphs = graphs(engines[1])
    sampled = SlotSampling(use_sampling=True, temp=0.9, temp_text=0.7, top_k=50, top_k_text=20, seed=5)
    for engine in engines:
        for slot in range(slots - 1):
            engine.join(slot, sampled if slot % 2 else SlotSampling(use_sampling=False))
    worst_pcm, token_mismatches = 0.0, 0
    for t in range(steps):
        if t == steps // 2:
            for engine in engines:
                engine.leave(1)
                engine.move_slot(slots - 2, 1)
                engine.join(slots - 1, SlotSampling(use_sampling=True, top_k=5, seed=9))  # a new plan shape
        ready = rng.random(slots) < 0.7
        pcm = (rng.standard_normal((slots, engines[0].frame_size)) * 0.2).astype(np.float32)
        eager, graphed = (engine.step(pcm, ready) for engine in engines)
        token_mismatches += int(((eager.tokens != graphed.tokens).any(axis=1)
                                 | (eager.has_output != graphed.has_output)).sum())
        worst_pcm = max(worst_pcm, float(np.abs(eager.pcm - graphed.pcm).max()))
    sync_error = _sync_error(engines[0]) if graphs is None else None
    ok = token_mismatches == 0 and worst_pcm < 1e-3 and sync_error is None
    text = (f"CUDA graphs vs eager over {steps} steps of {slots} slots: token rows differing {token_mismatches}, "
            f"max audio difference {worst_pcm:.2e}; eager device step host syncs: {sync_error or 'none'}; "
            f"graphs captured: {len(engines[1]._graphs.captured)} -> {'OK' if ok else 'FAILED'}")
    return {"ok": ok, "text": text, "token_mismatches": token_mismatches, "max_pcm": worst_pcm,
            "sync_error": sync_error}


def _sync_error(engine: DuplexEngine) -> str | None:
    """Run one masked eager device step with CUDA's sync debug mode set to error."""
    masks = engine._masks
    masks.fill_(True)
    masks[:, 0] = False
    engine.lm_gen.draw_plans(engine.lm_state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            engine._device_step(engine.batch_size, masks[0], masks[1], masks[2])
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None
