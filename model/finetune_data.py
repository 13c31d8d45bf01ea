"""moshi-finetune's dataset format, turned into LM training codes.

A dataset is a ``.jsonl`` of ``{"path": ..., "duration": ...}`` lines (paths relative to the
.jsonl's folder, or absolute): stereo WAVs, left channel the model's voice, right channel the
user. Each WAV has a sidecar ``.json`` (same name) ``{"alignments": [[word, [start_s, end_s],
speaker], ...]}``; the words of ``main_speaker`` form the model's text stream.

Text stream (one token per 80 ms frame): a word's tokens go out one per frame from the first frame
at or after its start (later if the previous word's tokens still occupy it); the frame before a
word becomes the end-of-padding token when it was padding; every other frame is padding. Both
channels are Mimi-encoded offline; the LM's own delays are applied by ``LMModel.forward``.

Codes of one file: [1 + n_q, T]: row 0 text, rows 1..dep_q the left channel's first dep_q
codebooks, the remaining rows the right channel's first n_q - dep_q codebooks.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

END_OF_PADDING_ID = 0  # the text token that ends a run of padding just before a word (upstream's id 0)
MAIN_SPEAKER = "SPEAKER_MAIN"


class DatasetError(ValueError):
    """The dataset is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float
    speaker: str


@dataclass
class Sample:
    """One dialogue: its WAV, its words, and (once encoded) its codes [1 + n_q, T]."""

    path: Path
    duration: float
    words: list[Word]
    codes: torch.Tensor | None = None


def read_manifest(jsonl: str | Path) -> list[Sample]:
    """The samples of a moshi-finetune .jsonl, each with its sidecar alignments."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise DatasetError(f"dataset not found: {jsonl}")
    samples = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path = Path(entry["path"])
            duration = float(entry["duration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{jsonl}:{number}: expected {{\"path\": ..., \"duration\": ...}}: {err}") from err
        path = path if path.is_absolute() else jsonl.parent / path
        samples.append(Sample(path=path, duration=duration, words=read_alignments(path.with_suffix(".json"))))
    if not samples:
        raise DatasetError(f"{jsonl} lists no audio files")
    return samples


def read_alignments(path: Path) -> list[Word]:
    """The words of a sidecar .json: ``{"alignments": [[word, [start, end], speaker], ...]}``."""
    if not path.is_file():
        raise DatasetError(f"alignments not found: {path} (each WAV needs a .json beside it)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["alignments"]
        words = [Word(str(text), float(span[0]), float(span[1]), str(speaker)) for text, span, speaker in raw]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: expected {{\"alignments\": [[word, [start_s, end_s], speaker], ...]}}: "
                           f"{err}") from err
    return sorted(words, key=lambda word: word.start)


def read_stereo(path: Path, sample_rate: int) -> np.ndarray:
    """A stereo file as float32 [2, T] at ``sample_rate`` (left = model, right = user)."""
    from duplex.client.audio import AudioFileError, read_audio_channels, resample

    try:
        data, rate = read_audio_channels(path)  # [C, T]
    except AudioFileError as err:
        raise DatasetError(str(err)) from err
    if data.shape[0] != 2:
        raise DatasetError(f"{path} has {data.shape[0]} channel(s); training needs stereo "
                           "(left = the model's voice, right = the user)")
    return np.stack([resample(np.ascontiguousarray(data[c]), rate, sample_rate) for c in range(2)])


def text_stream(words: list[Word], frames: int, frame_rate: float, encode, padding_id: int,
                main_speaker: str = MAIN_SPEAKER) -> torch.Tensor:
    """The model's text tokens, one per frame: [frames] (see the module doc)."""
    stream = torch.full((frames,), padding_id, dtype=torch.long)
    free = 0  # first frame not yet taken by a word's tokens
    for word in words:
        if word.speaker != main_speaker:
            continue
        tokens = encode(word.text)
        first = max(math.ceil(word.start * frame_rate - 1e-6), free)
        if not tokens or first >= frames:
            continue
        if first > 0 and stream[first - 1] == padding_id:
            stream[first - 1] = END_OF_PADDING_ID
        tokens = tokens[: frames - first]
        stream[first:first + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        free = first + len(tokens)
    return stream


def encode_sample(sample: Sample, mimi, lm_config, encode_text, main_speaker: str = MAIN_SPEAKER) -> torch.Tensor:
    """Codes [1 + n_q, T] of one dialogue (both channels through Mimi, text from the alignments)."""
    audio = torch.from_numpy(read_stereo(sample.path, mimi.sample_rate))  # [2, samples]
    device = next(mimi.parameters()).device
    with torch.no_grad():
        codes = mimi.encode(audio[:, None].to(device)).cpu()  # [2, K, T]
    dep_q, user = lm_config.dep_q, lm_config.n_q - lm_config.dep_q
    if codes.shape[1] < max(dep_q, user):
        raise DatasetError(f"Mimi gives {codes.shape[1]} codebooks, the LM needs {max(dep_q, user)}")
    padding = lm_config.existing_text_padding_id
    if padding is None:
        raise DatasetError("the LM has no text padding token (existing_text_padding_id): cannot build its text stream")
    text = text_stream(sample.words, codes.shape[-1], mimi.frame_rate, encode_text, padding, main_speaker)
    return torch.cat([text[None], codes[0, :dep_q], codes[1, :user]], dim=0)  # [1 + n_q, T]


@dataclass(frozen=True)
class Window:
    sample: int
    start: int  # frame


def windows(samples: list[Sample], frames: int) -> list[Window]:
    """Consecutive training windows of ``frames`` frames over every sample (a shorter file: one window)."""
    out = []
    for index, sample in enumerate(samples):
        length = sample.codes.shape[-1]
        out.extend(Window(index, start) for start in range(0, max(length - frames, 0) + 1, frames))
    return out


def window_batch(samples: list[Sample], chosen: list[Window], frames: int) -> torch.Tensor:
    """Codes [B, 1 + n_q, frames]; a window past its file's end is filled with -1 (no token, no loss)."""
    rows = []
    for window in chosen:
        codes = samples[window.sample].codes[:, window.start:window.start + frames]
        if codes.shape[-1] < frames:
            codes = torch.nn.functional.pad(codes, (0, frames - codes.shape[-1]), value=-1)
        rows.append(codes)
    return torch.stack(rows)


def batch_order(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The window indices of batch ``step``: an endless chain of seeded shuffles (resumable by step)."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, within = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(orders[epoch][within]))
    return out
