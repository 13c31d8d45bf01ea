"""The shared ``--quantize`` flag, the KV-cache capacity log of ``duplex serve``, and the LoRA rule.

``add_quantize_argument`` is the one definition of the flag; ``duplex serve``, ``duplex infer`` and
the serving benchmarks get it through ``add_model_arguments``, ``duplex bench lm`` directly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from .config import LMConfig
from .generate import DEFAULT_UNLIMITED_STEPS
from .quant import QUANTIZE_MODES, QuantizeError, is_quantized

logger = logging.getLogger(__name__)

QUANTIZE_HELP = ("quantize the LM's linear layers while loading: int8 (per output channel) or int4 (groups "
                 "of 32); embeddings and norms stay floating. A Kyutai q8 checkpoint (config \"quantize\": "
                 "true, <key>_scb scales) runs as int8 without this flag. The quantized layers compute in --dtype, "
                 "except in a float32 model on CPU, where they compute in bfloat16 (their fast kernels)")


def add_quantize_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--quantize int8|int4`` (default: none) to a parser or argument group."""
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)


# ----------------------------------------------------------------- KV cache capacity
def kv_cache_bytes(config: LMConfig, dtype: torch.dtype, max_steps: int = DEFAULT_UNLIMITED_STEPS) -> int:
    """Bytes of one conversation's key/value caches (temporal + depth transformer), as LMGen allocates them.

    Each layer holds keys and values [1, H, capacity, Dh] with capacity = the attention window
    (context, or ``max_steps`` when unlimited) for one step per call.
    """
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for transformer, fallback in ((config.temporal_config(), max_steps), (config.depformer_config(), config.dep_q)):
        window = transformer.context if transformer.context is not None else fallback
        total += 2 * transformer.num_layers * transformer.d_model * window * element
    return total


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for the CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def log_kv_capacity(lm: nn.Module, device: torch.device) -> tuple[int, int | None]:
    """Log how much KV cache one conversation takes and how many fit in free memory; returns both."""
    per_conversation = kv_cache_bytes(lm.config, lm.dtype)
    free = free_memory_bytes(torch.device(device))
    fits = None if free is None else free // per_conversation
    logger.info("KV cache: %.0f MB per conversation (%s); %s free on %s: about %s conversations fit",
                per_conversation / 2**20, str(lm.dtype).replace("torch.", ""),
                "unknown" if free is None else f"{free / 2**30:.1f} GB", device,
                "?" if fits is None else fits)
    return per_conversation, fits


# ----------------------------------------------------------------- LoRA adapters
def refuse_adapter_on_quantized(model: nn.Module, adapter: str = "a LoRA adapter") -> None:
    """Raise a clear error when ``adapter`` is to be attached to a model whose layers are quantized.

    Adapters are merged into the float weights *before* quantizing: pass the merge as
    ``weight_hook`` to ``load_quantized_lm`` (done tensor by tensor while loading).
    """
    if is_quantized(model):
        raise QuantizeError(f"cannot attach {adapter} to a quantized LM: merge it into the float weights "
                            "first (load the base checkpoint with the adapter merged, then --quantize)")
