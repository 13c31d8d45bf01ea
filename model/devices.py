"""The device rule every command shares: the requested device, else cuda when available, else cpu."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch device (None or "": cuda when available, else cpu); ValueError for unusable ones."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"bad --device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def device_from_flags(args) -> torch.device:
    """A command's ``--device`` (see resolve_device; ValueError for an unusable one), with its ``--threads``
    (when given) applied to torch's CPU threads."""
    device = resolve_device(getattr(args, "device", None))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return device
