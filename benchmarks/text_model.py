"""A real model against its limit: ``text_embed_demo`` served from Redis vs a tight loop.

The limit is a loop in one process that calls the same loaded model (tokeniser, padding,
exported encoder, pooling: ``LoadedModel.predict``) on the same batches the service forms
at saturation (texts grouped by length bucket, ``MAX_BATCH_SIZE`` at a time), with the same
thread settings (``THREAD_POOL_SIZE`` threads, each running torch with
``INTRA_OP_THREADS``). The service is one consumer process on a private redis-server, given
all the requests at once as plain XADDs (``encoding=text``, replies to one inbox), timed
from the first XADD to the last reply. Loop and service alternate, ``--runs`` times per
thread setting; the ratio is of medians. Padding waste (padded / real input values) comes
from the consumer's ``bales_input_elements_total``, with and without length buckets.

With ``--hidden H --layers L`` the same runs use a heavier encoder of the same family (a
random-weight BERT of that size, exported here the way ``tools.make_demo_models`` exports the
demo, with the demo's tokenizer): how the thread settings behave when the model dominates.

Run: ``python -m benchmarks.text_model --requests 2000 --runs 3`` (add ``--hidden 256
--layers 4`` for the heavier model).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
import torch
from bales_producer import KeySpace

from bales_stream.embedded_redis import RedisServer, free_port
from bales_stream.inference import use_threads
from bales_stream.model_config import ModelConfig, load_models_file
from bales_stream.models import LoadedModel, load_model
from bales_stream.tensors import bucket_of
from tools.make_demo_models import corpus_files

from .fault_harness import wait_ready
from .faults import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "text_embed_demo"
SETTINGS = [(1, 2), (2, 1), (4, 1)]
"""(THREAD_POOL_SIZE, INTRA_OP_THREADS) pairs measured."""


@dataclass(frozen=True)
class _Text:
    """One text request, as ``LoadedModel.predict`` takes it."""

    text: str
    inputs: dict = field(default_factory=dict)


def texts(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of mixed lengths from the repository's docs (1 to ~150 words)."""
    sentences: list[str] = []
    for path in corpus_files():
        for sentence in re.split(r"(?<=[.!?])\s+|\n\n", path.read_text()):
            words = sentence.split()
            if words:
                sentences.append(" ".join(words))
    rng = random.Random(seed)
    return [rng.choice(sentences) for _ in range(count)]


def config(models_file: Path) -> ModelConfig:
    """The benchmarked model's entry of a models file."""
    return next(c for c in load_models_file(models_file) if c.model_id == MODEL_ID)


def load(weights: Path = ROOT / "weights") -> LoadedModel:
    """The model, loaded as a consumer loads it."""
    cfg = config(weights / "models.toml")
    assert cfg.tokenizer is not None
    return load_model(cfg, weights / cfg.file, None, weights / cfg.tokenizer.file)


def heavier_model(directory: Path, hidden: int, layers: int) -> Path:
    """A WEIGHTS_DIR holding a random-weight encoder of ``hidden`` x ``layers`` (the demo's
    family and tokenizer) under the demo's name, with its models file; returns it."""
    from tools import make_demo_models as demo

    cfg = demo.load_bert_config(ROOT / "weights" / demo.CONFIG_FILE)
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.num_attention_heads, cfg.intermediate_size = max(1, hidden // 64), 4 * hidden
    torch.manual_seed(0)
    program = demo.export_text_model(demo.TextEmbedder(cfg))
    torch.export.save(program, directory / demo.EMBED_FILE)
    shutil.copy(ROOT / "weights" / demo.TOKENIZER_FILE, directory / demo.TOKENIZER_FILE)
    entry = _entry_of(ROOT / "weights" / "models.toml")
    entry = re.sub(r'sha256 = "[0-9a-f]+"\n', "", entry).replace("64] }]", f"{hidden}] }}]")
    (directory / "models.toml").write_text(entry)
    return directory


def batches(items: list[str], max_batch_size: int, bucketing: bool = True) -> list[list[str]]:
    """The batches a saturated consumer forms: by length bucket, ``max_batch_size`` each."""
    groups: dict[int, list[str]] = {}
    for text in items:
        key = bucket_of(len(text.encode()) // 4 + 2) if bucketing else 0
        groups.setdefault(key, []).append(text)
    return [
        group[i : i + max_batch_size]
        for group in groups.values()
        for i in range(0, len(group), max_batch_size)
    ]


def loop_rate(
    model: LoadedModel, items: list[str], pool: int, intra: int, size: int
) -> tuple[float, float]:
    """(texts per second, CPU microseconds per text) of the tight loop."""

    def run(batch: list[str]) -> None:
        use_threads(intra)
        model.predict([_Text(t) for t in batch])

    work = batches(items, size)
    with ThreadPoolExecutor(pool) as executor:
        list(executor.map(run, work[:pool]))  # warm each thread
        started, cpu_started = time.perf_counter(), cpu_seconds(os.getpid())
        list(executor.map(run, work))
        elapsed_s = time.perf_counter() - started
        cpu_us = (cpu_seconds(os.getpid()) - cpu_started) * 1e6 / len(items)
        return len(items) / elapsed_s, cpu_us


@dataclass
class ServiceRun:
    """One consumer process given every text at once."""

    rate: float
    """Texts per second."""
    waste: float
    """Padded input values per real one."""
    consumer_us: float
    """Consumer CPU per text (all its threads), microseconds."""
    redis_us: float
    """redis-server CPU per text, microseconds."""
    batch: float
    """Mean requests per model call."""


async def service_rate(
    server: RedisServer,
    items: list[str],
    pool: int,
    intra: int,
    size: int,
    bucketing: bool = True,
    weights: Path = ROOT / "weights",
) -> ServiceRun:
    """Run one consumer process with these settings over every text at once."""
    redis_url = server.url
    prefix = f"tm{uuid.uuid4().hex[:8]}"
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        models = Path(directory) / "models.toml"
        models.write_text(_entry(weights / "models.toml", bucketing, size))
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "PORT": str(port),
            "LOG_LEVEL": "warning",
            "MODELS_CONFIG": str(models),
            "WEIGHTS_DIR": str(weights),
            "THREAD_POOL_SIZE": str(pool),
            "INTRA_OP_THREADS": str(intra),
            "MAX_BATCH_SIZE": str(size),
            "BATCHER_TIMEOUT_S": "600",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "consumer.py", cwd=ROOT, env=env
        )
        try:
            await wait_ready(port, timeout_s=120)
            cpu_before = (cpu_seconds(process.pid), cpu_seconds(server.process.pid))
            elapsed_s = await _drive(redis_url, KeySpace(prefix), items)
            consumer_s = cpu_seconds(process.pid) - cpu_before[0]
            redis_s = cpu_seconds(server.process.pid) - cpu_before[1]
            waste, batch = await _scrape(port)
        finally:
            process.terminate()
            await process.wait()
    per_text_us = 1e6 / len(items)
    return ServiceRun(
        len(items) / elapsed_s, waste, consumer_s * per_text_us, redis_s * per_text_us, batch
    )


def _entry_of(models_file: Path) -> str:
    """The benchmarked model's ``[[models]]`` block of a models file, as text."""
    text = models_file.read_text()
    start = text.index(f'model_id = "{MODEL_ID}"')
    block = text[text.rindex("[[models]]", 0, start) :]
    following = block.find("[[models]]", 1)
    return block if following < 0 else block[:following]


def _entry(models_file: Path, bucketing: bool, size: int) -> str:
    block = _entry_of(models_file)
    return f"{block}\nbucketing = {str(bucketing).lower()}\nmax_batch_size = {size}\n"


async def _drive(redis_url: str, keys: KeySpace, items: list[str]) -> float:
    inbox = keys.inbox(uuid.uuid4().hex)
    async with aioredis.Redis.from_url(redis_url) as client:
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i, text in enumerate(items):
            pipe.xadd(
                keys.stream(1),
                {
                    "request_id": f"t{i}-{uuid.uuid4().hex[:8]}",
                    "model_id": MODEL_ID,
                    "encoding": "text",
                    "input": text.encode(),
                    "reply_to": inbox,
                },
            )
        await pipe.execute()
        received = 0
        while received < len(items):
            popped = await client.blmpop(30, 1, inbox, direction="LEFT", count=1000)
            assert popped is not None, f"only {received} of {len(items)} replies"
            received += len(popped[1])
        return time.perf_counter() - started


async def _scrape(port: int) -> tuple[float, float]:
    """(padding waste, mean batch size) from the consumer's metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        body = await response.text()

    def value(pattern: str) -> float:
        found = re.search(pattern + r" (\S+)", body)
        return float(found.group(1)) if found else 0.0

    real, padding = (
        value(rf'bales_input_elements_total{{kind="{kind}",model_id="{MODEL_ID}"}}')
        for kind in ("real", "padding")
    )
    batches = value("bales_batch_size_count")
    return padding / real if real else 0.0, value("bales_batch_size_sum") / (batches or 1)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        weights = ROOT / "weights"
        if args.hidden:
            weights = heavier_model(Path(directory), args.hidden, args.layers)
        await measure(args, weights)


async def measure(args: argparse.Namespace, weights: Path) -> None:
    """Print the table: loop and service per thread setting, then the padding waste."""
    items = texts(args.requests)
    model = load(weights)
    server = RedisServer().start()
    try:
        size = f"hidden {args.hidden}, {args.layers} layers" if args.hidden else "the demo"
        print(
            f"{args.requests} texts, {MODEL_ID} ({size}), MAX_BATCH_SIZE {args.batch}, "
            f"{args.runs} runs per setting"
        )
        print(
            "| THREAD_POOL_SIZE | INTRA_OP_THREADS | loop texts/s | service texts/s | ratio "
            "| loop CPU µs/text | consumer CPU µs/text | redis CPU µs/text | service batch |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for pool, intra in SETTINGS:
            loops, runs = [], []
            for _ in range(args.runs):
                loops.append(loop_rate(model, items, pool, intra, args.batch))
                runs.append(
                    await service_rate(server, items, pool, intra, args.batch, True, weights)
                )
            loop = statistics.median(r for r, _ in loops)
            service = statistics.median(r.rate for r in runs)
            print(
                f"| {pool} | {intra} | {loop:,.0f} | {service:,.0f} | {service / loop:.2f}x "
                f"| {statistics.median(c for _, c in loops):.0f} "
                f"| {statistics.median(r.consumer_us for r in runs):.0f} "
                f"| {statistics.median(r.redis_us for r in runs):.0f} "
                f"| {statistics.median(r.batch for r in runs):.1f} |"
            )
        for bucketing in (True, False):
            run = await service_rate(server, items, 2, 1, args.batch, bucketing, weights)
            print(
                f"padding waste with bucketing={bucketing}: {run.waste:.2f} padded per real value"
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="MAX_BATCH_SIZE")
    parser.add_argument("--hidden", type=int, default=0, help="a heavier encoder: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="... and its layer count")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
