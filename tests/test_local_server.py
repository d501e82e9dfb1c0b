"""`benchmarks.local_server.spawn_server`'s job store, with the subprocess and HTTP faked (fast)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from benchmarks import local_server


class _ReadyProcess:
    """Stands in for the `glipv2 serve` subprocess: running, and ready at once."""

    def __init__(self, args: list[str], env: dict[str, str], **_: object) -> None:
        self.env = env

    def poll(self) -> None:
        return None


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], None]]:
    """Fakes the server; returns the exit handlers `spawn_server` registers."""
    monkeypatch.setattr(local_server.subprocess, "Popen", _ReadyProcess)
    monkeypatch.setattr(local_server.httpx, "get", lambda *a, **k: httpx.Response(200))
    at_exit: list[Callable[[], None]] = []
    monkeypatch.setattr(local_server.atexit, "register",
                        lambda function, *args, **kwargs: at_exit.append(
                            lambda: function(*args, **kwargs)))
    return at_exit


def test_a_temporary_job_store_goes_when_the_process_exits(
        spawned: list[Callable[[], None]]) -> None:
    process, url = local_server.spawn_server([], env={"PATH": "/usr/bin"})
    jobs = Path(process.env["GLIPV2_JOBS_DIR"])
    assert url.startswith("http://127.0.0.1:") and jobs.is_dir()
    assert not jobs.is_relative_to(local_server.REPO_ROOT)
    (jobs / "jobs.sqlite3").write_bytes(b"written by the server")
    assert len(spawned) == 1
    spawned[0]()
    assert not jobs.exists()


def test_a_named_job_store_is_used_and_kept(spawned: list[Callable[[], None]],
                                            tmp_path: Path) -> None:
    process, _ = local_server.spawn_server([], env={"GLIPV2_JOBS_DIR": str(tmp_path)})
    assert process.env["GLIPV2_JOBS_DIR"] == str(tmp_path)
    assert process.env["HF_HUB_OFFLINE"] == "1"
    assert spawned == []  # nothing of the caller's is removed
