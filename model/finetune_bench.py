"""``duplex bench finetune``: the time of one LoRA training step (see ``duplex.model.lora_bench``)."""

from __future__ import annotations

from .lora_bench import add_finetune_arguments as add_arguments
from .lora_bench import finetune_main as main

__all__ = ["add_arguments", "main"]
