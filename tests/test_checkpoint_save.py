"""Saving writes the published layout: load a fixture (either spelling), save it, and the file holds
byte-for-byte the tensors of the published file; the streaming safetensors writer and reader."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from duplex.codec import Mimi, save_mimi
from duplex.model.lm import LMModel
from duplex.model.loading import save_lm
from duplex.model.safetensors_io import (
    SafetensorsFormatError,
    SafetensorsWriter,
    iter_tensors,
    read_header,
    write_tensors,
)

SPELLINGS = ["model.safetensors", "model.in_projs.safetensors"]


def raw_tensors(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """key -> (dtype, shape, bytes) read straight from the file's header and data section."""
    header = read_header(path)
    data = path.read_bytes()
    return {key: (str(e.dtype), e.shape, data[header.data_start + e.begin:header.data_start + e.end])
            for key, e in header.entries.items()}


def load_and_save(fixtures_dir, tmp_path, name: str, spelling: str):
    folder = fixtures_dir / name
    out = tmp_path / f"{name}.saved.safetensors"
    if name == "mimi_tiny":
        model = Mimi.from_pretrained(folder / spelling, config=folder / "config.json")
        save_mimi(model, out)
    else:
        model = LMModel.from_pretrained(folder / spelling, config=folder / "config.json", dtype=torch.float32)
        save_lm(model, out)
    return out


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", ["lm_tiny", "lm_options_tiny", "mimi_tiny"])
def test_round_trip_is_the_published_file_byte_for_byte(fixtures_dir, tmp_path, name, spelling):
    saved = raw_tensors(load_and_save(fixtures_dir, tmp_path, name, spelling))
    published = raw_tensors(fixtures_dir / name / SPELLINGS[0])
    assert sorted(saved) == sorted(published)
    different = [key for key in published if saved[key] != published[key]]
    assert different == []


def test_saved_file_reads_with_the_safetensors_library(fixtures_dir, tmp_path):
    saved = load_and_save(fixtures_dir, tmp_path, "lm_tiny", SPELLINGS[1])
    ours = load_file(str(saved))
    reference = load_file(str(fixtures_dir / "lm_tiny" / SPELLINGS[0]))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    with safe_open(str(saved), framework="pt") as handle:
        assert set(handle.keys()) == set(reference)


def test_bfloat16_model_saves_bfloat16(fixtures_dir, tmp_path):
    folder = fixtures_dir / "lm_tiny"
    lm = LMModel.from_pretrained(folder / SPELLINGS[0], config=folder / "config.json", dtype=torch.bfloat16)
    save_lm(lm, tmp_path / "bf16.safetensors")
    header = read_header(tmp_path / "bf16.safetensors")
    assert set(header.dtypes().values()) == {torch.bfloat16}
    again = LMModel.from_pretrained(tmp_path / "bf16.safetensors", config=folder / "config.json", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))


# ---------------------------------------------------------------- the streaming writer and reader
def test_writer_streams_row_pieces_and_aligns_the_header(tmp_path):
    pieces = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.arange(6, 12, dtype=torch.float32).view(2, 3)]
    scalar = torch.tensor(7, dtype=torch.int64)
    write_tensors(tmp_path / "x.safetensors", {"b.fused": pieces, "a.scalar": scalar, "c.empty": torch.zeros(0, 4)},
                  metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0 and json.loads(raw[8:8 + length])["__metadata__"] == {"format": "pt"}
    loaded = load_file(str(tmp_path / "x.safetensors"))  # the reference reader agrees
    assert torch.equal(loaded["b.fused"], torch.cat(pieces)) and loaded["a.scalar"] == 7
    assert loaded["c.empty"].shape == (0, 4)
    ours = dict(iter_tensors(read_header(tmp_path / "x.safetensors")))
    assert all(torch.equal(ours[k], loaded[k]) for k in loaded)


def test_writer_checks_order_shapes_and_completeness(tmp_path):
    layout = [("a", torch.float32, (2, 2)), ("b", torch.bfloat16, (3,))]
    with pytest.raises(ValueError, match="write order"):
        with SafetensorsWriter(tmp_path / "o.safetensors", layout) as out:
            out.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not make"):
        with SafetensorsWriter(tmp_path / "s.safetensors", layout) as out:
            out.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="never written: b"):
        with SafetensorsWriter(tmp_path / "c.safetensors", layout) as out:
            out.write("a", torch.zeros(2, 2))


def _header(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, struct.pack("<Q", 10**9) + b"{}",
                                     struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 5) + b"{oops",
                                     _header(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'),
                                     _header(b'{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}')])
def test_reader_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content + b"\x00" * 8)
    with pytest.raises(SafetensorsFormatError):
        read_header(path)
