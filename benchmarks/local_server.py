"""`glipv2 serve` in a subprocess on a free port, returned once `/readyz` says 200.

The benchmarks (`glipv2 bench load`, `bench jobs`, `bench report`) and the end-to-end tests start
real servers the same way; this is that one way.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import httpx

from service.settings import REPO_ROOT


class ServerStartError(RuntimeError):
    """The server exited, or was not ready in time; the message carries its output if captured."""


def spawn_server(serve_args: Sequence[str], env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = 300.0, capture_output: bool = False
                 ) -> tuple[subprocess.Popen[str], str]:
    """Start `glipv2 serve SERVE_ARGS` and wait until it is ready; returns (process, base URL).

    env: the whole environment (default: this process's). A temporary job store is used unless
        it names one, so a server never writes the repository's `var/jobs`; it is removed when
        this process exits (tests and benchmarks start many servers).
    capture_output: pipe stdout and stderr together (read them from the process), and put them
        in the error when the server does not come up.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1"}
    if "GLIPV2_JOBS_DIR" not in environment:
        environment["GLIPV2_JOBS_DIR"] = tempfile.mkdtemp(prefix="glipv2-jobs-")
        atexit.register(shutil.rmtree, environment["GLIPV2_JOBS_DIR"], ignore_errors=True)
    output = subprocess.PIPE if capture_output else None
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port),
         "--log-level", "warning", *serve_args], cwd=REPO_ROOT, env=environment,
        stdout=output, stderr=subprocess.STDOUT if capture_output else None, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if process.poll() is not None:
            raise ServerStartError(f"the server exited before it was ready{_output(process)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            process.kill()
            raise ServerStartError(
                f"the server was not ready in {ready_timeout_s:.0f} s{_output(process)}")
        time.sleep(0.25)


@contextmanager
def local_server(model_dir: str | None = None, serve_args: Sequence[str] = (),
                 ready_timeout_s: float = 300.0) -> Iterator[str]:
    """A server for the length of a `with` block (stopped with SIGTERM after it); yields its URL."""
    args = [*serve_args, *(["--model", model_dir] if model_dir else [])]
    process, url = spawn_server(args, ready_timeout_s=ready_timeout_s)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _output(process: subprocess.Popen[str]) -> str:
    if process.stdout is None:
        return ""
    return f": {process.communicate()[0]}"
