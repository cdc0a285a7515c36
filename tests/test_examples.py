"""The any-language examples, run for real against a running service."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bales_producer import KeySpace

from bales_stream.embedded_redis import RedisServer
from benchmarks.train_digits import held_out_split

from .conftest import ROOT

EXAMPLES = ROOT / "producers" / "examples"


async def run(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stdout.decode(), stderr.decode()


def port_of(url: str) -> str:
    return url.rsplit(":", 1)[1].split("/")[0]


async def test_the_redis_cli_example_gets_a_reply(service_factory, redis_url, prefix) -> None:
    async with service_factory(models_config=ROOT / "weights" / "models.toml"):
        code, out, err = await run(
            ["sh", str(EXAMPLES / "redis-cli.sh")],
            {
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": port_of(redis_url),
                "BALES_PREFIX": prefix,
                "BALES_TEXT_MODEL": "text_cls_demo",
            },
        )
    assert code == 0, err
    reply, text = (json.loads(line) for line in out.splitlines())
    assert reply["status"] == "ok" and reply["model_id"] == "stub_v1"
    assert reply["request_id"].startswith("cli-")
    assert text["status"] == "ok" and text["model_id"] == "text_cls_demo"
    assert text["result"]["label"] in {"cluster", "operations", "security", "wire-format"}


async def run_node_example(redis_url: str, prefix: str, text_model: str = "") -> list[dict]:
    node_dir = EXAMPLES / "node"
    if shutil.which("node") is None or not (node_dir / "node_modules").is_dir():
        if os.environ.get("CI"):
            pytest.fail("Node.js or the example's node_modules missing (make node-deps)")
        pytest.skip("Node.js or node_modules missing: run `make node-deps`")
    code, out, err = await run(
        ["node", "send.mjs"],
        {"REDIS_URL": redis_url, "BALES_PREFIX": prefix, "BALES_TEXT_MODEL": text_model},
        cwd=node_dir,
    )
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_the_nodejs_example_gets_replies_for_json_and_f32(service, redis_url, prefix) -> None:
    replies = await run_node_example(redis_url, prefix)
    assert [r["status"] for r in replies] == ["ok", "ok"]
    assert [r["priority"] for r in replies] == [0, 1]
    # the same values sent as JSON and as f32 give the same answer
    assert replies[0]["result"]["label"] == replies[1]["result"]["label"]


async def test_the_nodejs_example_sends_text_and_a_safetensors_document(
    service_factory, redis_url, prefix
) -> None:
    async with service_factory(models_config=ROOT / "weights" / "models.toml"):
        replies = await run_node_example(redis_url, prefix, "text_embed_demo")
    assert [r["status"] for r in replies] == ["ok"] * 4, replies
    text, tensors = (np.array(r["result"]["embedding"]) for r in replies[2:])
    assert text.shape == (64,) and abs(np.linalg.norm(text) - 1) < 1e-5
    # the text and the token ids Node wrote by hand are the same request: the same embedding
    assert np.abs(text - tensors).max() <= 1e-6


async def test_the_nodejs_example_follows_the_shard_rule(
    service_factory, redis_url, prefix, aredis
) -> None:
    keys = KeySpace(prefix, shards=3)
    async with service_factory(shards=3):
        replies = await run_node_example(redis_url, prefix)
    assert [r["status"] for r in replies] == ["ok", "ok"]
    for reply in replies:  # each entry sits on the stream crc32(request_id) % 3 names
        stream = keys.for_shard(keys.shard_of(reply["request_id"])).stream(reply["priority"])
        entries = await aredis.xrange(stream)
        assert [e[1][b"request_id"].decode() for e in entries] == [reply["request_id"]]


async def test_the_python_example_runs(service, redis_url, prefix) -> None:
    code, out, err = await run(
        [sys.executable, str(EXAMPLES / "python_example.py")],
        {"REDIS_URL": redis_url, "BALES_PREFIX": prefix},
    )
    assert code == 0, err
    assert "sync error: InvalidRequest input has 2 values; stub_v1 expects 128" in out
    assert "async: 1000 replies" in out


async def test_the_digits_example_reports_its_accuracy(service_factory, redis_url, prefix) -> None:
    async with service_factory(models_config=ROOT / "weights" / "models.toml"):
        code, out, err = await run(
            [sys.executable, str(EXAMPLES / "digits_example.py")],
            {"REDIS_URL": redis_url, "BALES_PREFIX": prefix},
        )
    assert code == 0, err
    assert "digits_v1 (digits_mlp-a84d1996e8e4): 437/450 correct = 0.9711 accuracy" in out
    assert "digits_cnn (digits_cnn-fe0bd9bcc91f): 443/450 correct = 0.9844 accuracy" in out


def test_the_digits_example_holds_out_what_the_shipped_models_were_not_trained_on() -> None:
    """The example stands alone (no import of the repository's benchmarks), so its split is
    its own copy: it must stay the training script's."""
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLES / "digits_example.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for mine, trained in zip(example.held_out_split(), held_out_split(), strict=True):
        np.testing.assert_array_equal(mine, trained)


def python_blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, code) of every fenced Python block: ``python`` blocks run as pasted,
    ``python fragment`` blocks are excerpts (a hub model, names defined elsewhere)."""
    return re.findall(r"^```(python[^\n]*)\n(.*?)^```$", path.read_text(), re.M | re.S)


def test_every_python_block_of_the_docs_runs_or_says_it_is_a_fragment() -> None:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for info, _ in python_blocks(path):
            assert info in ("python", "python fragment"), (path, info)
    assert [info for info, _ in python_blocks(ROOT / "README.md")].count("python") >= 1


async def test_the_readme_python_block_runs_as_pasted(service_factory, tmp_path) -> None:
    """Against a consumer serving weights/models.toml on a Redis of its own (the block uses
    the default key prefix); only the Redis URL is changed."""
    (code,) = [code for info, code in python_blocks(ROOT / "README.md") if info == "python"]
    server = RedisServer().start()
    try:
        async with service_factory(
            redis_url=server.url,
            key_prefix="bales",
            models_config=ROOT / "weights" / "models.toml",
        ):
            script = tmp_path / "readme_block.py"
            script.write_text(code.replace("redis://localhost:6379/0", server.url))
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                timeout=120,
            )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'label'" in lines[0] and lines[1].startswith("invalid_request ")
    assert lines[2].startswith("100 {")  # 100 replies, then the digit's result
