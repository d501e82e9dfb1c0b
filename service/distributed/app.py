"""The Ray Serve application: an ingress deployment in front of an engine deployment.

`application(settings, deployments)` binds the two with their options: the defaults below,
overridden per deployment by a Serve config's `deployments:` entries (replicas or autoscaling,
`ray_actor_options` with fractional `num_gpus`, health checks). `build` is the application
builder a Serve config names (`import_path: service.distributed.app:build`), so `serve deploy
docker/ray/serve.yaml` and a KubeRay `RayService` deploy the same thing as `glipv2 serve --ray`,
which reads that file (`read_config`) and runs it on a local or existing Ray cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from service.distributed.engine import Glipv2Engine
from service.distributed.ingress import Glipv2Ingress
from service.distributed.routing import ROUTER_PATH
from service.settings import REPO_ROOT

APP_NAME = "glipv2"
INGRESS = "Glipv2Ingress"
ENGINE = "Glipv2Engine"
IMPORT_PATH = "service.distributed.app:build"
DEFAULT_CONFIG = REPO_ROOT / "docker" / "ray" / "serve.yaml"

# Options a config's `deployments:` entry overrides, key by key (Serve's semantics).
INGRESS_DEFAULTS: dict[str, Any] = {
    # Requests in flight per ingress replica: each mostly awaits its engine calls.
    "max_ongoing_requests": 64,
    "ray_actor_options": {"num_cpus": 1},
    # The app writes its own access log (JSON lines: request id, route, engine batches, ...).
    "logging_config": {"enable_access_log": False},
}
ENGINE_DEFAULTS: dict[str, Any] = {
    # Engine calls in flight per replica: its batchers queue them (and answer 429 past
    # GLIPV2_BATCHER__MAX_QUEUE_SIZE), so Serve should hand them over rather than hold them.
    "max_ongoing_requests": 256,
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
    "health_check_period_s": 10.0,
    "health_check_timeout_s": 30.0,
    "graceful_shutdown_timeout_s": 30.0,
    "request_router_config": {"request_router_class": ROUTER_PATH},
    # A request makes several engine calls: their access log lines would outnumber the
    # ingress's, and cost CPU beside the engines. Errors are still logged.
    "logging_config": {"enable_access_log": False},
}


def application(settings: Mapping[str, Any] | None = None,
                deployments: Mapping[str, Mapping[str, Any]] | None = None) -> Application:
    """The ingress bound to the engine deployment. settings: `ServiceSettings` keyword
    arguments for every replica; deployments: per deployment name, options over the defaults."""
    settings = dict(settings or {})
    deployments = deployments or {}
    engine = serve.deployment(name=ENGINE)(Glipv2Engine).options(
        **(ENGINE_DEFAULTS | dict(deployments.get(ENGINE, {}))))
    ingress = serve.deployment(name=INGRESS)(Glipv2Ingress).options(
        **(INGRESS_DEFAULTS | dict(deployments.get(INGRESS, {}))))
    return ingress.bind(settings, engine.bind(settings))


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args.settings` are `ServiceSettings` keyword arguments
    (Serve applies the config's `deployments:` itself)."""
    return application(args.get("settings"))


@dataclass(frozen=True)
class ServeConfig:
    """Our application in a Serve config file, as `glipv2 serve --ray` runs it."""

    host: str
    port: int
    route_prefix: str
    proxy_location: str  # where HTTP proxies run: EveryNode, HeadOnly or Disabled
    settings: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_config(path: Path) -> ServeConfig:
    """The application of `path` that imports `IMPORT_PATH`, validated as Serve validates the
    file for `serve deploy` (a clear error for a bad field, before anything starts)."""
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    apps = [app for app in schema.applications if app.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}, "
                         f"found {len(apps)}")
    raw_app = next(a for a in raw["applications"] if a.get("import_path") == IMPORT_PATH)
    deployments = {}
    for entry in raw_app.get("deployments") or []:  # as written: only the fields given
        options = dict(entry)
        deployments[options.pop("name")] = options
    http = schema.http_options
    return ServeConfig(host=http.host or "127.0.0.1", port=http.port,
                       route_prefix=apps[0].route_prefix or "/",
                       proxy_location=str(schema.proxy_location.value),
                       settings=dict((apps[0].args or {}).get("settings") or {}),
                       deployments=deployments)
