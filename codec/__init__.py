"""Mimi, the streaming neural audio codec (24 kHz audio <-> 12.5 Hz discrete codes)."""

from .config import MimiConfig
from .loading import CheckpointMismatchError, load_mimi, random_mimi, save_mimi
from .mimi import Mimi
from .state import MimiState

__all__ = ["CheckpointMismatchError", "Mimi", "MimiConfig", "MimiState", "load_mimi", "random_mimi", "save_mimi"]
