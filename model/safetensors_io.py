"""Streaming safetensors reading and writing: one tensor at a time, never the whole file in memory.

The format (public, https://github.com/huggingface/safetensors): an unsigned little-endian 64-bit
header length N, N bytes of JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}`` (padded with spaces to a multiple of 8), then the tensor bytes, offsets
relative to the end of the header.

Reading uses plain ``readinto`` into a freshly allocated tensor (no memory map), so a loaded
checkpoint occupies exactly its tensors' bytes in the process: the page cache is not counted in
its resident memory and nothing is held twice. Writing takes the header first (key, dtype,
shape) and then each tensor's bytes in order, possibly in several row pieces (a fused attention
projection written from its per-step parts without concatenating them).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

Shape = tuple[int, ...]
ALIGNMENT = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: Shape
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: entries in file order, where the data starts, and the free-form metadata."""

    path: Path
    entries: dict[str, TensorEntry]
    data_start: int
    metadata: dict[str, str]

    def shapes(self) -> dict[str, Shape]:
        return {key: entry.shape for key, entry in self.entries.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {key: entry.dtype for key, entry in self.entries.items()}


def _element_count(shape: Shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _parse_entry(key: str, raw: object, data_bytes: int) -> TensorEntry:
    if not isinstance(raw, dict) or raw.get("dtype") not in DTYPES:
        raise SafetensorsFormatError(f"tensor {key!r}: bad header entry {raw!r}")
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list) or len(offsets) != 2):
        raise SafetensorsFormatError(f"tensor {key!r}: bad shape or data_offsets in {raw!r}")
    dtype = DTYPES[raw["dtype"]]
    begin, end = offsets
    expected = _element_count(tuple(shape)) * dtype.itemsize
    if not (0 <= begin <= end <= data_bytes) or end - begin != expected:
        raise SafetensorsFormatError(f"tensor {key!r}: data_offsets {offsets} do not fit shape {shape} "
                                     f"{raw['dtype']} in a {data_bytes}-byte data section")
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse a safetensors header, reading no tensor data; SafetensorsFormatError when malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise SafetensorsFormatError("file too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsFormatError(f"header length {length} does not fit a {size}-byte file")
        try:
            raw = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"header is not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries = {key: _parse_entry(key, value, size - data_start) for key, value in raw.items()}
    return SafetensorsHeader(path, dict(sorted(entries.items(), key=lambda kv: kv[1].begin)), data_start, metadata)


def _fill_from(handle, tensor: torch.Tensor, nbytes: int) -> None:
    """readinto ``tensor``'s own storage (contiguous, nbytes long) from the handle's position."""
    if nbytes == 0:
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < nbytes:
        got = handle.readinto(view[done:min(nbytes, done + READ_CHUNK_BYTES)])
        if not got:
            raise SafetensorsFormatError(f"file ends {nbytes - done} bytes early")
        done += got


def iter_tensors(header: SafetensorsHeader, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor in the file's dtype) one at a time, in file order (or the order of ``keys``)."""
    wanted = list(header.entries) if keys is None else list(keys)
    with open(header.path, "rb", buffering=0) as handle:
        for key in wanted:
            entry = header.entries[key]
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            handle.seek(header.data_start + entry.begin)
            _fill_from(handle, tensor, entry.nbytes)
            yield key, tensor


def read_tensor(header: SafetensorsHeader, key: str) -> torch.Tensor:
    """One tensor of the file, in its own dtype, on the CPU."""
    return next(iter_tensors(header, [key]))[1]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous, copied to the host if needed), as written to a file."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header from (key, dtype, shape) first, then data.

    ``with SafetensorsWriter(path, layout) as out: out.write(key, tensor_or_row_pieces)`` in the
    layout's order; the file is complete (and checked) when the block ends without error.
    """

    def __init__(self, path: str | Path, layout: Sequence[tuple[str, torch.dtype, Shape]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.layout = [(key, dtype, tuple(shape)) for key, dtype, shape in layout]
        self.metadata = dict(metadata or {})
        self._next = 0
        self._handle = None

    def _header_bytes(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for key, dtype, shape in self.layout:
            nbytes = _element_count(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(len(text) + 8) % ALIGNMENT)
        return struct.pack("<Q", len(text)) + text

    def __enter__(self) -> "SafetensorsWriter":
        if len({key for key, _, _ in self.layout}) != len(self.layout):
            raise ValueError("duplicate keys in the safetensors layout")
        self._handle = open(self.path, "wb")
        self._handle.write(self._header_bytes())
        return self

    def write(self, key: str, data: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Write the next tensor: one tensor, or row pieces whose concatenation along dim 0 is it."""
        if self._next >= len(self.layout) or self.layout[self._next][0] != key:
            expected = self.layout[self._next][0] if self._next < len(self.layout) else "nothing"
            raise ValueError(f"write order: got {key!r}, expected {expected!r}")
        _, dtype, shape = self.layout[self._next]
        pieces = [data] if isinstance(data, torch.Tensor) else list(data)
        rows = sum(piece.shape[0] if piece.dim() else 1 for piece in pieces)
        if any(p.dtype != dtype or tuple(p.shape[1:]) != shape[1:] for p in pieces) or (shape and rows != shape[0]):
            raise ValueError(f"{key}: pieces {[(tuple(p.shape), p.dtype) for p in pieces]} do not make {shape} {dtype}")
        for piece in pieces:
            self._handle.write(tensor_bytes(piece))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.close()
        if exc_type is None and self._next != len(self.layout):
            missing = [key for key, _, _ in self.layout[self._next:]]
            raise ValueError(f"{len(missing)} tensor(s) never written: {', '.join(missing[:8])}")


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write key -> tensor (or row pieces) as safetensors, streaming each tensor's bytes (keys sorted)."""
    def layout_of(value) -> tuple[torch.dtype, Shape]:
        pieces = [value] if isinstance(value, torch.Tensor) else list(value)
        first = pieces[0]
        rows = sum(piece.shape[0] for piece in pieces) if first.dim() else ()
        return first.dtype, ((rows, *first.shape[1:]) if first.dim() else ())

    keys = sorted(tensors)
    layout = [(key, *layout_of(tensors[key])) for key in keys]
    with SafetensorsWriter(path, layout, metadata) as out:
        for key in keys:
            out.write(key, tensors[key])
