"""Ray Serve mode against a real local Ray cluster: 2 ingress + 2 engine replicas on the tiny
random model, next to the single-process server on the same model folder.

One Ray for the whole run (conftest's `ray_cluster`) with logical resources, 8 CPUs and 2 GPUs,
so the engine replicas' `num_gpus: 0.5` is placed as on a GPU node. Checked: the task answers
equal the single-process server's (every number), errors keep the JSON contract, the metrics
reach Ray's export under the service's names, a request's stages stay with its image features,
a killed engine replica under load costs clients at most 1 % of requests (all JSON) and is
replaced within 60 s, and a lost one is a JSON 503 or 504, never a hang. The Serve config, the
KubeRay manifest and the Prometheus relabelling are parse-checked (no cluster to deploy to).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.weights import save_model
from service.app import create_app
from service.settings import ServiceSettings

from conftest import free_port, start_server, tiny_serving_model

ray = pytest.importorskip("ray", reason="Ray Serve mode needs the `ray` extra: "
                                         "pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError  # noqa: E402 - after the skip above
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from service.distributed.app import (  # noqa: E402
    APP_NAME,
    ENGINE,
    IMPORT_PATH,
    INGRESS,
    application,
    read_config,
)
from service.distributed.engine import HEALTH_TEXT, Glipv2Engine  # noqa: E402
from service.distributed.messages import EngineInfo  # noqa: E402
from service.distributed.remote import CALL_GRACE_S, RemoteEngineClient  # noqa: E402
from service.distributed.serve_env import SERVE_ENV  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORLD = sorted((Path(__file__).parent / "fixtures" / "world").glob("*.png"))
CLASSES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
ENGINE_GPUS = 0.5
READY_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny_serving_model(), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def settings(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every replica's settings; one compute thread, as the single-process server's, so both
    sum floats in the same order."""
    return {"model_dir": str(model_dir), "model_name": "tiny", "caption_max_tokens": 4,
            "api_keys": [], "threads": 1, "jobs_dir": str(tmp_path_factory.mktemp("ray-jobs"))}


@pytest.fixture(scope="module")
def ray_url(ray_cluster: int, settings: dict[str, Any]) -> Iterator[str]:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(settings, {
        INGRESS: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
        ENGINE: {"num_replicas": 2, "health_check_period_s": 2.0,
                 "ray_actor_options": {"num_cpus": 1, "num_gpus": ENGINE_GPUS}},
    }), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    try:
        yield url
    finally:
        serve.shutdown()  # Serve's controller and proxies too: the rest of the run is idle Ray


@pytest.fixture(scope="module")
def local_url(model_dir: Path) -> Iterator[str]:
    """The single-process server on the same model folder and settings."""
    process, url = start_server(
        ["--model", str(model_dir), "--threads", "1"],
        {"GLIPV2_MODEL_NAME": "tiny", "GLIPV2_CAPTION_MAX_TOKENS": "4"}, READY_TIMEOUT_S)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(60)


def wait_ready(url: str) -> None:
    """Until every ingress replica answers /readyz 200 (each connects to the engines itself)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    ready_in_a_row = 0
    while ready_in_a_row < 8:  # requests spread over both replicas
        assert time.monotonic() < deadline, "the Ray Serve app did not become ready"
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            ready = False
        ready_in_a_row = ready_in_a_row + 1 if ready else 0
        time.sleep(0.1 if ready else 0.5)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def task_requests() -> list[tuple[str, dict[str, Any]]]:
    requests: list[tuple[str, dict[str, Any]]] = []
    for path in WORLD[:2]:
        image = b64(path)
        requests += [
            ("/v1/detect", {"image": image, "classes": CLASSES}),
            ("/v1/detect", {"image": image, "prompt": "a red circle. the blue square",
                            "threshold": 0.0}),
            ("/v1/detect", {"image": image, "classes": CLASSES, "chunk_size": 2}),
            ("/v1/segment", {"image": image, "expressions": ["the red circle", "a star"],
                             "threshold": 0.0}),
            ("/v1/vqa", {"image": image, "question": "what color is the circle?"}),
            ("/v1/caption", {"image": image}),
        ]
    return requests


# --- the same answers ---------------------------------------------------------------------


def test_answers_equal_the_single_process_server(ray_url: str, local_url: str) -> None:
    with httpx.Client(timeout=120) as client:
        for path, body in task_requests():
            remote = client.post(f"{ray_url}{path}", json=body)
            local = client.post(f"{local_url}{path}", json=body)
            assert remote.status_code == local.status_code == 200, (path, remote.text)
            assert remote.json() == local.json(), path
        models = [client.get(f"{url}/v1/models").json() for url in (ray_url, local_url)]
        assert models[0] == models[1]


def test_errors_keep_the_json_contract(ray_url: str, local_url: str) -> None:
    image = b64(WORLD[0])
    cases = [("/v1/detect", {"image": "not base64!", "classes": ["a"]}),
             ("/v1/detect", {"image": image, "classes": []}),
             ("/v1/detect", {"image": image, "prompt": " . . "}),
             ("/v1/vqa", {"image": image, "question": "word " * 300})]
    with httpx.Client(timeout=60) as client:
        for index, (path, body) in enumerate(cases):
            # The same request id for both, so the bodies match whole; Serve's proxy puts the
            # header on the response (the app adds none there): still exactly one.
            headers = {"X-Request-ID": f"contract-{index}"}
            remote = client.post(f"{ray_url}{path}", json=body, headers=headers)
            local = client.post(f"{local_url}{path}", json=body, headers=headers)
            assert remote.status_code == local.status_code >= 400
            assert remote.json() == local.json()
            assert remote.json()["error"]["request_id"] == f"contract-{index}"
            for response in (remote, local):
                assert response.headers.get_list("x-request-id") == [f"contract-{index}"]


# --- placement, health, metrics -----------------------------------------------------------


def test_engine_replicas_hold_half_a_gpu_each(ray_url: str) -> None:
    status = serve.status().applications[APP_NAME]
    assert status.deployments[ENGINE].replica_states.get("RUNNING") == 2
    assert status.deployments[INGRESS].replica_states.get("RUNNING") == 2
    # 2 engine replicas x 0.5 of the 2 logical GPUs; the ingress replicas hold none.
    assert ray.available_resources().get("GPU") == pytest.approx(2 - 2 * ENGINE_GPUS)


def test_http_reaches_the_ingress_replicas_through_haproxy(ray_url: str) -> None:
    """`SERVE_ENV` is in effect: the HTTP port is HAProxy's (no Serve proxy actor hop), and
    what it balances onto are the ingress replicas' own HTTP servers."""
    haproxy = [pid for pid in os.listdir("/proc") if pid.isdigit()
               and b"haproxy" in _cmdline(pid).split(b"\0", 1)[0]]
    assert haproxy, "no HAProxy process: Serve runs its Python proxy instead"
    listening = f"bind {ray_url.removeprefix('http://')}\n".encode()
    assert any(listening in _haproxy_config(pid) for pid in haproxy)
    assert httpx.get(f"{ray_url}/v1/models", timeout=10).status_code == 200


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _haproxy_config(pid: str) -> bytes:
    """The configuration file HAProxy was started with (`-f PATH`)."""
    arguments = _cmdline(pid).split(b"\0")
    path = arguments[arguments.index(b"-f") + 1] if b"-f" in arguments else b""
    return Path(path.decode()).read_bytes() if path else b""


def test_metrics_reach_ray_under_the_service_names(ray_url: str, ray_cluster: int) -> None:
    with httpx.Client(timeout=60) as client:
        client.post(f"{ray_url}/v1/detect", json={"image": b64(WORLD[0]), "classes": CLASSES})
        wanted = {f"ray_glipv2_{name}" for name in (
            "requests_total", "request_duration_seconds_bucket", "engine_batch_size_bucket",
            "engine_queue_wait_seconds_bucket", "engine_compute_seconds_bucket",
            "text_cache_lookups_total", "model_ready")}
        deadline = time.monotonic() + 60  # Ray exports every few seconds
        while True:
            text = client.get(f"http://127.0.0.1:{ray_cluster}/metrics").text
            names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                     if line.startswith("ray_glipv2_")}
            if wanted <= names or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert wanted <= names, wanted - names
    assert 'engine="vision"' in text and 'endpoint="/v1/detect"' in text


def engine_batches(metrics_url: str) -> dict[tuple[str, str], float]:
    """(worker, engine) -> batches run by `vision` and `fusion`, from Ray's export (not
    `language`, which the health checks keep running)."""
    counts: dict[tuple[str, str], float] = {}
    text = httpx.get(metrics_url, timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name != "ray_glipv2_engine_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels["engine"] in ("vision",
                                                                               "fusion"):
                key = (sample.labels["WorkerId"], sample.labels["engine"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def settled_engine_batches(metrics_url: str) -> dict[tuple[str, str], float]:
    """`engine_batches` once Ray's export has caught up (two reads 2.5 s apart agree)."""
    deadline = time.monotonic() + 60
    counts = engine_batches(metrics_url)
    while True:
        time.sleep(2.5)
        latest = engine_batches(metrics_url)
        if latest == counts or time.monotonic() > deadline:
            return latest
        counts = latest


def test_a_requests_stages_run_where_its_image_features_are(ray_url: str,
                                                           ray_cluster: int) -> None:
    """Sequential detections (a batch each): every engine replica ran as many fusion batches
    as vision batches, so no request's fusion ran away from its features."""
    metrics_url = f"http://127.0.0.1:{ray_cluster}/metrics"
    requests = 12
    with httpx.Client(timeout=60) as client:
        before = settled_engine_batches(metrics_url)
        for index in range(requests):
            body = {"image": b64(WORLD[index % len(WORLD)]), "classes": CLASSES}
            assert client.post(f"{ray_url}/v1/detect", json=body).status_code == 200
    after = settled_engine_batches(metrics_url)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    vision = {w: n for (w, e), n in delta.items() if e == "vision" and n}
    fusion = {w: n for (w, e), n in delta.items() if e == "fusion" and n}
    assert sum(vision.values()) == requests
    assert fusion == vision


# --- a dead engine replica ----------------------------------------------------------------


def engine_replicas() -> set[str]:
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#")}


def running_engine_replicas() -> int:
    state = serve.status().applications[APP_NAME].deployments[ENGINE].replica_states
    return int(state.get("RUNNING", 0))


async def run_load(url: str, clients: int, stop: asyncio.Event) -> list[httpx.Response]:
    bodies = [("/v1/detect", {"image": b64(path), "classes": CLASSES}) for path in WORLD]
    bodies.append(("/v1/vqa", {"image": b64(WORLD[0]), "question": "how many stars?"}))
    responses: list[httpx.Response] = []

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        index = offset
        while not stop.is_set():
            path, body = bodies[index % len(bodies)]
            responses.append(await client.post(path, json=body))
            index += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return responses


def test_killed_engine_replica_costs_at_most_one_percent(ray_url: str) -> None:
    async def scenario() -> tuple[list[httpx.Response], float]:
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(ray_url, 4, stop))
        await asyncio.sleep(4)
        before = engine_replicas()
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        while not (running_engine_replicas() == 2 and victim not in engine_replicas()
                   and len(engine_replicas()) == 2):
            assert time.monotonic() - killed_at < 60, "the engine replica was not replaced"
            await asyncio.sleep(0.5)
        back_after_s = time.monotonic() - killed_at
        await asyncio.sleep(3)  # load on the new replica too
        stop.set()
        return await load, back_after_s

    responses, back_after_s = asyncio.run(scenario())
    failed = [r for r in responses if r.status_code != 200]
    assert back_after_s <= 60
    assert len(responses) >= 50, "too little load to judge"
    assert len(failed) <= 0.01 * len(responses), [(r.status_code, r.text) for r in failed]
    for response in failed:  # what a client sees is the service's error body, retryable
        body = response.json()
        assert set(body) == {"error"} and body["error"]["code"]
        if response.status_code == 503:
            assert response.headers["Retry-After"]


class FakeEngineHandle:
    """A `DeploymentHandle` stand-in: `describe` answers the tiny model; every stage call
    fails with `error`, or (None) never answers."""

    def __init__(self, info: EngineInfo, error: BaseException | None) -> None:
        self.info = info
        self.error = error
        self.calls: list[str] = []

    def __getattr__(self, method: str) -> SimpleNamespace:
        def remote(*args: object) -> FakeResponse:
            self.calls.append(method)
            if method == "describe":
                return FakeResponse(self.info, None)
            return FakeResponse(None, self.error)

        return SimpleNamespace(remote=remote)


class FakeResponse:
    def __init__(self, value: object, error: BaseException | None) -> None:
        self.value, self.error, self.cancelled = value, error, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Generator[Any, None, object]:
        if self.value is not None:
            return self.value
        if self.error is not None:
            raise self.error
        yield from asyncio.sleep(3600).__await__()  # a replica on a lost node
        return None


@pytest.mark.parametrize(("error", "status", "code"), [
    (ActorDiedError(), 503, "unavailable"),
    (None, 504, "deadline_exceeded"),
])
def test_a_lost_engine_replica_is_a_json_error_never_a_hang(
        model_dir: Path, error: BaseException | None, status: int, code: str) -> None:
    runtime = TorchRuntime.from_dir(model_dir)
    handle = FakeEngineHandle(EngineInfo(runtime.name, runtime.config, runtime.graphs), error)
    settings = ServiceSettings(model_name="tiny", api_keys=[], request_timeout_ms=1500)
    engines = RemoteEngineClient(handle, text_cache_bytes=0,  # type: ignore[arg-type]
                                 request_timeout_ms=settings.request_timeout_ms)
    with TestClient(create_app(settings, remote=engines)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        response = client.post("/v1/detect", json={"image": b64(WORLD[0]), "classes": CLASSES})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if status == 503:
        assert response.headers["Retry-After"] == "1"
        # The request was run once more first (each run stops at its first engine call).
        assert [call for call in handle.calls if call != "describe"] == ["language"] * 2
    else:
        assert time.monotonic() - started < 1.5 + CALL_GRACE_S + 2


# --- the deployment files -----------------------------------------------------------------



def test_a_stalled_engine_fails_the_replicas_health_check() -> None:
    """Any engine's stalled batch fails `check_health` (Serve then replaces the replica), even
    while the language batcher that the tiny forward goes through still answers; a check that
    passes re-states `glipv2_model_ready`."""
    submitted: list[object] = []

    class Request:
        async def submit(self, engine: object, payload: object, **_: object) -> None:
            submitted.append(payload)

    stalled: dict[str, float] = {}
    # The method on a stand-in replica: a real one needs a Serve replica context to start.
    ready: list[float] = []
    replica = cast(Glipv2Engine, SimpleNamespace(
        engines=SimpleNamespace(stalled=lambda: stalled, resume=lambda *_: Request()),
        metrics=SimpleNamespace(model_ready=SimpleNamespace(set=ready.append))))
    asyncio.run(Glipv2Engine.check_health(replica))
    assert submitted == [HEALTH_TEXT] and ready == [1]
    stalled["vision"] = 42.0
    with pytest.raises(RuntimeError, match=r"stalled: vision .* for 42 s"):
        asyncio.run(Glipv2Engine.check_health(replica))
    assert submitted == [HEALTH_TEXT] and ready == [1]



def test_a_replica_stopped_while_loading_shuts_down_cleanly() -> None:
    """Serve calls the destructor of a replica whose constructor has not returned (the model
    still loading) too: it has no engines to drain, and says nothing went wrong."""
    stopped: list[bool] = []

    async def stop(drain: bool) -> None:
        stopped.append(drain)

    asyncio.run(Glipv2Engine.__del__(cast(Glipv2Engine, SimpleNamespace())))
    asyncio.run(Glipv2Engine.__del__(cast(Glipv2Engine, SimpleNamespace(
        engines=SimpleNamespace(stop=stop)))))
    assert stopped == [True]


def test_serve_config_parses_as_serve_reads_it() -> None:
    config = read_config(REPO / "docker" / "ray" / "serve.yaml")
    assert set(config.deployments) == {INGRESS, ENGINE}
    engine = config.deployments[ENGINE]
    autoscaling = engine["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["target_ongoing_requests"] > 0
    assert {"num_cpus", "num_gpus"} <= set(engine["ray_actor_options"])


def test_rayservice_manifest_embeds_a_valid_serve_config() -> None:
    manifest = yaml.safe_load((REPO / "docker" / "ray" / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert {d["name"] for d in serve_config["applications"][0]["deployments"]} == {INGRESS,
                                                                                  ENGINE}
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    gpu_group = next(g for g in cluster["workerGroupSpecs"]
                     if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]
                     .get("limits", {}))
    assert gpu_group["minReplicas"] <= gpu_group["maxReplicas"]
    # Serve's request path set up on every pod, as `glipv2 serve --ray` sets it up locally.
    pods = [head] + [group["template"]["spec"]["containers"][0]
                     for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert {e["name"]: e["value"] for e in pod["env"]} == SERVE_ENV, pod["name"]


def test_prometheus_config_gives_the_service_its_names_back() -> None:
    config = yaml.safe_load((REPO / "docker" / "ray" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (rule,) = job["metric_relabel_configs"]
    assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    # Prometheus anchors the regex and expands $1 as Python's \1.
    rename = re.compile(f"^(?:{rule['regex']})$")
    replacement = rule["replacement"].replace("$1", r"\1")
    assert rename.sub(replacement, "ray_glipv2_requests_total") == "glipv2_requests_total"
    assert rename.match("ray_serve_num_http_requests_total") is None  # Ray's own keep theirs


def test_serve_ray_refuses_a_bad_config_before_starting_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["serve", "--ray", "--ray-config", str(tmp_path / "missing.yaml")]) == 2
    assert "invalid Serve config" in capsys.readouterr().err
    config = yaml.safe_load((REPO / "docker" / "ray" / "serve.yaml").read_text())
    config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert main(["serve", "--ray", "--ray-config", str(bad)]) == 2
    assert "max_replicas" in capsys.readouterr().err
    assert main(["serve", "--ray", "--threads", "-1"]) == 2
    assert "invalid serve settings" in capsys.readouterr().err
