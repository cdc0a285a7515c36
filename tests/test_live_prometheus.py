"""A real Prometheus (Debian's package) scraping two live consumers on a private Redis:
after traffic with errors and a failed reload, every dashboard panel's PromQL returns data
through Prometheus's HTTP API, and the alerts that should fire fire (and only those)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from bales_producer import AsyncClient

from bales_stream.embedded_redis import free_port

from .conftest import ROOT, wait_for

DASHBOARD = ROOT / "deploy" / "grafana" / "bales.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 1
# Grafana's variables as "All" and a rate window of several scrapes
GRAFANA_VARIABLES = {"$job": ".*", "$instance": ".*", "$__rate_interval": "15s"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with the dashboard's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr  # a variable this test does not know
            queries.append((panel["title"], expr))
    return queries


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, targets: list[str]) -> AsyncIterator[str]:
    """Prometheus scraping ``targets`` every second with the shipped alert rules; its URL.
    The job is not called bales-stream (as under a ServiceMonitor): nothing may depend on it."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: make test installs it (scripts/ensure-prometheus.sh)"
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "default/bales-stream-metrics", "static_configs": [{"targets": targets}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for(lambda: _ready(url), timeout_s=60)
        yield url
    finally:
        process.terminate()
        process.wait(30)


async def _ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/-/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/api/v1/query", params={"query": expr}) as response,
    ):
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


async def firing(url: str) -> set[str]:
    """The names of the alerts firing now."""
    async with aiohttp.ClientSession() as session, session.get(url + "/api/v1/alerts") as r:
        alerts = (await r.json())["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


@pytest.mark.slow
async def test_prometheus_sees_every_panel_and_fires_the_reload_alert(
    service_factory, weights_dir, redis_url, prefix, tmp_path
) -> None:
    async with (
        service_factory(weights_dir=weights_dir, consumer_name="live-a") as first,
        service_factory(weights_dir=weights_dir, consumer_name="live-b") as second,
        prometheus(tmp_path, [f"127.0.0.1:{s.sidecar.port}" for s in (first, second)]) as url,
    ):
        await wait_for(lambda: _scraped(url, 2), timeout_s=30)
        async with AsyncClient(redis_url, prefix=prefix) as client:
            for priority in (0, 1, 2):
                await asyncio.gather(
                    *(client.infer("stub_v1", [0.1] * 128, priority=priority) for _ in range(20))
                )
        raw = aioredis.Redis.from_url(redis_url)
        stream = f"{prefix}:{{requests}}:p1"
        await raw.xadd(stream, {"request_id": "bad-1", "model_id": "stub_v1", "input": "[1"})
        await raw.xadd(stream, {"request_id": "bad-2", "model_id": "nope", "input": "[1]"})
        await raw.aclose()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                first.base_url + "/models/stub_v1/reload", json={"weights_path": "junk.pt"}
            ) as refused,
        ):
            assert refused.status >= 400
        # every target scraped twice more after the traffic: every rate() window holds it
        traffic_done_s = time.time()
        await wait_for(
            lambda: _value_is(url, "min(timestamp(up))", traffic_done_s + 2 * SCRAPE_INTERVAL_S),
            timeout_s=30,
        )
        assert await _value_is(url, 'sum(bales_reloads_total{outcome="failed"})', 1)
        assert await _value_is(url, 'sum(bales_requests_total{status="ok"})', 60)
        for title, expr in panel_queries():
            assert await query(url, expr), f"panel {title!r} has no data: {expr}"
        errors = await query(url, 'sum by (status) (bales_requests_total{status!="ok"})')
        counted = {r["metric"]["status"]: float(r["value"][1]) for r in errors}
        assert counted["invalid_request"] >= 1 and counted["unknown_model"] >= 1
        await wait_for(lambda: _alert_fires(url, "BalesReloadFailed"), timeout_s=30)
        assert not {"BalesConsumersDown", "BalesNoConsumersWhileWorkWaits"} & await firing(url)


async def _scraped(url: str, targets: int) -> bool:
    return len(await query(url, "bales_model_info == 1")) == targets


async def _value_is(url: str, expr: str, at_least: float) -> bool:
    result = await query(url, expr)
    return bool(result) and float(result[0]["value"][1]) >= at_least


async def _alert_fires(url: str, name: str) -> bool:
    return name in await firing(url)


def test_the_dashboard_queries_name_no_job() -> None:
    """Under a ServiceMonitor the job is named after the Service: a hard-coded job would
    match nothing. Panels select by the $job and $instance variables instead."""
    for title, expr in panel_queries():
        assert not re.search(r'job="', expr), (title, expr)
