"""The FastAPI app: composes the routers, the error handlers, the limits and the lifespan.

Nothing is built at import: `create_app` makes an app from settings, and its lifespan starts the
runtime (or an injected one, for tests; or connects to remote engines, under Ray Serve) and
drains the engines at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from engines.runtimes import Runtime
from service.access_log import RequestContextMiddleware
from service.dependencies import admit_request, require_api_key
from service.errors import install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.openapi import shape_contract
from service.pipeline.images import configure_pillow
from service.routers import (
    caption,
    detect,
    health,
    jobs,
    metrics,
    models,
    playground,
    segment,
    vqa,
)
from service.serving import RemoteEngines
from service.settings import ServiceSettings
from service.state import RuntimeLoader, ServiceState
from service.telemetry import HttpMetricsMiddleware, ServiceMetrics

API_TITLE = "GLIPv2 serving"
API_VERSION = "0.1.0"
API_DESCRIPTION = (
    "Grounded detection, phrase grounding, referring segmentation, grounded VQA and grounded "
    "captioning with one GLIPv2 model. Images are JSON base64 (`image`) or multipart uploads "
    "(an `image` file part). Boxes are [x0, y0, x1, y1] in pixels of the image as sent; masks are "
    "COCO RLE. Errors are `{\"error\": {\"code\", \"message\", \"request_id\"}}`. Every "
    "response has an `X-Request-ID` header: the client's, when it sent a valid one, else a new id."
)


class Glipv2App(FastAPI):
    """FastAPI with the contract's document (`service.openapi.shape_contract`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            shape_contract(super().openapi())  # super() caches the document it returns
        assert self.openapi_schema is not None
        return self.openapi_schema


def create_app(settings: ServiceSettings | None = None,
               runtime: Runtime | None = None,
               *, loader: RuntimeLoader | None = None, remote: RemoteEngines | None = None,
               service_metrics: ServiceMetrics | None = None,
               proxy_request_id: bool = False) -> FastAPI:
    """Build the app.

    settings: default `ServiceSettings()` (environment variables, then defaults).
    runtime: serve this runtime instead of opening the configured one (tests).
    loader: how to open the runtime in the background (default: from the settings).
    remote: engines in other processes instead of a runtime here (a Ray Serve ingress).
    service_metrics: default: this app's own registry, exported nowhere else.
    proxy_request_id: a proxy in front (Ray Serve's) assigns the request ids and puts them on
        the responses (see `RequestContextMiddleware`).
    """
    settings = ServiceSettings() if settings is None else settings
    metrics_ = ServiceMetrics() if service_metrics is None else service_metrics
    state = ServiceState(settings, metrics_, runtime=runtime, loader=loader, remote=remote)
    configure_pillow(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = Glipv2App(title=API_TITLE, version=API_VERSION, description=API_DESCRIPTION,
                  lifespan=lifespan)
    app.state.service = state
    install_error_handlers(app)
    # Added last = outermost: metrics see every response, the 413 of the body limit included;
    # the request context outside them all, so every response (that 413 too) carries the id.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       path_limits={"/v1/jobs": settings.max_job_body_bytes})
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics_)
    app.add_middleware(RequestContextMiddleware, access_log=settings.access_log,
                       proxy_request_id=proxy_request_id)

    # The key first (no hint to strangers), then the drain gate, which counts what it admits.
    authenticated = [Depends(require_api_key), Depends(admit_request)]
    for router in (detect.router, segment.router, vqa.router, caption.router, jobs.router,
                   models.router):
        app.include_router(router, dependencies=authenticated)
    for router in (health.router, metrics.router):
        app.include_router(router)
    if settings.playground:
        app.include_router(playground.router)
    return app
