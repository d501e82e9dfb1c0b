"""Shared fixtures: reference files and deterministic fake GLIP checkpoints."""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from benchmarks.local_server import spawn_server
from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import load_pretrained_language
from model_export.modeling.config import PreprocessConfig, get_preset
from model_export.modeling.model import Glipv2Model
from service.distributed.serve_env import apply_serve_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
VECTOR_OPTIONS = {"log_scale": -2.0, "bias0": -32.0, "head_std": 0.8}


def label_to_tokens(positive_map: torch.Tensor) -> dict[int, list[int]]:
    """0-based class index -> sorted token positions where its (C, T) positive map is non-zero."""
    return {
        class_index: torch.nonzero(row, as_tuple=True)[0].tolist()
        for class_index, row in enumerate(positive_map)
    }


def fake_ckpt_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_glip_ckpt", REFERENCE / "fake_glip_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_shapes(preset: str) -> dict[str, list[int]]:
    name = {"glip-t": "glip_t_state_dict.json", "glip-l": "glip_l_state_dict.json"}[preset]
    return json.loads((REFERENCE / name).read_text())


def fake_state(preset: str, seed: int = 0, **options: float) -> dict[str, torch.Tensor]:
    """A released-layout state_dict ({'module.' + key: tensor}) of random tensors."""
    module = fake_ckpt_module()
    return module.build(reference_shapes(preset), seed, module._resolve(options))


@pytest.fixture(scope="session")
def glip_t_vector_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake GLIP-T checkpoint the reference test vector was produced with."""
    path = tmp_path_factory.mktemp("ckpt") / "glip_t_fake.pth"
    torch.save({"model": fake_state("glip-t", 0, **VECTOR_OPTIONS)}, path)
    return path


def start_server(args: list[str], env_overrides: dict[str, str], ready_timeout_s: float
                 ) -> tuple[subprocess.Popen[str], str]:
    """`glipv2 serve ARGS` on a free port, once ready (`benchmarks.local_server.spawn_server`).

    GLIPV2_* variables of the test environment are dropped, so only `env_overrides` configure
    it. Returns the process (stdout and stderr piped together) and its base URL.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIPV2_")} | env_overrides
    return spawn_server(args, env, ready_timeout_s, capture_output=True)


@pytest.fixture(autouse=True)
def _isolated_job_store(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process apps built from default settings keep their jobs in a temporary folder."""
    monkeypatch.setenv("GLIPV2_JOBS_DIR", str(tmp_path_factory.mktemp("jobs")))


def assert_same_answer(job: Any, online: Any, path: str = "") -> None:
    """Equal up to floating-point noise: batch composition (which images share a batch) moves
    scores in the 6th decimal, as it does between two online calls. Detections compare as sets,
    since near-tied scores may swap places."""
    if isinstance(job, dict):
        assert job.keys() == online.keys(), path
        for key in job:
            assert_same_answer(job[key], online[key], f"{path}.{key}")
    elif isinstance(job, list):
        assert len(job) == len(online), path
        if path.endswith("detections"):
            job, online = (sorted(x, key=lambda d: (d["label"], d["box"])) for x in (job, online))
        for index, (a, b) in enumerate(zip(job, online, strict=True)):
            assert_same_answer(a, b, f"{path}[{index}]")
    elif isinstance(job, float):  # boxes are rounded to 0.01 px: noise can flip a digit
        assert job == pytest.approx(online, abs=0.02 if ".box" in path else 1e-4), path
    else:
        assert job == online, path


class GatedRuntime(TorchRuntime):
    """The vision engine waits for `gate`, to hold a request in flight."""

    def __init__(self, model: Glipv2Model) -> None:
        super().__init__(model)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, graph: str, inputs: Any) -> dict[str, torch.Tensor]:
        if graph == "vision":
            self.entered.set()
            self.gate.wait(20)
        return super().run(graph, inputs)


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait, on the event loop, until `condition()` holds (a few seconds at most)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def with_app(app: FastAPI, scenario: Any) -> Any:
    """Run `scenario(client)` against `app` on one event loop, lifespan included."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=60) as http:
            return await scenario(http)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """A local Ray for the whole run, shared by the Ray Serve and Ray Data tests (a process
    joins one Ray): logical CPUs and GPUs, so GPU placement is checked without a GPU. Yields its
    metrics export port."""
    ray = pytest.importorskip("ray", reason="the Ray tests need the `ray` extra: "
                                            "pip install -e '.[ray]'")
    metrics_port = free_port()
    apply_serve_env()  # Serve's request path as deployed (its processes inherit this)
    # An ingress replica stopping waits this long for load balancers to see it go (30 s by
    # default): the HAProxy of this one node sees it at once.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    try:
        ray.init(address="local",  # its own, even beside another Ray on this machine
                 num_cpus=8, num_gpus=2, include_dashboard=False,
                 _metrics_export_port=metrics_port, logging_level="warning",
                 _system_config={"metrics_report_interval_ms": 1000})  # metrics within 1 s
    except Exception as exc:
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    try:
        yield metrics_port
    finally:
        ray.shutdown()  # Serve's actors, if any are left, with it


def tiny_serving_model() -> Glipv2Model:
    """Random small-preset weights (the real text encoder), shrunk pre-processing (96/128) and an
    open candidate threshold (at most 5 detections): every task answers something, fast."""
    torch.manual_seed(0)
    model = Glipv2Model(get_preset("small"))
    load_pretrained_language(model)
    model.config.preprocess = PreprocessConfig(min_size=96, max_size=128)
    model.config.postprocess.pre_nms_thresh = 0.0
    model.config.postprocess.detections_per_img = 5
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model() -> Glipv2Model:
    """`tiny_serving_model()`, one per test module."""
    return tiny_serving_model()


def _postgres_bin() -> Path | None:
    """Where `initdb` and `pg_ctl` are: on PATH, or Debian's versioned folder (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda path: int(Path(path).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Callable[[], str]]:
    """A throwaway PostgreSQL server for this test run (Debian's `postgresql` package, which
    `.ci/run` installs): initdb into a temporary folder, listening on a Unix socket there only.
    Yields a function that creates an empty database and returns its URL.

    PostgreSQL refuses to run as root: as root the server runs as the `postgres` user.
    Durability is off (fsync, synchronous commit): nothing here outlives the run.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server here (initdb): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[postgres]'")
    import psycopg

    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="glipv2-pg-"))  # /tmp: reachable by another user
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = (f"-p {port} -k {root} -c listen_addresses='' -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off")
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                    str(root / "server.log"), "-o", options, "-w", "start"],
                   check=True, capture_output=True)
    base = f"postgresql://postgres@/{{}}?host={root}&port={port}"

    def new_database() -> str:
        name = f"glipv2_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(base.format("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return base.format(name)

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
