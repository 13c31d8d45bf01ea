"""Cutting decoded audio of any chunking into the model's fixed-size frames."""

from __future__ import annotations

import numpy as np


class FrameAssembler:
    """Cuts a stream of PCM chunks of any length into fixed-size frames."""

    def __init__(self, frame_size: int) -> None:
        self.frame_size = frame_size
        self._chunks: list[np.ndarray] = []
        self._length = 0

    def add(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Append ``pcm`` ([N] float32); return every complete [frame_size] frame."""
        if pcm.size == 0:
            return []
        self._chunks.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        self._length += pcm.size
        if self._length < self.frame_size:
            return []
        joined = np.concatenate(self._chunks)
        count = self._length // self.frame_size
        frames = [joined[i * self.frame_size:(i + 1) * self.frame_size] for i in range(count)]
        rest = joined[count * self.frame_size:]
        self._chunks = [rest] if rest.size else []
        self._length = rest.size
        return frames
