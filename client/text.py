"""The model's text stream (inner monologue) as a transcript."""

from __future__ import annotations


class TranscriptBuilder:
    """Collects text tokens one per frame and joins their pieces (padding ids are never shown)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # duplex.model.tokenizer.TextTokenizer
        self.tokens: list[int] = []
        self.pieces: list[str] = []

    def add(self, token: int) -> str | None:
        """Record one text token; returns its piece (``▁`` already a space) or None for padding."""
        self.tokens.append(int(token))
        piece = self.tokenizer.piece(token)
        if piece:
            self.pieces.append(piece)
        return piece

    def text(self) -> str:
        """Everything said so far, as one line of text."""
        return "".join(self.pieces).strip()
