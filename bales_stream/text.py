"""Text in: a Hugging Face ``tokenizers`` file that turns a batch of texts into a text
model's inputs (``input_ids``, and ``attention_mask`` / ``token_type_ids`` when declared).

The file is a ``tokenizer.json`` (JSON data, no code) inside WEIGHTS_DIR, read once and
optionally pinned by sha256. Texts longer than ``max_length`` tokens are truncated; padding
is the batch's business (``tensors.collate``), not the tokenizer's. Tokenising runs in the
executor, a batch at a time (``encode_batch``), never on the event loop.

A text is cut to ``max_length * CHARS_PER_TOKEN`` characters before it is tokenised: the
tokenizer would read all of it (a 1 MB text costs about a second of CPU) only to keep the
first ``max_length`` tokens. Only a text whose first ``max_length`` tokens average more than
``CHARS_PER_TOKEN`` characters each gets fewer tokens than it would without the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import ModelLoadError
from .tensors import TensorSpec

CHARS_PER_TOKEN = 32
"""Characters of text read per token kept (see the module docstring)."""


def parse_tokenizer(data: bytes, name: str, max_length: int) -> Tokenizer:
    """Parse a ``tokenizer.json``, truncating to ``max_length`` tokens and never padding;
    raise ``ModelLoadError`` saying why it does not load."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a plain Exception for a bad file
        raise ModelLoadError(f"tokenizer {name} does not load: {exc}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


class TextEncoder:
    """Fills a model's text inputs from texts."""

    def __init__(self, tokenizer: Tokenizer, inputs: Sequence[TensorSpec], max_length: int):
        self.tokenizer = tokenizer
        self.inputs = tuple(inputs)
        self.max_chars = max_length * CHARS_PER_TOKEN

    def encode(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The named input arrays of each text, unpadded (one dict per text, same order)."""
        encodings = self.tokenizer.encode_batch([text[: self.max_chars] for text in texts])
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
