"""Command-line flags shared by `duplex talk` and `duplex infer`."""

from __future__ import annotations

import argparse


def add_temperature_topk_arguments(group: argparse._ArgumentGroup) -> None:
    """Per-stream temperature and top-k, named like the server's query parameters."""
    group.add_argument("--text-temperature", type=float,
                       help="temperature of the text token (0 = greedy text; the audio keeps its own mode)")
    group.add_argument("--text-topk", type=int, help="sample the text token among the k most likely")
    group.add_argument("--audio-temperature", type=float,
                       help="temperature of the audio tokens (0 = greedy audio; the text keeps its own mode)")
    group.add_argument("--audio-topk", type=int, help="sample each audio token among the k most likely")
