"""The deploy files checked by the tools operators use: hadolint, kubernetes-validate, the
compose-spec schema, KEDA's own CRD schemas, promtool (config, rules, rule tests, and a live
scrape), and the Dockerfile's health check command run against a live sidecar.

The schemas of KEDA and compose are vendored in ``deploy/schemas`` (KEDA v2.20,
compose-spec of 2026-06): no network is needed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml

from bales_stream.embedded_redis import free_port
from bales_stream.settings import load_settings
from tools import make_keda

from .conftest import ROOT, not_ready_sidecar

DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"


def run_tool(*command: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A tool from the virtualenv or PATH; a missing one fails naming how to install it."""
    name = str(command[0])
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: make test installs it (make install prometheus)"
    return subprocess.run(
        [found, *map(str, command[1:])],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_hadolint_passes_the_dockerfile() -> None:
    result = run_tool("hadolint", "--failure-threshold", "info", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_manifests_pass_kubernetes_validate_strictly() -> None:
    result = run_tool(
        "kubernetes-validate", "--strict", "-k", "1.30.0", DEPLOY / "k8s/deployment.yaml"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 2, result.stdout  # the Deployment and the Service


def crd_schema(name: str) -> dict[str, Any]:
    """The openAPIV3Schema of a vendored CRD, made strict: an object that lists its
    properties accepts no others (the API server would drop them without a word)."""
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return schema


KEDA_SCHEMAS = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}


def test_the_keda_objects_validate_against_kedas_crds() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "k8s/keda.yaml").read_text()))
    assert sorted(d["kind"] for d in documents) == sorted(KEDA_SCHEMAS)
    for document in documents:
        jsonschema.validate(document, crd_schema(KEDA_SCHEMAS[document["kind"]]))
    bad = documents[-1] | {"spec": documents[-1]["spec"] | {"minReplicas": 1}}  # a typo
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(bad, crd_schema(KEDA_SCHEMAS[bad["kind"]]))


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    # the spec's "$schema" is draft-07 without the "#" jsonschema looks it up by
    validator = jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    validator.validate(compose)
    redis = compose["services"]["redis"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(compose | {"services": {"redis": redis | {"restart": 3}}})


def test_compose_publishes_the_unauthenticated_monitoring_ports_on_this_host_only() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("prometheus", "grafana"):
        for port in compose["services"][name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)


def test_promtool_checks_the_prometheus_config_and_its_rules() -> None:
    config = run_tool("promtool", "check", "config", DEPLOY / "prometheus/prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS" in config.stdout and "rules found" in config.stdout


def test_every_alert_has_a_rule_test_and_promtool_passes_them() -> None:
    """deploy/prometheus/alerts_test.yml shows each alert firing and not firing."""
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    assert {c["alertname"] for c in checks if c["exp_alerts"]} == alerts  # each fires
    assert {c["alertname"] for c in checks if not c["exp_alerts"]} == alerts  # and is quiet
    result = run_tool("promtool", "test", "rules", DEPLOY / "prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


async def test_promtool_accepts_a_live_scrape(service) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(service.base_url + "/metrics") as response,
    ):
        text = await response.text()
    result = await asyncio.to_thread(run_tool, "promtool", "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr  # no lint either


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, as the container runtime would run it."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", dockerfile, re.M)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    return list(json.loads(match.group(1)))


async def test_the_image_health_check_passes_when_ready_and_fails_otherwise(service) -> None:
    command = healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable

    def probe(port: int) -> int:
        env = {"PORT": str(port), "PATH": "/usr/bin:/bin"}
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert await asyncio.to_thread(probe, service.sidecar.port) == 0
    assert await asyncio.to_thread(probe, free_port()) != 0  # nothing listening
    async with not_ready_sidecar(["shutting down"]) as port:
        assert await asyncio.to_thread(probe, port) != 0  # up but not ready


FLEET_DEFAULTS = {
    "key_prefix": "bales",
    "queue_name": "requests",
    "priority_levels": 3,
    "shards": 1,
    "consumer_group": "bales",
    "redis_url": "redis://localhost:6379/0",
}


def test_the_shipped_keda_file_is_what_the_generator_prints_for_the_defaults() -> None:
    shipped = (DEPLOY / "k8s/keda.yaml").read_text()
    assert shipped == make_keda.render(load_settings(**FLEET_DEFAULTS))


@pytest.mark.parametrize(
    "fleet",
    [{"shards": 3}, {"shards": 2, "priority_levels": 5}, {"redis_cluster": True, "shards": 4}],
)
def test_the_generated_keda_objects_watch_every_stream_of_a_sharded_fleet(fleet) -> None:
    settings = load_settings(**FLEET_DEFAULTS | fleet)
    documents = list(yaml.safe_load_all(make_keda.render(settings)))
    for document in documents:
        jsonschema.validate(document, crd_schema(KEDA_SCHEMAS[document["kind"]]))
    triggers = next(d for d in documents if d["kind"] == "ScaledObject")["spec"]["triggers"]
    every_stream = {
        f"bales:{{requests.{shard}}}:p{priority}" if settings.keys.shards > 1 else ""
        for shard in range(settings.keys.shards)
        for priority in range(settings.keys.priority_levels)
    }
    for threshold in ("lagCount", "pendingEntriesCount"):
        watched = {t["metadata"]["stream"] for t in triggers if threshold in t["metadata"]}
        assert watched == every_stream, threshold
    scaler = "redis-cluster-streams" if fleet.get("redis_cluster") else "redis-streams"
    assert {t["type"] for t in triggers} == {scaler}
