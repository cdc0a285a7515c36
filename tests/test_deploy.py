"""Static checks of the deployment files (no Docker engine or cluster on these machines):
they parse, reference files, ports, env vars and console scripts that exist, and every
metric a dashboard or alert queries is one the service exports."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from bales_stream.metrics import Metrics
from bales_stream.settings import Settings
from bales_stream.worker import QUEUE_PROBE_TIMEOUT_S

from .conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
K8S = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
KEDA_DOCS = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "keda.yaml").read_text()))
KEDA = next(d for d in KEDA_DOCS if d["kind"] == "ScaledObject")
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}
NOT_SETTINGS = {"REDIS_ADDRESS"}  # read by KEDA's scaler, not by the service
PROMETHEUS_BUILTINS = {"up"}


def console_scripts() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["scripts"])


def exported_metric_names() -> set[str]:
    """Every sample name the service's registry can expose."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    family: Metric
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def queried_metrics(expression: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', "", expression)
    return set(re.findall(r"\b(bales_[a-z_]+|up)\b", without_strings))


def test_the_image_runs_as_a_non_root_user_with_a_curl_free_health_check() -> None:
    assert re.search(r"^USER 10001$", DOCKERFILE, re.M)  # numeric: runAsNonRoot can check it
    assert "--uid 10001" in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".env", ".git"} <= set(ignored)  # never in the build context
    assert "HEALTHCHECK" in DOCKERFILE  # run against a live sidecar in test_deploy_tools
    assert not re.search(r"^ENV .*PIP_EXTRA_INDEX_URL", DOCKERFILE, re.M)  # build-time only
    assert 'CMD ["bales-stream", "serve"]' in DOCKERFILE
    assert "bales-stream" in console_scripts()
    for source in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (ROOT / source).exists(), source


def test_compose_redis_never_evicts_and_keeps_an_append_only_file() -> None:
    command = COMPOSE["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory") + 1] == "1gb"  # noeviction needs a limit
    # what one client may send is bounded as docs/security.md recommends (and tests)
    assert command[command.index("--proto-max-bulk-len") + 1] == "1mb"
    assert command[command.index("--client-query-buffer-limit") + 1] == "4mb"


def test_compose_consumer_settings_and_limits() -> None:
    consumer = COMPOSE["services"]["consumer"]
    assert set(consumer["environment"]) <= SETTINGS_ENV
    assert consumer["deploy"]["replicas"] >= 2
    assert consumer["deploy"]["resources"]["limits"] == {"cpus": "4", "memory": "2G"}
    grace_s = int(consumer["stop_grace_period"].rstrip("s"))
    assert grace_s > int(consumer["environment"]["SHUTDOWN_GRACE_S"])
    assert "8000" in consumer["expose"]
    demo = COMPOSE["services"]["producer-demo"]
    assert demo["command"][0] in console_scripts()
    assert set(demo["environment"]) <= SETTINGS_ENV


def test_compose_monitoring_profile_mounts_files_that_exist() -> None:
    for name in ("prometheus", "grafana"):
        service = COMPOSE["services"][name]
        assert service["profiles"] == ["monitoring"]
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), source
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert target["names"] == ["consumer"] and target["port"] == 8000


def test_k8s_deployment_probes_grace_and_env() -> None:
    deployment = next(d for d in K8S if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][0] in console_scripts()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) - NOT_SETTINGS <= SETTINGS_ENV
    assert pod["terminationGracePeriodSeconds"] > int(env["SHUTDOWN_GRACE_S"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # /health waits up to QUEUE_PROBE_TIMEOUT_S for Redis: the probe must wait longer
    assert container["livenessProbe"]["timeoutSeconds"] > QUEUE_PROBE_TIMEOUT_S
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    port = container["ports"][0]
    assert int(env["PORT"]) == port["containerPort"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = next(d for d in K8S if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_keda_scales_on_every_priority_streams_lag_and_on_pending_entries() -> None:
    triggers = [t["metadata"] for t in KEDA["spec"]["triggers"]]
    assert {t["type"] for t in KEDA["spec"]["triggers"]} == {"redis-streams"}
    streams = Settings(key_prefix="bales").keys.streams
    assert sorted(t["stream"] for t in triggers if "lagCount" in t) == sorted(streams)
    assert any("pendingEntriesCount" in t for t in triggers)
    assert {t["consumerGroup"] for t in triggers} == {Settings().consumer_group}
    deployment = next(d for d in K8S if d["kind"] == "Deployment")
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {t["addressFromEnv"] for t in triggers} <= env
    assert KEDA["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns the count
    auth = next(d for d in KEDA_DOCS if d["kind"] == "TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in KEDA["spec"]["triggers"]} == {
        auth["metadata"]["name"]
    }


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "bales.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("source", [dashboard_expressions, alert_expressions])
def test_every_queried_metric_is_exported(source) -> None:
    exported = exported_metric_names() | PROMETHEUS_BUILTINS
    expressions = source()
    assert expressions
    for expression in expressions:
        names = queried_metrics(expression)
        assert names, expression
        assert names <= exported, (expression, names - exported)


def test_the_dashboard_is_provisioned_from_the_mounted_path() -> None:
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/bales.yml").read_text()
    )
    mounted = [
        v.split(":")[1] for v in COMPOSE["services"]["grafana"]["volumes"] if "bales.json" in v
    ]
    assert Path(mounted[0]).parent == Path(provider["providers"][0]["options"]["path"])


def test_k8s_gives_a_read_only_root_a_writable_tmp() -> None:
    pod = next(d for d in K8S if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"tmp": "/tmp"}
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}
