"""Batch jobs in PostgreSQL, shared by every replica of the service.

Everything a replica needs lives in the database, the inputs' bytes included (`bytea`), so any
replica works on any job, whichever replica it was submitted to, and no replica's disk holds
state. Work is claimed in leases: a claim takes the first few inputs of a running job that have
no result and no live lease (`FOR UPDATE SKIP LOCKED`: concurrent claimers skip each other's rows
instead of waiting), the holder renews them while the work runs, and `put_results` stores the
results (`ON CONFLICT DO NOTHING` on (job, index): exactly one result per input, whoever computed
it) and releases the leases. A lease its holder stopped renewing (a killed replica) expires after
`lease_timeout_s` and the next claim anywhere takes the input. Lease times come from the
database's clock, so replicas' clocks need not agree; job times (created, started, finished) are
the replica's, as the API reports them.

Each job row carries its result counters, updated in the transaction that stores the results:
progress reads and "is every input answered" (`finish`, called by whichever runner runs out of
inputs to claim) cost one row, however large the job.

The schema is versioned: `schema_version` holds the number of migrations applied; a store applies
the missing ones at start (under an advisory lock, so replicas starting together do it once) and
refuses a database that a newer service has migrated further.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from service.jobs.store import (
    JobInput,
    JobRecord,
    JobResult,
    JobSchemaError,
    JobState,
    JobStore,
    JobStoreUnavailableError,
)

log = logging.getLogger(__name__)

# Migration N (1-based) brings the schema from version N-1 to N. Append; never edit one shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY, task text NOT NULL, params text NOT NULL, state text NOT NULL,
        total integer NOT NULL, created_s double precision NOT NULL,
        started_s double precision, finished_s double precision, error text,
        succeeded integer NOT NULL DEFAULT 0, failed integer NOT NULL DEFAULT 0,
        done_at_start integer NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_state ON jobs (state, created_s);
    CREATE TABLE job_inputs (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, idx integer NOT NULL,
        data bytea, path text, done boolean NOT NULL DEFAULT false,
        lease_owner text, lease_expires timestamptz,
        PRIMARY KEY (job_id, idx)
    );
    CREATE INDEX job_inputs_open ON job_inputs (job_id, idx) WHERE NOT done;
    CREATE INDEX job_inputs_leased ON job_inputs (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE TABLE job_results (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, idx integer NOT NULL,
        ok boolean NOT NULL, body text NOT NULL, created_s double precision NOT NULL,
        worker text NOT NULL,
        PRIMARY KEY (job_id, idx)
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
# pg_advisory_xact_lock key ("glipv2"): one replica at a time migrates.
_MIGRATION_LOCK = int.from_bytes(b"glipv2", "big")

_RECORD = ("SELECT id, task, params, state, total, created_s, started_s, finished_s, error, "
           "succeeded, failed, succeeded + failed - done_at_start FROM jobs")
_LEASE = "clock_timestamp() + %(lease_s)s * interval '1 second'"
_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)
# Connections per replica: the runner and its heartbeat, plus routes reading progress and results.
_MAX_CONNECTIONS = 8


class PostgresJobStore(JobStore):
    """The job store of a replica; `worker` names it in leases and in the results it stores."""

    idle_poll_s = 1.0  # a job submitted to another replica starts here within a second

    def __init__(self, url: str, *, lease_timeout_s: float = 30.0) -> None:
        self.lease_timeout_s = lease_timeout_s
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
            migrate(connection)
        self._pool = ConnectionPool(url, min_size=1, max_size=_MAX_CONNECTIONS,
                                    kwargs={"autocommit": True}, open=True, name="glipv2-jobs")

    def create(self, task: str, params: dict, inputs: Sequence[JobInput]) -> JobRecord:
        job_id = uuid.uuid4().hex
        with self._connection() as connection, connection.transaction():
            connection.execute(
                "INSERT INTO jobs (id, task, params, state, total, created_s) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (job_id, task, json.dumps(params), JobState.QUEUED.value, len(inputs),
                 time.time()))
            with connection.cursor().copy(
                    "COPY job_inputs (job_id, idx, data, path) FROM STDIN") as copy:
                for index, item in enumerate(inputs):
                    copy.write_row((job_id, index, item.data, item.path))
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._records(f"{_RECORD} WHERE id = %s", (job_id,))
        return rows[0] if rows else None

    def recent(self, limit: int = 100) -> list[JobRecord]:
        return self._records(f"{_RECORD} ORDER BY created_s DESC, id LIMIT %s", (limit,))

    def unfinished(self) -> list[JobRecord]:
        return self._records(f"{_RECORD} WHERE state IN (%s, %s) ORDER BY created_s, id",
                             _UNFINISHED)

    def set_state(self, job_id: str, state: JobState, error: str | None = None) -> bool:
        now = time.time()
        restart = state == JobState.RUNNING
        with self._connection() as connection:
            cursor = connection.execute(
                "UPDATE jobs SET state = %(state)s, error = COALESCE(%(error)s, error), "
                "started_s = CASE WHEN %(restart)s THEN %(now)s ELSE started_s END, "
                "done_at_start = CASE WHEN %(restart)s THEN succeeded + failed "
                "ELSE done_at_start END, finished_s = %(finished)s "
                "WHERE id = %(id)s AND state IN (%(queued)s, %(running)s)",
                {"state": state.value, "error": error, "restart": restart, "now": now,
                 "finished": now if state.finished else None, "id": job_id,
                 "queued": _UNFINISHED[0], "running": _UNFINISHED[1]})
            return cursor.rowcount == 1

    def claim(self, job_id: str, limit: int) -> list[int]:
        with self._connection() as connection:
            rows = connection.execute(
                "WITH picked AS ("
                " SELECT idx FROM job_inputs WHERE job_id = %(job)s AND NOT done"
                " AND (lease_owner IS NULL OR lease_expires < clock_timestamp())"
                " AND EXISTS (SELECT 1 FROM jobs WHERE id = %(job)s AND state = %(running)s)"
                " ORDER BY idx LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                f"UPDATE job_inputs i SET lease_owner = %(worker)s, lease_expires = {_LEASE} "
                "FROM picked WHERE i.job_id = %(job)s AND i.idx = picked.idx RETURNING i.idx",
                {"job": job_id, "running": JobState.RUNNING.value, "limit": limit,
                 "worker": self.worker, "lease_s": self.lease_timeout_s}).fetchall()
        return sorted(row[0] for row in rows)

    def renew(self, job_id: str) -> bool:
        with self._connection() as connection:
            connection.execute(
                f"UPDATE job_inputs SET lease_expires = {_LEASE} "
                "WHERE lease_owner = %(worker)s AND job_id = %(job)s AND NOT done",
                {"worker": self.worker, "job": job_id, "lease_s": self.lease_timeout_s})
            row = connection.execute("SELECT state FROM jobs WHERE id = %s",
                                     (job_id,)).fetchone()
        return row is not None and row[0] == JobState.RUNNING.value

    def put_results(self, job_id: str, results: Sequence[JobResult]) -> list[JobResult]:
        indices = [result.index for result in results]
        with self._connection() as connection, connection.transaction():
            # The row lock orders this against a cancel: results land before it, or not at all.
            row = connection.execute("SELECT state FROM jobs WHERE id = %s FOR UPDATE",
                                     (job_id,)).fetchone()
            if row is None or row[0] != JobState.RUNNING.value:
                return []
            inserted = {new[0] for new in connection.execute(
                "INSERT INTO job_results (job_id, idx, ok, body, created_s, worker) "
                "SELECT %(job)s, r.idx, r.ok, r.body, %(now)s, %(worker)s FROM unnest("
                "%(idx)s::integer[], %(ok)s::boolean[], %(body)s::text[]) AS r(idx, ok, body) "
                "ON CONFLICT DO NOTHING RETURNING idx",
                {"job": job_id, "now": time.time(), "worker": self.worker, "idx": indices,
                 "ok": [result.ok for result in results],
                 "body": [result.body for result in results]}).fetchall()}
            stored = [result for result in results if result.index in inserted]
            succeeded = sum(result.ok for result in stored)
            connection.execute(
                "UPDATE jobs SET succeeded = succeeded + %s, failed = failed + %s WHERE id = %s",
                (succeeded, len(stored) - succeeded, job_id))
            connection.execute(
                "UPDATE job_inputs SET done = true, lease_owner = NULL, lease_expires = NULL "
                "WHERE job_id = %s AND idx = ANY(%s)", (job_id, indices))
            connection.execute(
                "UPDATE job_inputs SET lease_owner = NULL, lease_expires = NULL "
                "WHERE lease_owner = %s AND job_id = %s", (self.worker, job_id))
        return stored

    def finish(self, job_id: str) -> bool:
        with self._connection() as connection:
            cursor = connection.execute(
                "UPDATE jobs SET state = %s, finished_s = %s "
                "WHERE id = %s AND state = %s AND succeeded + failed >= total",
                (JobState.DONE.value, time.time(), job_id, JobState.RUNNING.value))
            return cursor.rowcount == 1

    def read_input(self, job_id: str, index: int) -> JobInput:
        with self._connection() as connection:
            row = connection.execute(
                "SELECT data, path FROM job_inputs WHERE job_id = %s AND idx = %s",
                (job_id, index)).fetchone()
        if row is None:
            raise KeyError(f"job {job_id} has no input {index}")
        data, path = row
        return JobInput(data=data) if data is not None else JobInput(path=path)

    def results(self, job_id: str, after: int = -1, limit: int = 100) -> list[JobResult]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT idx, ok, body FROM job_results WHERE job_id = %s AND idx > %s "
                "ORDER BY idx LIMIT %s", (job_id, after, limit)).fetchall()
        return [JobResult(index=i, ok=ok, body=body) for i, ok, body in rows]

    def counts(self) -> dict[JobState, int]:
        with self._connection() as connection:
            rows = connection.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): n for state, n in rows})
        return counts

    def purge(self, finished_before_s: float) -> int:
        with self._connection() as connection:  # inputs and results go by cascade
            cursor = connection.execute("DELETE FROM jobs WHERE finished_s < %s",
                                        (finished_before_s,))
            return cursor.rowcount

    def close(self) -> None:
        try:
            with self._pool.connection() as connection:
                connection.execute("UPDATE job_inputs SET lease_owner = NULL, "
                                   "lease_expires = NULL WHERE lease_owner = %s", (self.worker,))
        except psycopg.Error:  # the leases then expire on their own
            log.warning("releasing the job leases of %s failed", self.worker, exc_info=True)
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; the database's "cannot now" errors (unreachable, pool
        exhausted, disk full, shutting down, a read-only standby) raised as
        `JobStoreUnavailableError`."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as exc:
            raise JobStoreUnavailableError(f"job store: {exc}") from exc

    def _records(self, query: str, params: Sequence[object]) -> list[JobRecord]:
        with self._connection() as connection:
            rows = connection.execute(query, params).fetchall()
        return [JobRecord(id=job_id, task=task, params=json.loads(params_json),
                          state=JobState(state), total=total, succeeded=succeeded,
                          failed=failed, created_s=created, started_s=started,
                          finished_s=finished, error=error, done_since_start=recent)
                for (job_id, task, params_json, state, total, created, started, finished, error,
                     succeeded, failed, recent) in rows]


def migrate(connection: psycopg.Connection) -> int:
    """Bring the schema up to `SCHEMA_VERSION` (an autocommit connection); returns the version
    found. Raises JobSchemaError for a database migrated past it."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = connection.execute("SELECT version FROM schema_version").fetchone()
        found = 0 if row is None else row[0]
        if found > SCHEMA_VERSION:
            raise JobSchemaError(
                f"the job database is at schema version {found}, newer than this service's "
                f"{SCHEMA_VERSION}: run a service at least as new as the one that migrated it, "
                "or point GLIPV2_JOBS_DATABASE_URL at another database")
        for migration in _MIGRATIONS[found:]:
            connection.execute(migration)
        if row is None:
            connection.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
        elif found < SCHEMA_VERSION:
            connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
    if found < SCHEMA_VERSION:
        log.info("job database migrated from schema version %d to %d", found, SCHEMA_VERSION)
    return found
