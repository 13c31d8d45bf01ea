"""A tiny dialogue dataset in moshi-finetune's format, generated for the fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 24000


def vocabulary(tokenizer, count: int) -> list[str]:
    """Words the tiny tokenizer knows as single pieces (its pieces without the leading '▁')."""
    words = []
    for token in range(4, tokenizer.vocab_size):
        piece = tokenizer._model.IdToPiece(token).lstrip("\u2581")
        if piece and tokenizer.encode(piece) == [token]:
            words.append(piece)
        if len(words) == count:
            break
    return words


def make_dataset(folder: Path, tokenizer, files: int = 2, seconds: float = 4.0, seed: int = 0) -> Path:
    """``files`` stereo WAVs (noise bursts on both channels) with alignments; returns the .jsonl path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = vocabulary(tokenizer, 40)
    lines = []
    for index in range(files):
        samples = int(seconds * SAMPLE_RATE)
        envelope = np.repeat(rng.uniform(0.05, 0.6, size=(2, samples // 960 + 1)), 960, axis=1)[:, :samples]
        audio = (rng.standard_normal((2, samples)) * envelope).astype(np.float32)  # [2, T]
        # The model listens first: its channel is silent for the first 0.8 s of every dialogue, so
        # that only the user's channel tells the dialogues apart when generation starts.
        audio[0, : int(0.8 * SAMPLE_RATE)] = 0.0
        alignments, start = [], 0.9
        while start < seconds - 0.3:
            word = words[int(rng.integers(len(words)))]
            speaker = "SPEAKER_MAIN" if rng.random() < 0.8 else "SPEAKER_OTHER"
            alignments.append([word, [round(start, 3), round(start + 0.25, 3)], speaker])
            start += float(rng.uniform(0.25, 0.6))
        wav = folder / f"dialogue_{index}.wav"
        soundfile.write(str(wav), audio.T, SAMPLE_RATE, subtype="FLOAT")
        wav.with_suffix(".json").write_text(json.dumps({"alignments": alignments}))
        lines.append(json.dumps({"path": wav.name, "duration": seconds}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
