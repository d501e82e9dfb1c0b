"""`glipv2 serve`'s HTTP server: uvicorn, draining on SIGTERM before it closes.

uvicorn alone closes its listening socket at the signal: a request sent after it meets a refused
connection, and `/readyz` never says 503 to the load balancer. Here the first SIGTERM (or
SIGINT) starts `ServiceState.drain()` instead: the listener stays open, `/readyz` and new /v1
requests answer 503 `shutting_down` (JSON, `Retry-After`), the requests in flight and the job
window in flight finish, bounded by `shutdown_timeout_s`. Only then does uvicorn's own shutdown
run: it closes the listener and idle connections, gives open ones `CLOSE_TIMEOUT_S` to take their
last answers, and runs the lifespan shutdown (the engines, already idle, stop; the job store
closes). A second signal ends the drain at once (what is left answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.settings import ServiceSettings
from service.state import ServiceState

log = logging.getLogger(__name__)

# After the drain, how long uvicorn waits for open connections to send their last responses
# (the drain answered or failed every request already, so this only bounds slow clients).
CLOSE_TIMEOUT_S = 1


class DrainingServer(uvicorn.Server):
    """A `uvicorn.Server` whose first exit signal drains `state` before the server stops."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()  # from now on a signal drains

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler. It runs between two bytecodes of the loop's own thread, so it
        only sets flags and hands the rest to the loop (`call_soon_threadsafe`)."""
        if self._loop is None:  # still starting: uvicorn's own way (stops before serving)
            super().handle_exit(sig, frame)
        elif not self._signalled:
            self._signalled = True
            self._loop.call_soon_threadsafe(self._start_drain)
        else:  # a second signal: stop waiting for the work in flight
            self._loop.call_soon_threadsafe(self.state.end_drain)
            super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain = asyncio.create_task(self._drain_then_exit(), name="glipv2-sigterm")

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
        except Exception:  # a bug in the drain must not keep the process up
            log.exception("draining failed; stopping now")
        finally:
            self.should_exit = True


def run_server(app: FastAPI, settings: ServiceSettings, *, log_level: str,
               log_config: dict[str, Any] | None = None) -> int:
    """Serve `app` (from `service.app.create_app`) on the settings' host and port until a
    signal; returns 0 after the drain. uvicorn exits 3 itself when it cannot start (port taken).
    """
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            log_config=log_config, timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    server = DrainingServer(config, app.state.service)
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C, re-raised by uvicorn
        server.run()
    return 0
