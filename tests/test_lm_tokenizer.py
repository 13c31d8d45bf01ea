"""The sentencepiece wrapper: pieces with spaces, padding ids hidden, whole-text decoding."""

from __future__ import annotations

import pytest

from duplex.model.tokenizer import TextTokenizer


def test_pieces_and_padding(tiny_tokenizer_path):
    tokenizer = TextTokenizer(tiny_tokenizer_path)
    assert tokenizer.vocab_size == 100
    assert tokenizer.piece(0) is None and tokenizer.piece(3) is None
    assert tokenizer.piece(100) is None and tokenizer.piece(-1) is None
    assert tokenizer.piece(1) is None and tokenizer.piece(2) is None  # <s>, </s>: control pieces, no text
    ids = tokenizer.encode("w10k w11l")
    assert len(ids) == 2
    assert "".join(tokenizer.piece(i) for i in ids) == " w10k w11l"
    assert all("\u2581" not in tokenizer.piece(i) for i in range(4, 100))


def test_decode_skips_padding(tiny_tokenizer_path):
    tokenizer = TextTokenizer(tiny_tokenizer_path)
    ids = tokenizer.encode("w12m w13n w14o")
    padded = [3, 0, ids[0], 3, 3, ids[1], 0, ids[2], 3]
    assert tokenizer.decode(padded) == "w12m w13n w14o"
    assert tokenizer.decode([3, 0, 3]) == ""


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        TextTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        TextTokenizer(junk)
