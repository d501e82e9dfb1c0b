"""The ingress deployment: the service's FastAPI app, as it is, over remote engines.

Each replica builds the app of `service.app.create_app` at start (Serve's late-bound ingress:
`__serve_build_asgi_app__`), with `RemoteEngineClient` in place of a runtime: routes, auth,
limits, image decoding, chunk planning, post-processing, rendering and the jobs API are the
single-process code, so the HTTP contract and the answers are the same. Its lifespan connects
to the engine deployment in the background; `/readyz` says 503 until an engine replica (which
has loaded the model) has answered.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from service.access_log import configure_logging
from service.app import create_app
from service.distributed.metrics import RayMetricsExport
from service.distributed.remote import RemoteEngineClient
from service.settings import ServiceSettings
from service.state import ServiceState
from service.telemetry import ServiceMetrics


@serve.ingress()
class Glipv2Ingress:
    """One ingress replica (`@serve.deployment` is applied in `app.py`, with its options).

    settings: `ServiceSettings` keyword arguments (GLIPV2_* variables fill in the rest);
    engine: the engine deployment (a `DeploymentHandle` here, bound in `app.py`).
    """

    def __init__(self, settings: dict[str, Any], engine: DeploymentHandle) -> None:
        self.settings = ServiceSettings(**settings)
        configure_logging(self.settings.log_level)
        self.metrics = ServiceMetrics(export=RayMetricsExport())
        self.engines = RemoteEngineClient(
            engine, text_cache_bytes=self.settings.text_cache_bytes,
            request_timeout_ms=self.settings.request_timeout_ms, metrics=self.metrics)
        self.state: ServiceState | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve gives each request its X-Request-ID (the client's, else a new one; its proxy,
        # or with HAProxy in front this replica's own HTTP server), passes it here and puts it
        # on the response: the app adds no second header.
        app = create_app(self.settings, remote=self.engines, service_metrics=self.metrics,
                         proxy_request_id=True)
        self.state = app.state.service
        return app

    def check_health(self) -> None:
        """Unhealthy when connecting to the engines failed (Serve then replaces the replica);
        still connecting is healthy, and answers 503 not ready."""
        if self.state is not None and self.state.load_error is not None:
            raise RuntimeError(f"cannot serve: {self.state.load_error}")
