"""``duplex bench lora`` (per-slot adapters in the batched step) and ``duplex bench finetune`` (training step).

Random weights, random tokens; prints one table. ``lora``: a batch of slots on the base model
against the same batch with every slot on one of several adapters (both delta products), and the
cost of the wrappers when no slot uses an adapter. ``finetune``: the time of one LoRA training step
(forward, backward, AdamW) with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .bench import build_random_lm, measure, preset
from .config import LMConfig
from .devices import device_from_flags
from .lora import LoRAAdapter, LoRAConfig, linear_targets
from .lora_multi import attach_adapters, detach_adapters


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("300m", "7b"), default="300m",
                        help="model size (default 300m: dim 1024, 8 layers, depformer 512x4)")
    parser.add_argument("--config", default=None, help="a Kyutai LM config.json to use instead of a preset")
    parser.add_argument("--rank", type=int, default=64, help="adapter rank (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="slots in the batch (default 8)")
    parser.add_argument("--adapters", type=int, default=3, help="different adapters over the slots (default 3)")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--batch", type=int, default=1, help="training windows per step (default 1)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per window (default 10)")


def _setup(args: argparse.Namespace):
    device = device_from_flags(args)  # ValueError for an unusable one
    config = LMConfig.from_kyutai(args.config) if args.config else preset(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return config, device, dtype


def random_adapter(lm: torch.nn.Module, name: str, rank: int, seed: int) -> LoRAAdapter:
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for path, module in linear_targets(lm).items():
        pairs[path] = (torch.randn(rank, module.in_features, generator=generator) * module.in_features ** -0.5,
                       torch.randn(module.out_features, rank, generator=generator) * 0.01)
    return LoRAAdapter(name=name, config=LoRAConfig(rank, 2.0), pairs=pairs)


def main(args: argparse.Namespace) -> int:
    try:
        config, device, dtype = _setup(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lm = build_random_lm(config, device, dtype)
    params = sum(p.numel() for p in lm.parameters())
    print(f"LM {params / 1e6:.0f} M parameters, {dtype}, {device}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, {args.adapters} adapters of rank {args.rank}")
    print(f"{'variant':<50} {'step ms':>8} {'cpu ms':>7} {'vs base':>8}")
    base = measure(lm, args.batch, args.steps, args.warmup, sampling=True)
    _row("base model (or an adapter merged: --lora-weight)", base, base)
    adapters = [random_adapter(lm, f"a{i}", args.rank, seed=i) for i in range(args.adapters)]
    for strategy in ("gather", "concat"):
        adapter_set = attach_adapters(lm, adapters, args.batch, strategy=strategy)
        if strategy == "gather":
            _row("adapters loaded, every slot on the base", measure(lm, args.batch, args.steps, args.warmup, True),
                 base)
        for slot in range(args.batch):
            adapter_set.selection.set_slot(slot, 1 + slot % args.adapters)
        row = measure(lm, args.batch, args.steps, args.warmup, sampling=True)
        _row(f"{args.adapters} adapters over {args.batch} slots ({strategy})", row, base)
        detach_adapters(lm)
    print("(step = one LM generation step for the whole batch, temporal + depth; cpu = process CPU time, "
          "all threads, which 'vs base' compares (wall time on a busy machine is mostly waiting); "
          "gather: each row's A/B, concat: all adapters' A at once, other columns masked; "
          "auto picks concat when the rows are at least the adapters + 1)")
    return 0


def _row(label: str, row: dict, base: dict) -> None:
    print(f"{label:<50} {row['step']:>8.1f} {row['cpu']:>7.1f} {row['cpu'] / base['cpu']:>7.2f}x")


def trainable_random_lm(config: LMConfig, device: torch.device, dtype: torch.dtype):
    """build_random_lm's weights as ordinary tensors (it makes inference tensors, which autograd refuses)."""
    from .lm import LMModel

    random = build_random_lm(config, device, dtype)
    with torch.device("meta"):
        lm = LMModel(config, dtype=dtype)
    lm.load_state_dict({k: v.clone() for k, v in random.state_dict().items()}, assign=True)
    return lm


def finetune_main(args: argparse.Namespace) -> int:
    from .finetune_train import FRAME_RATE, TrainOptions, prepare_model, training_loss

    try:
        config, device, dtype = _setup(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frames = max(2, round(args.duration * FRAME_RATE))
    print(f"LoRA rank {args.rank} training step, batch {args.batch} x {args.duration:g} s ({frames} frames), "
          f"{dtype}, {device}, {torch.get_num_threads()} threads")
    print(f"{'gradient checkpointing':<24} {'params M':>9} {'trainable M':>12} {'step s':>8} {'cpu s':>7}")
    for checkpointing in (False, True):
        lm = trainable_random_lm(config, device, dtype)
        options = TrainOptions(out_dir=None, rank=args.rank, gradient_checkpointing=checkpointing, progress=False)
        trainable = prepare_model(lm, options)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
        codes = torch.randint(0, config.card, (args.batch, config.num_codebooks, frames), device=device)
        codes[:, 0] = torch.randint(0, config.text_card, (args.batch, frames), device=device)
        times = []
        for index in range(args.warmup + args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = training_loss(lm(codes), codes, config.existing_text_padding_id or 3, 0.5, 100.0).total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        wall, cpu = (statistics.median(column) for column in zip(*times))
        total = sum(p.numel() for p in lm.parameters())
        print(f"{'on' if checkpointing else 'off':<24} {total / 1e6:>9.1f} "
              f"{sum(p.numel() for p in trainable) / 1e6:>12.2f} {wall:>8.2f} {cpu:>7.2f}")
    return 0
