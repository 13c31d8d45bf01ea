"""A thin wrapper around the sentencepiece text tokenizer of the LM's inner monologue."""

from __future__ import annotations

from pathlib import Path

WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁": a space before the piece
PADDING_IDS = (0, 3)  # the end-of-padding id and existing_text_padding_id: never shown as text


class TextTokenizer:
    """Maps the LM's text tokens to text: ``piece(id)`` for streaming, ``decode(ids)`` for whole texts."""

    def __init__(self, path: str | Path, padding_ids: tuple[int, ...] = PADDING_IDS) -> None:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer not found: {path}")
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"not a sentencepiece model: {path} ({err})") from err
        self.padding_ids = frozenset(padding_ids)

    @property
    def vocab_size(self) -> int:
        return self._model.GetPieceSize()

    def piece(self, token: int) -> str | None:
        """The text of one token (``▁`` becomes a space), or None when it has none to show:
        padding, control pieces such as ``<s>``/``</s>``, unknown or out-of-range ids."""
        token = int(token)
        if token in self.padding_ids or not 0 <= token < self.vocab_size:
            return None
        if self._model.IsControl(token) or self._model.IsUnknown(token):
            return None
        return self._model.IdToPiece(token).replace(WORD_BOUNDARY, " ")

    def decode(self, tokens) -> str:
        """The text of a token sequence, padding ids skipped."""
        kept = [int(t) for t in tokens if int(t) not in self.padding_ids and 0 <= int(t) < self.vocab_size]
        return self._model.DecodeIds(kept)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text."""
        return list(self._model.EncodeAsIds(text))


def train_demo_tokenizer(out_path: str | Path, vocab_size: int = 100) -> Path:
    """Train a small word-level sentencepiece model for the tiny demo/test LMs (ids 0 and 3: unk, pad).

    The published models ship their tokenizer; this one only gives the tiny fixture models
    (text_card 100) readable pieces such as ``w42q``.
    """
    import sentencepiece

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}{chr(97 + i % 26)}" for i in range(3 * vocab_size)]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus = out_path.with_suffix(".corpus.txt")
    corpus.write_text("\n".join(lines * 4) + "\n")
    prefix = out_path.with_suffix("")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="word",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    corpus.unlink()
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    return prefix.with_suffix(".model")
