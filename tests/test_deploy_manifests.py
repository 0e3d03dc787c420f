"""docker-compose.yml, deploy/haproxy.cfg and deploy/k8s/*.yaml agree with the code.

Parsed with PyYAML and cross-checked: every environment variable they set is a setting
(phonebot.config.Settings), ports match PORT, the kill timeouts outlast a drain computed
from the settings they set, the probes hit real routes, and names point at each other (the
HPA at the Deployment, the Service at the pods, the Ingress at the Service, the adapter
rule at the HPA's metric, which /metrics really exports).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from bench.balancer import haproxy_binary, skip_or_fail_if_missing
from phonebot.config import Settings
from phonebot.web.app import create_app
from phonebot.web.shutdown import HANG_UP_SLACK_S
from phonebot.web.workers import supervisor_deadline_s
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTINGS = {name.upper() for name in Settings.model_fields}


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return k8s_objects()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def server_container(k8s) -> dict:
    deployment = k8s[("Deployment", "phonebot-server")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def config_data(k8s) -> dict[str, str]:
    return k8s[("ConfigMap", "phonebot-config")]["data"]


def settings_from(values: dict[str, str]) -> Settings:
    """Settings as the pods would read them (only the ones set; compose's ${VAR:-default}
    interpolation resolved to its default)."""
    resolved = {
        name.lower(): re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        for name, value in values.items()
        if "${" not in str(value) or ":-" in str(value)
    }
    return Settings(**resolved)


def duration_s(text: str) -> float:
    """Compose's "75s" / "1m30s"."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    assert parts and "".join(a + b for a, b in parts) == text, text
    return sum(float(amount) * units[unit] for amount, unit in parts)


def answers_get(path: str) -> bool:
    """GET `path` reaches a route of the app (not 404/405), whatever it then answers: the
    routes of included routers are not all listed in `app.routes`."""
    client = TestClient(create_app(make_settings()), raise_server_exceptions=False)
    return client.get(path).status_code not in (404, 405)


# --- Kubernetes --------------------------------------------------------------------


def test_every_environment_variable_the_pods_get_is_a_setting(k8s):
    container = server_container(k8s)
    named = {entry["name"] for entry in container["env"]} | set(config_data(k8s))
    assert named - SETTINGS == set()
    refs = [source["configMapRef"]["name"] for source in container["envFrom"]]
    assert refs == ["phonebot-config"]
    secrets = {entry["valueFrom"]["secretKeyRef"]["name"]
               for entry in container["env"] if "valueFrom" in entry}
    assert secrets == {"phonebot-secrets"}
    # Secrets stay out of the ConfigMap.
    assert not {"STREAM_SECRET", "TWILIO_AUTH_TOKEN", "DATABASE_URL"} & set(config_data(k8s))


def test_several_workers_have_what_they_need(k8s):
    env = {entry["name"]: entry for entry in server_container(k8s)["env"]}
    settings = settings_from({**config_data(k8s), "REDIS_URL": env["REDIS_URL"]["value"]})
    assert settings.workers > 1 and settings.redis_url is not None
    assert "STREAM_SECRET" in env and "optional" not in env["STREAM_SECRET"]["valueFrom"][
        "secretKeyRef"]
    redis_host = re.match(r"redis://([^:/]+):(\d+)", env["REDIS_URL"]["value"])
    service = k8s[("Service", redis_host[1])]
    assert int(redis_host[2]) == service["spec"]["ports"][0]["port"]
    # The pod asks for a core per worker.
    cpu = server_container(k8s)["resources"]["requests"]["cpu"]
    assert float(cpu) >= settings.workers


def test_ports_match_port_everywhere(k8s):
    port = int(config_data(k8s)["PORT"])
    container = server_container(k8s)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert container["livenessProbe"]["tcpSocket"]["port"] == "http"
    annotations = k8s[("Deployment", "phonebot-server")]["spec"]["template"]["metadata"][
        "annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    service = k8s[("Service", "phonebot-server")]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    labels = k8s[("Deployment", "phonebot-server")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    backend = k8s[("Ingress", "phonebot-server")]["spec"]["rules"][0]["http"]["paths"][0]
    assert backend["backend"]["service"] == {"name": "phonebot-server", "port": {"name": "http"}}


def test_the_grace_period_outlasts_a_drain_computed_from_the_manifest(k8s):
    settings = settings_from(config_data(k8s))
    spec = k8s[("Deployment", "phonebot-server")]["spec"]["template"]["spec"]
    pre_stop = server_container(k8s)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = settings.shutdown_grace_s + settings.shutdown_goodbye_timeout_s + HANG_UP_SLACK_S
    needed = float(pre_stop[1]) + supervisor_deadline_s(settings)
    assert needed > float(pre_stop[1]) + drain  # the workers' own deadline covers the drain
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_probes_and_scrape_paths_are_routes(k8s):
    readiness = server_container(k8s)["readinessProbe"]["httpGet"]["path"]
    assert answers_get(readiness)
    assert not answers_get("/no-such-route")
    annotations = k8s[("Deployment", "phonebot-server")]["spec"]["template"]["metadata"][
        "annotations"]
    assert answers_get(annotations["prometheus.io/path"])


def test_the_hpa_scales_the_deployment_on_a_metric_the_server_exports(k8s):
    hpa = k8s[("HorizontalPodAutoscaler", "phonebot-server")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "phonebot-server")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # calls per pod, not CPU
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(k8s[("ConfigMap", "adapter-config")]["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in rules["rules"]}
    assert name in served
    assert all(name in rule["seriesQuery"] for rule in rules["rules"] if rule["name"]["as"] == name)
    client = TestClient(create_app(make_settings()))
    with client:
        exported = client.get("/metrics").text
    assert re.search(rf"^# TYPE {name} gauge$", exported, re.M), exported[:2000]
    # The per-pod target stays below what a pod may hold.
    settings = settings_from(config_data(k8s))
    average = float(metric["pods"]["target"]["averageValue"])
    assert average < settings.workers * (settings.max_calls_per_process or 10**9)


# --- docker compose + HAProxy -------------------------------------------------------


def test_compose_environment_is_settings_and_wires_the_services(compose):
    services = compose["services"]
    env = services["server"]["environment"]
    assert set(env) - SETTINGS == set()
    assert {"server", "proxy", "redis", "postgres"} <= set(services)
    assert re.match(r"redis://redis:6379/", env["REDIS_URL"])
    assert "@postgres:5432/" in env["DATABASE_URL"]
    postgres = services["postgres"]["environment"]
    assert f"postgresql://{postgres['POSTGRES_USER']}:" in env["DATABASE_URL"]
    assert env["DATABASE_URL"].endswith(f"/{postgres['POSTGRES_DB']}")
    assert "STREAM_SECRET" in env and "PUBLIC_URL" in env
    assert services["server"]["deploy"]["replicas"] >= 2
    assert services["server"]["build"]["target"] == "server"
    for name in ("server", "redis", "postgres"):
        assert "healthcheck" in services[name], name


def test_compose_ports_health_check_and_stop_grace(compose):
    server = compose["services"]["server"]
    settings = settings_from(server["environment"])
    assert server["expose"] == [str(settings.port)]
    health = " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.port}/health" in health
    assert answers_get("/health")
    assert duration_s(server["stop_grace_period"]) >= supervisor_deadline_s(settings)
    proxy = compose["services"]["proxy"]
    assert any(v.startswith("./deploy/haproxy.cfg:") for v in proxy["volumes"])
    published = {p.split(":")[1] for p in proxy["ports"]}
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    (bind,) = re.findall(r"^\s*bind :(\d+)$", config, re.M)
    assert published == {bind}
    # The proxy's backend is the compose service, on the servers' PORT, health-checked.
    assert re.search(rf"server-template \S+ \S+ server:{settings.port} check", config)
    assert "option httpchk GET /health" in config
    assert re.search(r"^\s*timeout tunnel 1h$", config, re.M)


def test_the_haproxy_config_is_valid():
    skip_or_fail_if_missing()  # CI installs HAProxy: missing there is a failure
    checked = subprocess.run([haproxy_binary(), "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_the_dockerfile_server_stage_serves_port_and_runs_server_py(compose):
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages[0] == "server" and stages[-1] == "pipecat-cloud"  # `docker build .` = PCC
    server_stage = text.split("AS pipecat-cloud")[0]
    port = compose["services"]["server"]["environment"]["PORT"]
    assert f"EXPOSE {port}" in server_stage and f"PORT={port}" in server_stage
    assert 'CMD ["python", "server.py"]' in server_stage
