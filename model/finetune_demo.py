"""A demo dialogue dataset in moshi-finetune's format, for trying ``duplex finetune`` on the tiny models.

Each dialogue is a stereo WAV of noise bursts (the model's channel silent for its first 0.8 s, as if
it listened first) with a sidecar .json of alignments: random words of the tokenizer, mostly by
``SPEAKER_MAIN``. Trained on it, the tiny LM learns to say those words at those times when it hears
the same user channel (see tests/test_finetune.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000
LISTENING_SECONDS = 0.8


def single_piece_words(tokenizer, count: int) -> list[str]:
    """Words the tokenizer encodes as one piece each (its pieces without the leading '▁')."""
    words = []
    for token in range(4, tokenizer.vocab_size):
        piece = tokenizer._model.IdToPiece(token).lstrip("\u2581")
        if piece and tokenizer.encode(piece) == [token]:
            words.append(piece)
        if len(words) == count:
            break
    return words


def make_demo_dataset(folder: str | Path, tokenizer, files: int = 2, seconds: float = 4.0, seed: int = 0) -> Path:
    """Write ``files`` dialogues and their ``train.jsonl`` under ``folder``; returns the .jsonl path.

    ``tokenizer``: a ``TextTokenizer`` or the path of a sentencepiece model.
    """
    import soundfile

    from .tokenizer import TextTokenizer

    if not isinstance(tokenizer, TextTokenizer):
        tokenizer = TextTokenizer(tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = single_piece_words(tokenizer, 40)
    lines = []
    for index in range(files):
        samples = int(seconds * SAMPLE_RATE)
        envelope = np.repeat(rng.uniform(0.05, 0.6, size=(2, samples // 960 + 1)), 960, axis=1)[:, :samples]
        audio = (rng.standard_normal((2, samples)) * envelope).astype(np.float32)  # [2, T]: model, user
        audio[0, : int(LISTENING_SECONDS * SAMPLE_RATE)] = 0.0
        alignments, start = [], LISTENING_SECONDS + 0.1
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
