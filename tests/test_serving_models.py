"""Serving configured models: the shipped digits model's accuracy, several models in one
consumer, TorchScript and torch.export files, per-model batching, isolation of a slow model."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bales_producer import AsyncClient, InvalidRequest

from bales_stream.errors import ModelLoadError
from bales_stream.model_config import ModelConfig
from bales_stream.models import load_model
from benchmarks import fault_models
from benchmarks.train_digits import held_out_split

from .conftest import ROOT

SHIPPED = ROOT / "weights" / "models.toml"


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "weights"
    directory.mkdir()
    for path in (ROOT / "weights").iterdir():  # every shipped model, for the shipped file
        if path.suffix != ".toml":
            shutil.copy(path, directory / path.name)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3).eval()
    torch.jit.script(linear).save(str(directory / "linear.pt"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(linear, (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(directory / "linear.pt2"))
    fixed = torch.export.export(linear, (torch.zeros(1, 4),))
    torch.export.save(fixed, str(directory / "fixed_batch.pt2"))
    return directory


def models_file(weights_dir: Path, body: str) -> Path:
    path = weights_dir / "models.toml"
    path.write_text(body)
    return path


LINEAR_MODELS = """
[[models]]
model_id = "reg"
model_type = "regression"
format = "torchscript"
file = "linear.pt"
input_shape = [4]

[[models]]
model_id = "emb"
model_type = "embedding"
format = "export"
file = "linear.pt2"
input_shape = [4]
max_batch_size = 4
batch_window_ms = 20
"""


async def test_the_shipped_digits_model_is_accurate_on_held_out_data(
    service_factory, redis_url, prefix
) -> None:
    _, x_test, _, y_test = held_out_split()
    async with (
        service_factory(models_config=SHIPPED) as svc,
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        replies = await asyncio.gather(*(client.infer("digits_v1", x) for x in x_test))
        assert set(svc.worker.registry.models()) >= {"stub_v1", "digits_v1", "digits_cnn"}
    accuracy = np.mean([r["result"]["label"] == y for r, y in zip(replies, y_test, strict=True)])
    assert accuracy >= 0.95, accuracy
    assert len(replies[0]["result"]["top_k"]) == 3
    assert replies[0]["model_version"].startswith("digits_mlp-")
    assert max(r["batch_size"] for r in replies) <= 64


async def test_regression_and_embedding_models_from_torchscript_and_export(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    config = models_file(weights_dir, LINEAR_MODELS)
    values = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)
    linear = torch.jit.load(str(weights_dir / "linear.pt"))
    expected = linear(torch.from_numpy(values)[None]).detach()[0]
    async with (
        service_factory(models_config=config, weights_dir=weights_dir),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        regression = await client.infer("reg", values)
        embeddings = await asyncio.gather(*(client.infer("emb", values) for _ in range(12)))
        with pytest.raises(InvalidRequest, match="input has 3 values; reg expects 4"):
            await client.infer("reg", [1.0, 2.0, 3.0])
        with pytest.raises(InvalidRequest, match="emb is a embedding model"):
            await client.infer("emb", values, model_type="regression")
    assert regression["result"]["values"] == pytest.approx(expected.tolist(), rel=1e-5)
    unit = (expected / expected.norm()).tolist()
    assert embeddings[0]["result"]["embedding"] == pytest.approx(unit, rel=1e-5)
    assert max(r["batch_size"] for r in embeddings) <= 4  # the per-model override


async def test_one_consumer_serves_several_models_without_mixing_batches(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    config = models_file(weights_dir, LINEAR_MODELS + (SHIPPED.read_text()))
    async with (
        service_factory(models_config=config, weights_dir=weights_dir),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        calls = []
        for i in range(300):
            model_id, size = [("reg", 4), ("emb", 4), ("stub_v1", 128), ("digits_v1", 64)][i % 4]
            calls.append(client.infer(model_id, np.full(size, 0.1, dtype=np.float32)))
        replies = await asyncio.gather(*calls)
    keys_by_model = {r["model_id"]: set(r["result"]) for r in replies}
    assert keys_by_model == {
        "reg": {"values"},
        "emb": {"embedding"},
        "stub_v1": {"label", "confidence"},
        "digits_v1": {"label", "confidence", "top_k"},
    }


async def test_a_slow_model_does_not_hold_up_another(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    config = models_file(weights_dir, SHIPPED.read_text())
    async with (
        service_factory(
            models_config=config, weights_dir=weights_dir, thread_pool_size=2, max_batch_size=1
        ) as svc,
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        base = svc.worker.registry.get("stub_v1").module
        fault_models.swap_module(svc.worker.registry, "stub_v1", fault_models.Slow(base, 1.0))
        slow = [
            asyncio.create_task(client.infer("stub_v1", [0.0] * 128, timeout_s=30))
            for _ in range(3)
        ]
        await asyncio.sleep(0.1)  # let the slow batches take their slot
        started = time.perf_counter()
        reply = await client.infer("digits_v1", [0.0] * 64)
        waited_s = time.perf_counter() - started
        await asyncio.gather(*slow)
    assert reply["status"] == "ok"
    assert waited_s < 0.7, waited_s  # it did not wait for a 1 s batch to finish


@pytest.mark.parametrize(
    ("file", "fmt", "words"),
    [
        ("fixed_batch.pt2", "export", "warm-up batch"),
        ("linear.pt", "export", "does not load as export"),
        ("linear.pt2", "torchscript", "does not load as torchscript"),
        ("linear.pt", "torchscript", "input_shape"),
    ],
)
def test_bad_model_files_are_refused_with_the_reason(weights_dir, file, fmt, words) -> None:
    shape = (5,) if words == "input_shape" else (4,)
    config = ModelConfig(
        model_id="m",
        model_type="regression",
        format=fmt,
        file=file,
        input_shape=shape,
        max_batch_size=None,
        batch_window_ms=None,
    )
    with pytest.raises(ModelLoadError, match=words if words != "input_shape" else "warm-up"):
        load_model(config, weights_dir / file)


async def test_a_consumer_with_a_broken_models_file_does_not_start(
    service_factory, weights_dir
) -> None:
    config = models_file(weights_dir, LINEAR_MODELS.replace("linear.pt2", "missing.pt2"))
    with pytest.raises(ModelLoadError, match=r"missing\.pt2"):
        async with service_factory(models_config=config, weights_dir=weights_dir):
            pass
