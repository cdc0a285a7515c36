"""The shipped demo models through a live service equal their eager models: mixed text lengths
sent concurrently (as text and as safetensors token ids), and uint8 images."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
from bales_producer import AsyncClient
from tokenizers import Tokenizer

from tools.make_demo_models import (
    TEXT_LABELS,
    corpus_files,
    digits_uint8,
    eager_digits_cnn,
    eager_text_model,
)

from .conftest import ROOT

SHIPPED = ROOT / "weights" / "models.toml"
TOLERANCE = 1e-4
pytest.importorskip("transformers")  # the eager references are transformers models


def sentences(count: int) -> list[str]:
    """Mixed lengths: one word to past the 128-token limit (truncated by the service)."""
    words = " ".join(path.read_text() for path in corpus_files()).split()
    rng = random.Random(7)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 90, 200]
    texts = []
    for i in range(count):
        start = rng.randrange(len(words) - 300)
        texts.append(" ".join(words[start : start + lengths[i % len(lengths)]]))
    return [*texts, ""]


def tokenize(texts: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(ROOT / "weights" / "text_demo_tokenizer.json"))
    tokenizer.enable_truncation(128)  # as the models file says
    return [e.ids for e in tokenizer.encode_batch(texts)]


def eager_outputs(name: str, ids: list[int]) -> torch.Tensor:
    module = eager_text_model(name)
    with torch.no_grad():
        return module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]


async def test_text_embed_demo_equals_its_eager_model_for_mixed_lengths(
    service_factory, redis_url, prefix
) -> None:
    texts = sentences(40)
    token_ids = tokenize(texts)
    async with (
        service_factory(models_config=SHIPPED),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        as_text_calls = [
            client.infer("text_embed_demo", text=t, reply_encoding="safetensors") for t in texts
        ]
        as_tensors = [
            client.infer(
                "text_embed_demo",
                {"input_ids": np.array(ids), "attention_mask": np.ones(len(ids), np.int64)},
            )
            for ids in token_ids
        ]
        replies = await asyncio.gather(*as_text_calls, *as_tensors)
    assert max(r["batch_size"] for r in replies) > 1
    for i, ids in enumerate(token_ids):
        hidden = eager_outputs("text_embed_demo", ids)
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
        from_text = replies[i]["result"]["embedding"]
        from_ids = np.array(replies[len(texts) + i]["result"]["embedding"])
        assert isinstance(from_text, np.ndarray) and from_text.shape == (64,)
        assert np.abs(from_text - expected).max() <= TOLERANCE, texts[i]
        assert np.abs(from_ids - expected).max() <= TOLERANCE, texts[i]


async def test_text_cls_demo_equals_its_eager_model_for_mixed_lengths(
    service_factory, redis_url, prefix
) -> None:
    texts = sentences(30)
    async with (
        service_factory(models_config=SHIPPED),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        replies = await asyncio.gather(*(client.infer("text_cls_demo", text=t) for t in texts))
    assert max(r["batch_size"] for r in replies) > 1
    for text, ids, reply in zip(texts, tokenize(texts), replies, strict=True):
        probabilities = torch.softmax(eager_outputs("text_cls_demo", ids), dim=0)
        best = int(probabilities.argmax())
        assert reply["result"]["label"] == TEXT_LABELS[best], text
        assert abs(reply["result"]["score"] - float(probabilities[best])) <= TOLERANCE
        assert reply["result"]["top_k"][0]["label"] == TEXT_LABELS[best]


async def test_digits_cnn_equals_its_eager_model_on_uint8_images(
    service_factory, redis_url, prefix
) -> None:
    images, labels = digits_uint8()
    async with (
        service_factory(models_config=SHIPPED),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        replies = await asyncio.gather(
            *(client.infer("digits_cnn", {"image": image}) for image in images)
        )
    with torch.no_grad():
        probabilities = torch.softmax(eager_digits_cnn()(torch.from_numpy(images)), dim=1)
    confidence, label = probabilities.max(dim=1)
    assert [r["result"]["label"] for r in replies] == label.tolist()
    served = np.array([r["result"]["confidence"] for r in replies])
    assert np.abs(served - confidence.numpy()).max() <= TOLERANCE
    accuracy = np.mean([r["result"]["label"] == y for r, y in zip(replies, labels, strict=True)])
    assert accuracy >= 0.95, accuracy
