"""Durable job storage: the interface the job runner and routes use, and its SQLite default.

A job is its task, its parameters and its inputs (each input's bytes in a file, or a reference to
a file under the configured input folder); results are written one row per input, keyed by
(job, index), so a result is stored exactly once however often a crash makes work repeat. SQLite
runs in WAL mode: readers (progress, result streams) never block the writer, and a killed process
loses nothing that was committed. A store that cannot be read or written now (disk full,
read-only, I/O error, database away) raises `JobStoreUnavailableError`: each call is one
transaction, so what was committed before stays, and the same call succeeds once the store
recovers. One process owns a SQLite store; the store that several
replicas share (`service.jobs.postgres`) implements the same interface with real leases.
"""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobInput:
    """One input: image bytes as sent (`data`, base64 text or raw) or a file reference."""

    data: bytes | None = None
    path: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job as stored. Times are Unix seconds; `started_s` is the latest (re)start."""

    id: str
    task: str
    params: dict
    state: JobState
    total: int
    succeeded: int
    failed: int
    created_s: float
    started_s: float | None
    finished_s: float | None
    error: str | None
    done_since_start: int  # results written since `started_s` (for the rate)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


@dataclass(frozen=True)
class JobResult:
    index: int
    ok: bool
    body: str  # JSON: the task's response, or {"code", "message"} for a failed input


class JobStoreUnavailableError(RuntimeError):
    """The store cannot be read or written now (disk full, read-only, I/O error, database
    away); nothing of the call was stored, what was stored before is kept. Retry later."""


class JobSchemaError(RuntimeError):
    """The job database's schema is newer than this service knows (a newer service migrated it)."""


class JobStore(ABC):
    """What the service needs from job storage; every method is blocking (call it in a thread)
    and raises `JobStoreUnavailableError` when the storage cannot serve it now.

    Work is claimed in leases: `claim` hands this worker (one store object, i.e. one replica) a
    few inputs no other worker holds, `renew` keeps them while the work runs, `put_results`
    stores the answers and lets the leases go. A lease not renewed for `lease_timeout_s` is free
    again, so the inputs of a worker that died go to another; results keep their (job, index)
    key, so an input computed twice still has one result.
    """

    lease_timeout_s: float = 30.0
    # How often an idle runner looks for work it was not woken for (submitted to another
    # replica, or left behind by a dead worker).
    idle_poll_s: float = 60.0

    @abstractmethod
    def create(self, task: str, params: dict, inputs: Sequence[JobInput]) -> JobRecord: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def recent(self, limit: int = 100) -> list[JobRecord]:
        """Newest first."""

    @abstractmethod
    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first (what the runner works through)."""

    @abstractmethod
    def set_state(self, job_id: str, state: JobState, error: str | None = None) -> bool:
        """Move a job to `state`; False if it is already finished (a cancel won the race)."""

    @abstractmethod
    def claim(self, job_id: str, limit: int) -> list[int]:
        """Lease up to `limit` inputs of a running job that have no result and no live lease,
        in input order; [] once the job is not running."""

    @abstractmethod
    def renew(self, job_id: str) -> bool:
        """Extend this worker's leases on the job; False once the job is no longer running
        (cancelled on another replica, or purged): the worker then drops its work in flight."""

    @abstractmethod
    def put_results(self, job_id: str, results: Sequence[JobResult]) -> list[JobResult]:
        """Store a window's results and release this worker's leases on the job; returns those
        stored now (an input that already has a result keeps it). Nothing is stored once the
        job is no longer running: a cancelled job keeps what it had."""

    @abstractmethod
    def finish(self, job_id: str) -> bool:
        """Mark a running job done if every input has a result; True if this call did."""

    @abstractmethod
    def read_input(self, job_id: str, index: int) -> JobInput: ...

    @abstractmethod
    def results(self, job_id: str, after: int = -1, limit: int = 100) -> list[JobResult]:
        """Results with index > `after`, in input order."""

    @abstractmethod
    def counts(self) -> dict[JobState, int]: ...

    @abstractmethod
    def purge(self, finished_before_s: float) -> int:
        """Delete jobs finished before this time, inputs and results included."""

    @abstractmethod
    def close(self) -> None:
        """Release this worker's leases (others take the inputs at once) and disconnect."""


# Migration N (1-based) brings the file from schema version N-1 (`PRAGMA user_version`) to N.
# Append; never edit one shipped. Files made before versioning hold version 0 and the tables of
# migration 1, which it creates only if they do not exist.
_SQLITE_MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL,
    total INTEGER NOT NULL, created_s REAL NOT NULL, started_s REAL, finished_s REAL, error TEXT
);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, file TEXT, path TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL, body TEXT NOT NULL,
    created_s REAL NOT NULL, PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_s);
""",)
SQLITE_SCHEMA_VERSION = len(_SQLITE_MIGRATIONS)


class SqliteJobStore(JobStore):
    """SQLite (WAL) for jobs and results, one file per input under `root/inputs/JOB/`.

    Leases are trivial here: one process owns the store, and its runner claims again only after
    storing its window, so every input without a result is free to claim.
    """

    def __init__(self, root: str | Path, clock=time.time) -> None:
        self.root = Path(root)
        (self.root / "inputs").mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: safe against a crash
        self._migrate()

    def _migrate(self) -> None:
        """Bring the file up to `SQLITE_SCHEMA_VERSION`; refuse one a newer service migrated."""
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > SQLITE_SCHEMA_VERSION:
            raise JobSchemaError(
                f"the job database {self.root / 'jobs.sqlite3'} is at schema version {found}, "
                f"newer than this service's {SQLITE_SCHEMA_VERSION}: run a service at least as "
                "new as the one that migrated it, or point GLIPV2_JOBS_DIR at another folder")
        for version, migration in enumerate(_SQLITE_MIGRATIONS[found:], start=found + 1):
            # executescript commits first; the version moves in the migration's own transaction.
            self._db.executescript(f"BEGIN; {migration} PRAGMA user_version = {version}; COMMIT;")

    def create(self, task: str, params: dict, inputs: Sequence[JobInput]) -> JobRecord:
        job_id = uuid.uuid4().hex
        folder = self.root / "inputs" / job_id
        try:
            with _files_available():
                folder.mkdir(parents=True)
                rows = []
                for index, item in enumerate(inputs):
                    name = None
                    if item.data is not None:
                        name = f"{index:07d}"
                        (folder / name).write_bytes(item.data)
                    rows.append((job_id, index, name, item.path))
            now = self._clock()
            with self._locked(), self._transaction():
                self._db.executemany("INSERT INTO inputs VALUES (?, ?, ?, ?)", rows)
                self._db.execute(
                    "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",
                    (job_id, task, json.dumps(params), JobState.QUEUED.value, len(rows), now))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no job was stored: no files either
            raise
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._locked():
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else self._record(row)

    def recent(self, limit: int = 100) -> list[JobRecord]:
        with self._locked():
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_s DESC, id LIMIT ?",
                                    (limit,)).fetchall()
            return [self._record(row) for row in rows]

    def unfinished(self) -> list[JobRecord]:
        with self._locked():
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created_s, id",
                (JobState.QUEUED.value, JobState.RUNNING.value)).fetchall()
            return [self._record(row) for row in rows]

    def set_state(self, job_id: str, state: JobState, error: str | None = None) -> bool:
        now = self._clock()
        started = now if state == JobState.RUNNING else None
        finished = now if state.finished else None
        with self._locked():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, error = COALESCE(?, error), "
                "started_s = COALESCE(?, started_s), finished_s = ? "
                "WHERE id = ? AND state NOT IN (?, ?, ?)",
                (state.value, error, started, finished, job_id, JobState.DONE.value,
                 JobState.FAILED.value, JobState.CANCELLED.value))
            return cursor.rowcount == 1

    def claim(self, job_id: str, limit: int) -> list[int]:
        with self._locked():
            if not self._running(job_id):
                return []
            rows = self._db.execute(
                "SELECT i.idx FROM inputs i LEFT JOIN results r "
                "ON r.job_id = i.job_id AND r.idx = i.idx "
                "WHERE i.job_id = ? AND r.idx IS NULL ORDER BY i.idx LIMIT ?",
                (job_id, limit)).fetchall()
            return [row[0] for row in rows]

    def renew(self, job_id: str) -> bool:
        with self._locked():
            return self._running(job_id)

    def put_results(self, job_id: str, results: Sequence[JobResult]) -> list[JobResult]:
        now = self._clock()
        stored = []
        with self._locked(), self._transaction():
            if not self._running(job_id):
                return []
            for result in results:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                    (job_id, result.index, int(result.ok), result.body, now))
                if cursor.rowcount == 1:
                    stored.append(result)
        return stored

    def finish(self, job_id: str) -> bool:
        with self._locked():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished_s = ? WHERE id = ? AND state = ? "
                "AND NOT EXISTS (SELECT 1 FROM inputs i LEFT JOIN results r "
                "ON r.job_id = i.job_id AND r.idx = i.idx WHERE i.job_id = ? AND r.idx IS NULL)",
                (JobState.DONE.value, self._clock(), job_id, JobState.RUNNING.value, job_id))
            return cursor.rowcount == 1

    def read_input(self, job_id: str, index: int) -> JobInput:
        with self._locked():
            row = self._db.execute("SELECT file, path FROM inputs WHERE job_id = ? AND idx = ?",
                                   (job_id, index)).fetchone()
        if row is None:
            raise KeyError(f"job {job_id} has no input {index}")
        name, path = row
        if name is not None:
            with _files_available():
                return JobInput(data=(self.root / "inputs" / job_id / name).read_bytes())
        return JobInput(path=path)

    def results(self, job_id: str, after: int = -1, limit: int = 100) -> list[JobResult]:
        with self._locked():
            rows = self._db.execute(
                "SELECT idx, ok, body FROM results WHERE job_id = ? AND idx > ? "
                "ORDER BY idx LIMIT ?", (job_id, after, limit)).fetchall()
        return [JobResult(index=i, ok=bool(ok), body=body) for i, ok, body in rows]

    def counts(self) -> dict[JobState, int]:
        with self._locked():
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): n for state, n in rows})
        return counts

    def purge(self, finished_before_s: float) -> int:
        with self._locked():
            ids = [row[0] for row in self._db.execute(
                "SELECT id FROM jobs WHERE finished_s IS NOT NULL AND finished_s < ?",
                (finished_before_s,)).fetchall()]
            with self._transaction():
                for job_id in ids:
                    for table, key in (("results", "job_id"), ("inputs", "job_id"),
                                       ("jobs", "id")):
                        self._db.execute(f"DELETE FROM {table} WHERE {key} = ?", (job_id,))
        for job_id in ids:
            shutil.rmtree(self.root / "inputs" / job_id, ignore_errors=True)
        return len(ids)

    def close(self) -> None:
        with self._locked():
            self._db.close()

    # --- helpers ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection, for this thread alone; SQLite's "cannot now" errors (disk full,
        read-only, I/O, busy) raised as `JobStoreUnavailableError`."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
                if code in _SQLITE_UNAVAILABLE:
                    raise JobStoreUnavailableError(f"job store: {exc}") from exc
                raise

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _running(self, job_id: str) -> bool:
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row[0] == JobState.RUNNING.value

    def _record(self, row: tuple) -> JobRecord:
        job_id, task, params, state, total, created, started, finished, error = row
        succeeded, failed, recent = self._db.execute(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0), "
            "COALESCE(SUM(created_s >= ?), 0) FROM results WHERE job_id = ?",
            (started if started is not None else float("inf"), job_id)).fetchone()
        return JobRecord(id=job_id, task=task, params=json.loads(params), state=JobState(state),
                         total=total, succeeded=succeeded, failed=failed, created_s=created,
                         started_s=started, finished_s=finished, error=error,
                         done_since_start=recent)


# SQLite's primary result codes meaning "not now" (the storage), not "never" (the statement).
_SQLITE_UNAVAILABLE = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL})
# ... and the file errors of the input files meaning the same.
_FILES_UNAVAILABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO,
                                errno.EACCES, errno.EPERM})


@contextmanager
def _files_available() -> Iterator[None]:
    """Input-file errors of a full, read-only or failing disk raised as
    `JobStoreUnavailableError` (a missing file stays what it is)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FILES_UNAVAILABLE:
            raise JobStoreUnavailableError(f"job store: {exc}") from exc
        raise


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        """Roll back what is left: SQLite may have rolled back already (it does on a full disk
        or an I/O error), and a failing ROLLBACK must not hide the error that caused it."""
        if self.db.in_transaction:
            with suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
