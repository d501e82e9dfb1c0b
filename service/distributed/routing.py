"""Routing engine calls to where a request's image features are (Serve's request-router API).

A request's first stage that needs its image (the one that runs `vision`) goes to the less
loaded of two random engine replicas (Serve's default, power of two choices). The image's
features then stay in that replica's node (`RemoteFeatures`), and every later stage carries the
replica's id (`Stage.home`): this router offers that replica first, so the stages run where the
features are, and the features never cross the network. When that replica is full
(`max_ongoing_requests`) or gone, the stage falls back to the power of two choices among all
replicas, and the features travel once, to it.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from service.distributed.messages import Stage

ROUTER_PATH = "service.distributed.routing:FeatureAffinityRouter"


class FeatureAffinityRouter(FIFOMixin, RequestRouter):
    """The home replica of a request's stage first, then two random replicas.

    FIFO matching of routed replicas to waiting calls, as Serve's default router: without it
    calls are matched by their request id, which the concurrent calls of one request share (a
    handle call made while serving a request inherits it), and all but one would wait forever.
    A replica found for the oldest call goes to the oldest call, so the preference holds.
    """

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ranks: list[list[RunningReplica]] = []
        home = _home(pending_request)
        if home is not None:
            held = [r for r in candidate_replicas if r.replica_id.unique_id == home]
            if held:
                ranks.append(held)
        if pending_request is not None:
            # When every offered replica is full, wait (with backoff) before offering again.
            pending_request.routing_context.should_backoff = True
        ranks.append(random.sample(candidate_replicas, min(2, len(candidate_replicas))))
        return ranks


def _home(pending_request: PendingRequest | None) -> str | None:
    """The replica holding the request's features: its `Stage`'s home (None before any)."""
    if pending_request is None or not pending_request.args:
        return None
    stage = pending_request.args[0]
    return stage.home if isinstance(stage, Stage) else None
