"""Mimi, the streaming neural audio codec (24 kHz audio <-> 12.5 Hz discrete codes)."""
