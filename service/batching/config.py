"""The batcher's knobs (Triton's, with units in their names) and the two priorities."""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIORITY_ONLINE = 0  # interactive requests: scheduled first
PRIORITY_BATCH = 1  # batch-job work: fills what online traffic leaves

# Share of the newest batch in the running compute-time estimate behind `retry_after_s`.


@dataclass
class BatcherConfig:
    """The batcher's knobs; units are in the names.

    Defaults: `max_batch_size=8`, `max_queue_delay_ms=0.0`, `max_queue_size=64`,
    `default_deadline_ms=None` (no deadline unless a request brings one),
    `batch_max_wait_ms=1000.0`.

    - `max_batch_size`: most requests in one `run_batch` call.
    - `max_queue_delay_ms`: how long the oldest request of a partial batch may wait for company.
      It applies only when a full batch cannot be formed: a full batch goes at once, and so does
      the batch an arrival completes. 0 (the default, as Triton's) sends whatever is queued as
      soon as the engine is free, so batches form only while the engine is busy and a lone
      request never waits; on a compute-bound CPU a delay costs latency and buys no throughput
      (`glipv2 bench load`).
    - `max_queue_size`: most requests waiting (not counting the batch being computed); a request
      arriving at a full queue is rejected at once (`QueueFullError`), so the queue never grows
      without bound and clients hear "retry later" instead of timing out.
    - `default_deadline_ms`: deadline for requests that bring none, counted from submission. A
      request whose deadline passes before its batch starts is dropped, never computed.
    - `batch_max_wait_ms`: how long batch-job work waits behind online requests before it is
      scheduled as one of them; the most extra latency a job adds to online traffic is then about
      one batch's compute per this interval.

    Tuning order for operators (as Triton's guide):
    1. `max_batch_size`: the largest batch the engine runs within memory (for TensorRT, the
       optimisation profile's maximum); with `glipv2 bench`, stop where throughput flattens.
    2. `max_queue_delay_ms`: raise it from 0 under the target concurrency until
       throughput stops improving or p99 latency leaves the budget; it is the most extra latency a
       lone request pays.
    3. `max_queue_size`: about latency budget / per-batch compute time x `max_batch_size`;
       requests beyond that would miss their deadline anyway, so reject them early.
    4. `default_deadline_ms`: the age past which an answer is useless to the caller.
    """

    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 64
    default_deadline_ms: float | None = None
    batch_max_wait_ms: float = 1000.0

    def __post_init__(self) -> None:
        if not is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not is_number(self.max_queue_delay_ms) or self.max_queue_delay_ms < 0:
            raise ValueError(
                f"max_queue_delay_ms must be a finite number >= 0, got {self.max_queue_delay_ms!r}"
            )
        if not is_int(self.max_queue_size) or self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size must be an integer >= max_batch_size ({self.max_batch_size}), "
                f"got {self.max_queue_size!r}: a smaller queue could never form a full batch"
            )
        if self.default_deadline_ms is not None and (
            not is_number(self.default_deadline_ms) or self.default_deadline_ms <= 0
        ):
            raise ValueError(
                "default_deadline_ms must be None (no deadline) or a finite number > 0, "
                f"got {self.default_deadline_ms!r}"
            )

        if not is_number(self.batch_max_wait_ms) or self.batch_max_wait_ms < 0:
            raise ValueError("batch_max_wait_ms must be a finite number >= 0, "
                             f"got {self.batch_max_wait_ms!r}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
