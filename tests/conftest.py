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
    from duplex.model.tokenizer import train_demo_tokenizer

    return train_demo_tokenizer(Path(out_dir) / "tiny_spm.model", vocab_size)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("spm"))
