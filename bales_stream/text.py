"""Text in: a Hugging Face ``tokenizers`` file that turns a batch of texts into a text
model's inputs (``input_ids``, and ``attention_mask`` / ``token_type_ids`` when declared).

The file is a ``tokenizer.json`` (JSON data, no code) inside WEIGHTS_DIR, read once and
optionally pinned by sha256. Texts longer than ``max_length`` tokens are truncated; padding
is the batch's business (``tensors.collate``), not the tokenizer's. Tokenising runs in the
executor, a batch at a time (``encode_batch``), never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import ModelLoadError
from .tensors import TensorSpec


class TextEncoder:
    """Fills a model's text inputs from texts."""

    def __init__(self, tokenizer: Tokenizer, inputs: Sequence[TensorSpec], max_length: int):
        self.tokenizer = tokenizer
        self.inputs = tuple(inputs)
        self.max_length = max_length

    @classmethod
    def from_bytes(
        cls, data: bytes, name: str, inputs: Sequence[TensorSpec], max_length: int
    ) -> TextEncoder:
        """Parse a ``tokenizer.json``; raise ``ModelLoadError`` saying why it does not load."""
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            raise ModelLoadError(f"tokenizer {name} does not load: {exc}") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        return cls(tokenizer, inputs, max_length)

    def encode(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The named input arrays of each text, unpadded (one dict per text, same order)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return [
            {
                spec.name: np.asarray(_field(e, spec.name), dtype=spec.storage)
                for spec in self.inputs
            }
            for e in encodings
        ]


def _field(encoding: object, name: str) -> list[int]:
    if name == "input_ids":
        return encoding.ids  # type: ignore[attr-defined,no-any-return]
    if name == "attention_mask":
        return encoding.attention_mask  # type: ignore[attr-defined,no-any-return]
    return encoding.type_ids  # type: ignore[attr-defined,no-any-return]
