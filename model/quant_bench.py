"""``duplex bench lm --quantize int8|int4``: the quantized LM's step time next to float32 and bfloat16.

Each variant is built with random weights (the quantized one from a float model, layer by layer,
its layers computing in bfloat16 where the kernels are fastest; on the CPU both inside a float32 model
and all bfloat16) and timed like ``duplex bench lm``. A last
line gives the quantized model's quality against the float32 one: relative logit error and
teacher-forced top-1 agreement on random codes (both quantized and float computing in float32).
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch

from .bench import FRAME_MS, build_random_lm, measure
from .config import LMConfig
from .quant import quantize_model, weight_bytes
from .quant_quality import compare_logits, random_codes

QUALITY_STEPS = 16  # teacher-forced frames for the quality line


def _variants(mode: str, device: torch.device) -> list[tuple[str, torch.dtype, str | None, torch.dtype | None]]:
    """(label, model dtype, quantize, compute dtype) rows: the floats first, then the quantized LM.

    On the CPU the quantized LM runs twice: all bfloat16, and float32 with bfloat16 quantized
    layers (what ``duplex serve --quantize`` runs there, see ``fast_compute_dtype``).
    """
    if device.type == "cuda":
        return [("bfloat16", torch.bfloat16, None, None), (f"{mode} bf16", torch.bfloat16, mode, torch.bfloat16)]
    return [("float32", torch.float32, None, None), ("bfloat16", torch.bfloat16, None, None),
            (f"{mode} f32+bf16 layers", torch.float32, mode, torch.bfloat16),
            (f"{mode} bf16", torch.bfloat16, mode, torch.bfloat16)]


def compare_quantized(args: argparse.Namespace, config: LMConfig, device: torch.device) -> int:
    """Print the step-time table of the float and quantized variants, then the quality line."""
    sampling = not args.greedy
    print(f"LM {args.quantize} vs float on {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
          f"{'greedy' if args.greedy else 'sampling'}; context {config.context}")
    print(f"{'weights':>22} {'MB':>7} {'batch':>5} {'temporal ms':>12} {'depth ms':>9} {'step ms':>8} "
          f"{'p90 ms':>7} {'cpu ms':>7} {'frames/s':>9}")
    for label, dtype, quantize, compute_dtype in _variants(args.quantize, device):
        lm = build_random_lm(config, device, dtype)
        if quantize:
            quantize_model(lm, quantize, compute_dtype=compute_dtype)
        size = weight_bytes(lm) / 2**20
        for batch in args.batch_sizes:
            row = measure(lm, batch, args.steps, args.warmup, sampling)
            print(f"{label:>22} {size:>7.0f} {batch:>5} {row['temporal']:>12.2f} {row['depth']:>9.2f} "
                  f"{row['step']:>8.2f} {row['p90']:>7.2f} {row['cpu']:>7.2f} {row['frames']:>9.1f}", flush=True)
        del lm
        gc.collect()
    quality = quantized_quality(config, device, args.quantize)
    print(f"quality of {args.quantize} vs float32 (random weights, {QUALITY_STEPS} teacher-forced frames): "
          f"relative logit error {quality['rel_error']:.4f}, top-1 agreement {quality['top1']:.3f}")
    print(f"(real time needs step ms < {FRAME_MS:.0f}; MB = weights in memory)")
    return 0


def quantized_quality(config: LMConfig, device: torch.device, mode: str) -> dict[str, float]:
    """compare_logits of the float32 random LM and its quantized copy (computing in float32)."""
    reference = build_random_lm(config, device, torch.float32)
    quantized = quantize_model(copy.deepcopy(reference), mode)
    return compare_logits(reference, quantized, random_codes(reference, 1, QUALITY_STEPS))
