"""Shared test fixtures: the reference fixtures folder and a tiny sentencepiece model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DUPLEX_FIXTURES", REPO.parent / "shared" / "fixtures"))


def pytest_configure(config) -> None:
    # The tiny models are dominated by per-op overhead: a second OpenMP thread only adds hand-offs.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set DUPLEX_FIXTURES)")
    return FIXTURES


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 100) -> Path:
    """Train a small sentencepiece model (ids 0..vocab_size-1) for the tiny LMs' text stream."""
    import sentencepiece as spm

    corpus = out_dir / "corpus.txt"
    words = [f"w{i}{chr(97 + i % 26)}" for i in range(3 * vocab_size)]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus.write_text("\n".join(lines * 4) + "\n")
    prefix = out_dir / "tiny_spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="word",
        character_coverage=1.0,
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("spm"))
