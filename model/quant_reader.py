"""Random access to a checkpoint's tensors, one at a time, for the quantizing loader.

A safetensors file is read with plain ``pread`` calls into freshly allocated tensors (no memory
map): a tensor's bytes live only as long as the loader holds the tensor, so the process's
resident memory (and ``ru_maxrss``) measures what the loader really keeps, not touched pages of a
15 GB mapping. A state dict is served as it is.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes (the ones a Kyutai checkpoint can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


class TensorReader:
    """Key -> (dtype, shape) up front, tensors on demand (``get``)."""

    def __init__(self, weights: str | Path | Mapping[str, torch.Tensor], what: str = "LM weights") -> None:
        self.what = what
        self._state = weights if isinstance(weights, Mapping) else None
        self._path = None if self._state is not None else Path(weights)
        self._entries: dict[str, dict] = {}
        self._data_start = 0
        if self._state is not None:
            self.dtypes = {key: value.dtype for key, value in self._state.items()}
            self.shapes = {key: tuple(value.shape) for key, value in self._state.items()}
        else:
            self._read_header()

    def _fail(self, reason: str) -> ValueError:
        return ValueError(f"cannot read {self.what} {self._path}: {reason}")

    def _read_header(self) -> None:
        if not self._path.is_file():
            raise FileNotFoundError(f"{self.what} not found: {self._path}")
        with open(self._path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise self._fail("not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise self._fail("not a safetensors file (header length out of range)")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise self._fail(f"bad safetensors header ({err})") from err
        self._data_start = 8 + length
        header.pop("__metadata__", None)
        size = self._path.stat().st_size
        self.dtypes, self.shapes = {}, {}
        for key, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise self._fail(f"tensor {key} has unsupported dtype {entry.get('dtype')!r}")
            start, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise self._fail(f"truncated file (tensor {key} ends past the end of the file)")
            self._entries[key] = entry
            self.dtypes[key] = _DTYPES[entry["dtype"]]
            self.shapes[key] = tuple(entry["shape"])

    def keys(self) -> list[str]:
        """Keys in file order (sequential reads)."""
        if self._state is not None:
            return list(self._state)
        return sorted(self._entries, key=lambda key: self._entries[key]["data_offsets"][0])

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a new CPU tensor (for a state dict: the tensor itself)."""
        if self._state is not None:
            return self._state[key]
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(self._path, "rb", buffering=0) as handle:
            view = memoryview(buffer.numpy())
            done = 0
            while done < end - start:
                count = os.preadv(handle.fileno(), [view[done:]], self._data_start + start + done)
                if count <= 0:
                    raise self._fail(f"short read of tensor {key}")
                done += count
        dtype = _DTYPES[entry["dtype"]]
        tensor = buffer.view(dtype) if dtype != torch.bool else buffer.bool()
        return tensor.reshape(entry["shape"])
