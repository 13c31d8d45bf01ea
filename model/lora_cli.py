"""The adapter flags shared by every command that loads the model (``duplex serve``, ``duplex infer``).

``--lora-weight PATH`` merges one adapter into the weights at load time (zero cost per step);
``--adapter NAME=PATH`` (repeatable) keeps several beside the base weights, chosen per
conversation (query parameter ``adapter=NAME``) and applied in the same batched step.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_lora_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--lora-weight", default=None, metavar="PATH",
        help="a LoRA adapter (lora.safetensors with its config.json beside it, upstream's format) merged "
             "into the LM's weights at load time: no cost per step")
    parser.add_argument(
        "--adapter", action="append", default=None, metavar="NAME=PATH",
        help="a LoRA adapter kept beside the base weights, applied per conversation in the batched step "
             "(repeatable; PATH: lora.safetensors with its config.json beside it, or their folder); duplex serve: "
             "a session picks it with the query parameter adapter=NAME; duplex infer: every file runs with the last one")


def apply_lora_arguments(models, args: argparse.Namespace) -> None:
    """Merge ``--lora-weight`` and attach the ``--adapter`` set to ``models.lm`` (errors: ValueError)."""
    from .lora import merge_adapter_file
    from .lora_multi import load_adapter_set

    lora_weight = getattr(args, "lora_weight", None)
    specs = getattr(args, "adapter", None) or []
    if lora_weight or specs:
        from .quant_cli import refuse_adapter_on_quantized

        # A quantized LM has no float weights to merge into, and adapters are not applied beside
        # quantized layers: refused with one clear message (merge into a float checkpoint first).
        refuse_adapter_on_quantized(models.lm, "--lora-weight" if lora_weight else "--adapter")
    if lora_weight:
        adapter = merge_adapter_file(models.lm, lora_weight)
        logger.info("merged the LoRA adapter %s (rank %d, scaling %g)", lora_weight, adapter.rank, adapter.scaling)
    if specs:
        adapters = load_adapter_set(models.lm, specs)
        logger.info("LoRA adapters, chosen per conversation: %s", ", ".join(adapters.names))


def adapter_names(lm) -> list[str]:
    """The names of the adapters attached to ``lm`` (for /api/info and the web page's settings)."""
    adapter_set = getattr(lm, "adapter_set", None)
    return list(adapter_set.names) if adapter_set is not None else []
