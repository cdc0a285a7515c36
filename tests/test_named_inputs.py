"""Typed, named, variable-length inputs through a live service, sent as plain XADDs: the
safetensors, json-object and text encodings, binary replies, and the batching invariant (a
request's result does not depend on the lengths of its batch neighbours)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import safetensors.numpy
import safetensors.torch
import torch
from bales_producer import AsyncClient, Client, KeySpace, wire
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from bales_stream.errors import ModelLoadError
from bales_stream.model_config import load_models_file
from bales_stream.models import load_model

from .conftest import RunningService

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *(f"w{i}" for i in range(40))]


class TinyEncoder(torch.nn.Module):
    """Each position sees every real position of its sequence (a masked mean), so wrong
    padding or masking would change the result: (ids, mask) -> (batch, seq, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(len(WORDS), 8)
        self.mix = torch.nn.Linear(16, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        context = (hidden * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.tanh(self.mix(torch.cat([hidden, context.expand_as(hidden)], dim=-1)))


MODELS = """
[[models]]
model_id = "enc"
model_type = "tensor"
format = "safetensors"
architecture = "tests.test_named_inputs:TinyEncoder"
file = "tiny.safetensors"
max_batch_size = 16
batch_window_ms = 50
inputs = [
  { name = "input_ids", dtype = "int64", shape = ["seq"], pad = 0 },
  { name = "attention_mask", dtype = "int64", shape = ["seq"], pad = 0 },
]
max_dims = { seq = 64 }
outputs = [{ name = "hidden", shape = ["seq", 8] }]

[[models]]
model_id = "emb"
model_type = "embedding"
format = "safetensors"
architecture = "tests.test_named_inputs:TinyEncoder"
file = "tiny.safetensors"
tokenizer = { file = "words.json", max_length = 12 }
options = { pooling = "mean", normalize = false }
inputs = [
  { name = "input_ids", dtype = "int64", shape = ["seq"] },
  { name = "attention_mask", dtype = "int64", shape = ["seq"] },
]
"""


def word_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    directory = tmp_path / "weights"
    directory.mkdir()
    torch.manual_seed(3)
    safetensors.torch.save_file(TinyEncoder().state_dict(), directory / "tiny.safetensors")
    word_tokenizer().save(str(directory / "words.json"))
    (directory / "models.toml").write_text(MODELS)
    return directory


@dataclass
class Tiny:
    """A running service with the tiny models, and a raw Redis client to XADD with."""

    service: RunningService
    client: aioredis.Redis

    @property
    def keys(self) -> KeySpace:
        return self.service.settings.keys

    async def send(self, request_id: str, fields: dict[str, bytes | str]) -> bytes:
        return await send(self.client, self.keys, request_id, fields)


@pytest.fixture
async def tiny(service_factory, tiny_weights, redis_url) -> AsyncIterator[Tiny]:
    config = tiny_weights / "models.toml"
    async with (
        service_factory(models_config=config, weights_dir=tiny_weights) as svc,
        aioredis.Redis.from_url(redis_url) as client,
    ):
        yield Tiny(svc, client)


def eager(weights: Path) -> TinyEncoder:
    net = TinyEncoder()
    net.load_state_dict(safetensors.torch.load_file(weights / "tiny.safetensors"))
    return net.eval()


def ids(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, len(WORDS), length).astype(np.int64)


async def send(
    client: aioredis.Redis, keys: KeySpace, request_id: str, fields: dict[str, bytes | str]
) -> bytes:
    await client.xadd(keys.stream(1), {"request_id": request_id, **fields})
    reply = await client.blpop([keys.reply(request_id)], timeout=30)
    assert reply is not None, f"no reply to {request_id}"
    return reply[1]


def tensor_request(length: int, seed: int, **extra: str) -> dict[str, bytes | str]:
    tensors = {"input_ids": ids(length, seed), "attention_mask": np.ones(length, np.int64)}
    return {
        "model_id": "enc",
        "encoding": "safetensors",
        "input": safetensors.numpy.save(tensors),
        **extra,
    }


async def test_mixed_lengths_batched_together_equal_each_request_alone(
    tiny: Tiny, tiny_weights: Path, prefix: str
) -> None:
    lengths = [1, 2, 3, 5, 8, 9, 13, 17, 31, 40, 64, 7, 2, 33, 16, 4] * 2
    net = eager(tiny_weights)
    tiny.service.worker.batcher.adaptive = False  # wait the window: batches of mixed lengths
    raws = await asyncio.gather(
        *(tiny.send(f"{prefix}-m{i}", tensor_request(n, i)) for i, n in enumerate(lengths))
    )
    replies = [json.loads(raw) for raw in raws]
    assert all(r["status"] == "ok" for r in replies), replies[0]
    assert max(r["batch_size"] for r in replies) > 1
    for i, (reply, length) in enumerate(zip(replies, lengths, strict=True)):
        alone = net(torch.from_numpy(ids(length, i))[None], torch.ones(1, length, dtype=torch.long))
        hidden = np.array(reply["result"]["hidden"], dtype=np.float32)
        assert hidden.shape == (length, 8)  # cut to the request's own length
        assert np.abs(hidden - alone[0].detach().numpy()).max() <= 1e-5


async def test_buckets_keep_short_and_long_requests_in_separate_batches(
    tiny: Tiny, prefix: str
) -> None:
    tiny.service.worker.batcher.adaptive = False
    lengths = [3, 60, 4, 50, 5, 64, 6, 40]
    await asyncio.gather(
        *(tiny.send(f"{prefix}-b{i}", tensor_request(n, i)) for i, n in enumerate(lengths))
    )
    metrics = (await tiny.service.worker.exposition()).decode()
    real = sum(2 * n for n in lengths)
    assert f'bales_input_elements_total{{kind="real",model_id="enc"}} {float(real)}' in metrics
    padding = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('bales_input_elements_total{kind="padding",model_id="enc"}')
    )
    # shorts (3-6) pad to 6, longs (40-64) to 64: without buckets all would pad to 64
    assert padding <= 2 * (3 + 2 + 1) + 2 * (14 + 24 + 4), padding


async def test_binary_replies_carry_tensors_and_the_reply_document(
    tiny: Tiny, tiny_weights: Path, prefix: str
) -> None:
    net = eager(tiny_weights)
    raw = await tiny.send(f"{prefix}-bin", tensor_request(6, 1, reply_encoding="safetensors"))
    error = await tiny.send(f"{prefix}-err", tensor_request(65, 1, reply_encoding="safetensors"))
    assert raw[:1] != b"{"
    tensors = safetensors.numpy.load(raw)
    header_size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header_size])["__metadata__"]
    document = json.loads(metadata[wire.REPLY_METADATA_KEY])
    assert document["status"] == "ok" and document["tensors"] == ["hidden"]
    assert document["request_id"] == f"{prefix}-bin" and document["result"] == {}
    expected = net(torch.from_numpy(ids(6, 1))[None], torch.ones(1, 6, dtype=torch.long))[0]
    assert tensors["hidden"].dtype == np.float32 and tensors["hidden"].shape == (6, 8)
    assert np.abs(tensors["hidden"] - expected.detach().numpy()).max() <= 1e-5
    # errors stay JSON documents, whatever reply encoding was asked for
    assert json.loads(error)["error"]["code"] == "invalid_request"
    assert "dimension seq must be 1 to 64, got 65" in json.loads(error)["error"]["message"]


async def test_text_requests_are_tokenised_with_their_batch(
    tiny: Tiny, tiny_weights: Path, prefix: str
) -> None:
    net = eager(tiny_weights)
    tokenizer = word_tokenizer()
    tokenizer.enable_truncation(12)  # as the models file says: [CLS] ten words [SEP]
    texts = ["w1 w2 w3", "w4", "", "w5 " * 30, "w6 nonsense é", "w7 w8"]
    tiny.service.worker.batcher.adaptive = False
    fields = [{"model_id": "emb", "encoding": "text", "input": t.encode()} for t in texts]
    raws = await asyncio.gather(*(tiny.send(f"{prefix}-t{i}", f) for i, f in enumerate(fields)))
    for text, raw in zip(texts, raws, strict=True):
        reply = json.loads(raw)
        assert reply["status"] == "ok", reply
        token_ids = tokenizer.encode(text).ids
        assert len(token_ids) <= 12
        hidden = net(torch.tensor([token_ids]), torch.ones(1, len(token_ids), dtype=torch.long))
        expected = hidden[0].mean(0).detach().numpy()
        assert np.abs(np.array(reply["result"]["embedding"]) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"encoding": "safetensors", "input": b"not a document"}, "not a safetensors document"),
        ({"encoding": "json", "input": b'{"input_ids": [1.5]}'}, "input_ids holds fractions"),
        ({"encoding": "json", "input": b'{"input_ids": [1], "mask": [1]}'}, "'mask' is not an"),
        ({"encoding": "text", "input": b"hello"}, "does not take text"),
        ({"encoding": "json", "input": b"[1, 2]"}, "has several inputs"),
        ({"encoding": "f32", "input": b"\x00" * 8}, "encoding f32 is for a model with one"),
        ({"reply_encoding": "xml", "input": b"{}"}, "reply_encoding 'xml' is not supported"),
        ({"encoding": "json", "input": b'{"input_ids": [1], "attention_mask": [1, 1]}'}, "seq is"),
    ],
)
async def test_bad_typed_inputs_get_a_clear_reply_and_the_consumer_goes_on(
    tiny: Tiny, prefix: str, fields: dict[str, bytes], words: str
) -> None:
    bad = json.loads(await tiny.send(f"{prefix}-bad", {"model_id": "enc", **fields}))
    good = json.loads(await tiny.send(f"{prefix}-good", tensor_request(3, 0)))
    enc = (await tiny.service.worker.health())["models"]["enc"]
    assert enc["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["seq"]}
    assert enc["max_dims"] == {"seq": 64} and enc["takes_text"] is False
    assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request"
    assert words in bad["error"]["message"]
    assert good["status"] == "ok"


def test_a_model_whose_outputs_do_not_fit_its_type_is_refused_at_load(tiny_weights) -> None:
    config = load_models_file(tiny_weights / "models.toml")[0].model_copy(
        update={"model_type": "text-classification", "options": {"labels": ["a", "b"]}}
    )
    with pytest.raises(ModelLoadError, match=r"expects logits \(batch, 2\)"):
        load_model(config, tiny_weights / "tiny.safetensors")


async def test_the_clients_send_named_arrays_and_text_and_decode_binary_replies(
    tiny: Tiny, tiny_weights: Path, redis_url: str, prefix: str
) -> None:
    net = eager(tiny_weights)
    tensors = {"input_ids": ids(7, 2), "attention_mask": np.ones(7, np.int64)}
    expected = net(torch.from_numpy(tensors["input_ids"])[None], torch.ones(1, 7, dtype=torch.long))
    async with AsyncClient(redis_url, prefix=prefix) as client:
        binary = await client.infer("enc", tensors, reply_encoding="safetensors")
        as_json = await client.infer("enc", {k: v.tolist() for k, v in tensors.items()})
        text = await client.infer("emb", text="w1 w2", reply_encoding="safetensors")
        with Client(redis_url, prefix=prefix) as sync_client:
            sync_binary = await asyncio.to_thread(
                sync_client.infer, "enc", tensors, reply_encoding="safetensors"
            )
    hidden = binary["result"]["hidden"]
    assert isinstance(hidden, np.ndarray) and hidden.shape == (7, 8)
    assert np.abs(hidden - expected[0].detach().numpy()).max() <= 1e-5
    assert np.array_equal(sync_binary["result"]["hidden"], hidden)
    assert np.abs(np.array(as_json["result"]["hidden"]) - hidden).max() <= 1e-5
    assert isinstance(text["result"]["embedding"], np.ndarray)
    assert text["result"]["embedding"].shape == (8,)


def test_texts_are_cut_before_tokenising_and_token_ids_bounded_by_the_vocabulary(
    tiny_weights: Path,
) -> None:
    config = load_models_file(tiny_weights / "models.toml")[1]
    model = load_model(config, tiny_weights / "tiny.safetensors", None, tiny_weights / "words.json")
    assert model.text is not None
    [huge] = model.text.encode(["w1 " + "x" * 10_000_000])  # cut, not read to the end
    assert huge["input_ids"].tolist() == [2, 5, 1, 3]  # [CLS] w1 [UNK] [SEP]
    ids = next(s for s in model.spec.inputs if s.name == "input_ids")
    assert ids.value_range == (0, len(WORDS) - 1)
