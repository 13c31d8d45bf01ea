"""The Moshi language model, its generation loop and the shared transformer blocks.

The public API, symmetric with ``duplex.codec`` (``Mimi``, ``MimiConfig``)::

    from duplex.model import LMModel, LMGen, LMConfig, TextTokenizer
    lm = LMModel.from_pretrained("model.safetensors", config="config.json", device="cpu", dtype=torch.bfloat16)

Names are imported on first use (PEP 562), so ``import duplex.model`` runs nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "LMModel": "lm",
    "LMOutput": "lm",
    "LMConfig": "config",
    "LMGen": "generate",
    "LMGenState": "generate",
    "TextTokenizer": "tokenizer",
    "load_lm": "loading",
    "save_lm": "loading",
    "CheckpointMismatchError": "checkpoint",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only
    from .checkpoint import CheckpointMismatchError
    from .config import LMConfig
    from .generate import LMGen, LMGenState
    from .lm import LMModel, LMOutput
    from .loading import load_lm, save_lm
    from .tokenizer import TextTokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
