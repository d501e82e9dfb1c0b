"""Request ids and the access log (issue 37), against the tiny random small-preset model.

Every response carries `X-Request-ID` (the client's when valid, else a new one), every error body
carries the same id, and every request writes one JSON line to the access log with its route
template, status, latency, the sizes of the engine batches it rode in and, on errors, the code.
The access log is read as the service writes it: `configure_logging` puts it on stdout, which
`capsys` captures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engines.runtimes.torch_eager import TorchRuntime
from model_export.modeling.model import Glipv2Model
from service.access_log import ACCESS_LOGGER, SERVICE_LOGGERS, configure_logging
from service.app import create_app
from service.settings import ServiceSettings

from conftest import GatedRuntime, until, with_app

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
CLASSES = ["circle", "square", "triangle"]
GENERATED = re.compile(r"[0-9a-f]{32}")
ACCESS_FIELDS = {"ts", "level", "logger", "message", "request_id", "method", "route", "path",
                 "status", "latency_ms"}


def make_settings(**overrides: Any) -> ServiceSettings:
    """Defaults for tests, independent of GLIPV2_* variables of the environment."""
    values: dict[str, Any] = {"model_name": "tiny", "caption_max_tokens": 4, "api_keys": []}
    return ServiceSettings(**(values | overrides))


@pytest.fixture(scope="module")
def runtime(tiny_model: Glipv2Model) -> TorchRuntime:
    return TorchRuntime(tiny_model)


@pytest.fixture(scope="module")
def client(runtime: TorchRuntime) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(), runtime)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def png_b64() -> str:
    return base64.b64encode(WORLD_PNG.read_bytes()).decode()


@pytest.fixture
def logs() -> Iterator[None]:
    """The loggers `configure_logging` touches, put back as they were after the test."""
    loggers = [logging.getLogger(name) for name in (*SERVICE_LOGGERS, ACCESS_LOGGER)]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for lg, level, handlers, propagate in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def access_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The access-log lines written to stdout since the last read; each must be JSON."""
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def assert_error_with_id(response: httpx.Response, status: int, code: str,
                         request_id: str | None = None) -> str:
    """The error body's id is the header's (and the client's, when given); returns it."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}, error
    assert error["code"] == code, error
    header = response.headers["x-request-id"]
    assert error["request_id"] == header
    if request_id is not None:
        assert header == request_id
    assert len(response.headers.get_list("x-request-id")) == 1
    return header


# --- the header ---------------------------------------------------------------------------------


def test_a_valid_client_id_is_echoed(client: TestClient) -> None:
    for sent in ("abc-123", "trace 7/2 :: retry=1", "x" * 128):
        response = client.get("/healthz", headers={"X-Request-ID": sent})
        assert response.status_code == 200
        assert response.headers.get_list("x-request-id") == [sent]


def test_an_id_is_generated_when_none_is_sent(client: TestClient) -> None:
    first = client.get("/healthz").headers["x-request-id"]
    second = client.get("/v1/models").headers["x-request-id"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second)
    assert first != second


@pytest.mark.parametrize("sent", [b"", b"   ", b"x" * 129, b"caf\xc3\xa9", b"tab\there",
                                  b"\x7f"])
def test_an_invalid_client_id_is_replaced(client: TestClient, sent: bytes) -> None:
    response = client.get("/healthz", headers=[(b"X-Request-ID", sent)])
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"]), response.headers


def test_behind_a_proxy_that_returns_the_id_the_app_adds_no_header(
        runtime: TorchRuntime, png_b64: str) -> None:
    """Ray Serve's proxy forwards its X-Request-ID to the ingress app and appends it to the
    response itself: the app (`proxy_request_id=True`) uses the id and adds no second header."""
    app = create_app(make_settings(), runtime, proxy_request_id=True)
    with TestClient(app) as behind:
        ok = behind.get("/healthz", headers={"X-Request-ID": "serve-1"})
        assert ok.status_code == 200 and "x-request-id" not in ok.headers
        error = behind.post("/v1/detect", json={"image": png_b64, "classes": []},
                            headers={"X-Request-ID": "serve-2"})
        assert error.status_code == 422 and "x-request-id" not in error.headers
        assert error.json()["error"]["request_id"] == "serve-2"


# --- error bodies -------------------------------------------------------------------------------


def test_error_bodies_carry_the_requests_id(client: TestClient, png_b64: str) -> None:
    body = {"image": png_b64, "classes": []}
    assert_error_with_id(client.post("/v1/detect", json=body, headers={"X-Request-ID": "r-422"}),
                         422, "invalid_request", "r-422")
    generated = assert_error_with_id(client.post("/v1/detect", json=body), 422,
                                     "invalid_request")
    assert GENERATED.fullmatch(generated)
    assert_error_with_id(client.get("/v1/jobs/no-such-job", headers={"X-Request-ID": "r-404"}),
                         404, "not_found", "r-404")
    assert_error_with_id(client.get("/nothing-here", headers={"X-Request-ID": "r-404b"}),
                         404, "not_found", "r-404b")
    assert_error_with_id(client.get("/v1/detect", headers={"X-Request-ID": "r-405"}),
                         405, "method_not_allowed", "r-405")
    assert_error_with_id(client.post("/v1/detect", content=b"{not json",
                                     headers={"content-type": "application/json"}),
                         400, "invalid_json")


def test_413_of_the_body_limit_carries_the_id(runtime: TorchRuntime) -> None:
    """Both 413s of `BodySizeLimitMiddleware`: the declared Content-Length (answered by the
    middleware itself) and a chunked body counted while it streams."""
    big = json.dumps({"image": "A" * 60_000, "classes": ["a"]}).encode()
    with TestClient(create_app(make_settings(max_body_bytes=50_000), runtime)) as small:
        assert_error_with_id(small.post("/v1/detect", content=big,
                                        headers={"content-type": "application/json",
                                                 "X-Request-ID": "r-413"}),
                             413, "payload_too_large", "r-413")
        assert_error_with_id(small.post("/v1/detect", content=iter([big]),
                                        headers={"content-type": "application/json",
                                                 "X-Request-ID": "r-413-chunked"}),
                             413, "payload_too_large", "r-413-chunked")


def test_401_with_an_api_key_configured_carries_the_id(runtime: TorchRuntime) -> None:
    with TestClient(create_app(make_settings(api_keys=["s3cret"]), runtime)) as keyed:
        response = keyed.get("/v1/models", headers={"X-Request-ID": "r-401"})
        assert_error_with_id(response, 401, "unauthorized", "r-401")
        assert response.headers["www-authenticate"] == "Bearer"
        ok = keyed.get("/v1/models", headers={"X-API-Key": "s3cret", "X-Request-ID": "r-200"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "r-200"


def test_an_unhandled_error_is_a_500_with_the_id(runtime: TorchRuntime, logs: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The catch-all 500 is sent by Starlette's outermost middleware, past ours: the handler
    itself puts the id in the header, and the access line still says 500 internal_error."""
    app = create_app(make_settings(), runtime)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    configure_logging("info")
    with TestClient(app, raise_server_exceptions=False) as test_client:
        capsys.readouterr()
        response = test_client.get("/boom", headers={"X-Request-ID": "r-500"})
        assert_error_with_id(response, 500, "internal_error", "r-500")
        (line,) = access_lines(capsys)
    assert (line["request_id"], line["status"], line["error_code"]) == (
        "r-500", 500, "internal_error")





def test_429_queue_full_carries_the_id_and_rode_in_no_batch(
        tiny_model: Glipv2Model, png_b64: str, logs: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    gated = GatedRuntime(tiny_model)
    app = create_app(make_settings(batcher={"max_batch_size": 1, "max_queue_size": 1,
                                            "max_queue_delay_ms": 0}), gated)
    body = {"image": png_b64, "classes": ["circle"]}
    configure_logging("info")

    async def scenario(http: httpx.AsyncClient) -> None:
        first = asyncio.create_task(http.post("/v1/detect", json=body))
        await until(gated.entered.is_set)
        second = asyncio.create_task(http.post("/v1/detect", json=body))
        batcher = app.state.service.serving.engines.batchers["vision"]
        await until(lambda: batcher.queue_depth == 1)
        rejected = await http.post("/v1/detect", json=body, headers={"X-Request-ID": "r-429"})
        assert_error_with_id(rejected, 429, "queue_full", "r-429")
        gated.gate.set()
        assert (await first).status_code == 200 and (await second).status_code == 200

    asyncio.run(with_app(app, scenario))
    lines = {line["request_id"]: line for line in access_lines(capsys)}
    assert lines["r-429"]["error_code"] == "queue_full"
    assert "engine_batches" not in lines["r-429"]  # refused before any batch
    served = [line for line in lines.values() if line["status"] == 200]
    assert len(served) == 2 and all(line["engine_batches"]["vision"] == [1] for line in served)


# --- the access log -----------------------------------------------------------------------------


def test_one_json_line_per_request_with_its_fields(client: TestClient, png_b64: str,
                                                   logs: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    capsys.readouterr()
    detect = client.post("/v1/detect", json={"image": png_b64, "classes": CLASSES},
                         headers={"X-Request-ID": "a-detect"})
    assert detect.status_code == 200
    client.post("/v1/detect", json={"image": png_b64, "classes": []},
                headers={"X-Request-ID": "a-422"})
    client.get("/v1/jobs/j-1", headers={"X-Request-ID": "a-job"})
    client.get("/healthz?verbose=1", headers={"X-Request-ID": "a-health"})
    client.get("/nothing/here", headers={"X-Request-ID": "a-404"})
    lines = access_lines(capsys)
    assert [line["request_id"] for line in lines] == ["a-detect", "a-422", "a-job", "a-health",
                                                      "a-404"]
    for line in lines:
        assert set(line) >= ACCESS_FIELDS, line
        assert (line["level"], line["logger"]) == ("info", ACCESS_LOGGER)
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    by_id = {line["request_id"]: line for line in lines}

    ok = by_id["a-detect"]
    assert (ok["method"], ok["route"], ok["path"], ok["status"]) == (
        "POST", "/v1/detect", "/v1/detect", 200)
    assert ok["message"] == "POST /v1/detect 200"
    assert "error_code" not in ok
    batches = ok["engine_batches"]
    assert batches["vision"] == [1]  # one image, alone in its batch
    assert batches["fusion"] and all(isinstance(n, int) and n >= 1 for n in batches["fusion"])
    assert set(batches) <= {"vision", "language", "fusion"}

    assert (by_id["a-422"]["status"], by_id["a-422"]["error_code"]) == (422, "invalid_request")
    assert "engine_batches" not in by_id["a-422"]
    job = by_id["a-job"]
    assert (job["route"], job["path"], job["status"], job["error_code"]) == (
        "/v1/jobs/{job_id}", "/v1/jobs/j-1", 404, "not_found")
    assert (by_id["a-health"]["route"], by_id["a-health"]["path"]) == ("/healthz", "/healthz")
    assert "error_code" not in by_id["a-health"]
    unmatched = by_id["a-404"]
    assert (unmatched["route"], unmatched["status"], unmatched["error_code"]) == (
        None, 404, "not_found")


def test_batch_sizes_are_those_of_the_batches_the_request_rode_in(
        runtime: TorchRuntime, png_b64: str, logs: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two requests with different prompts, a batch of 2 that waits (up to 5 s) to fill: both
    ride the same vision batch, and each line says 2, not its own item count."""
    app = create_app(make_settings(batcher={"max_batch_size": 2, "max_queue_delay_ms": 5000}),
                     runtime)
    configure_logging("info")

    async def scenario(http: httpx.AsyncClient) -> None:
        responses = await asyncio.gather(*(
            http.post("/v1/detect", json={"image": png_b64, "classes": classes},
                      headers={"X-Request-ID": f"b-{i}"})
            for i, classes in enumerate([["circle"], ["square", "star"]])))
        assert [r.status_code for r in responses] == [200, 200]

    asyncio.run(with_app(app, scenario))
    lines = {line["request_id"]: line for line in access_lines(capsys)}
    assert set(lines) == {"b-0", "b-1"}
    for line in lines.values():
        assert line["engine_batches"]["vision"] == [2], line
        assert line["engine_batches"]["fusion"] == [2], line  # their rows batched too


def test_a_batch_holding_several_items_of_a_request_is_listed_once(
        client: TestClient, png_b64: str, logs: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two expressions: two language items and two fusion rows, each pair in one batch of 2
    (submitted together): listed as [2], not once per item."""
    configure_logging("info")
    capsys.readouterr()
    response = client.post("/v1/segment", json={
        "image": png_b64, "expressions": ["a lone green hexagon", "the tiny purple star"]})
    assert response.status_code == 200, response.text
    (line,) = access_lines(capsys)
    assert line["engine_batches"] == {"vision": [1], "language": [2], "fusion": [2]}, line


def test_job_work_is_not_counted_on_the_request_that_submitted_it(
        client: TestClient, png_b64: str, logs: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    submitted = client.post("/v1/jobs", json={"task": "detect", "params": {"classes": CLASSES},
                                              "inputs": [{"image": png_b64}]},
                            headers={"X-Request-ID": "j-submit"})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (line,) = [line for line in access_lines(capsys) if line["request_id"] == "j-submit"]
    assert (line["route"], line["status"]) == ("/v1/jobs", 202)
    assert "engine_batches" not in line


# --- settings -----------------------------------------------------------------------------------


def test_log_level_setting_silences_the_access_log(client: TestClient, logs: None,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIPV2_LOG_LEVEL", "WARNING")
    settings = ServiceSettings()
    assert settings.log_level == "warning" and settings.access_log
    configure_logging(settings.log_level)
    capsys.readouterr()
    client.get("/healthz")
    client.get("/nothing-here")
    assert access_lines(capsys) == []
    assert logging.getLogger("service").level == logging.WARNING
    configure_logging("debug")  # reconfiguring replaces the handler: still one line each
    client.get("/healthz")
    assert len(access_lines(capsys)) == 1
    with pytest.raises(ValueError, match="log_level"):
        ServiceSettings(log_level="verbose")


def test_access_log_off_keeps_the_ids(runtime: TorchRuntime, logs: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    with TestClient(create_app(make_settings(access_log=False), runtime)) as quiet:
        capsys.readouterr()
        response = quiet.get("/healthz", headers={"X-Request-ID": "q-1"})
        assert response.headers["x-request-id"] == "q-1"
        assert access_lines(capsys) == []


def test_serve_flag_sets_the_log_level_and_turns_uvicorns_access_log_off(
        tmp_path: Path, logs: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`glipv2 serve --log-level` overrides GLIPV2_LOG_LEVEL; uvicorn gets the same level and
    no access-log handler of its own (the server is not started: `run_server` is replaced)."""
    import service.http_server
    from cli.main import main

    (tmp_path / "config.json").write_text("{}")
    seen: list[tuple[ServiceSettings, str, dict[str, Any]]] = []

    def run_server(app: FastAPI, settings: ServiceSettings, *, log_level: str,
                   log_config: dict[str, Any]) -> int:
        seen.append((settings, log_level, log_config))
        return 0

    monkeypatch.setattr(service.http_server, "run_server", run_server)
    monkeypatch.setenv("GLIPV2_LOG_LEVEL", "error")
    assert main(["serve", "--model", str(tmp_path), "--log-level", "debug"]) == 0
    assert main(["serve", "--model", str(tmp_path)]) == 0
    (flagged, level, log_config), (from_env, env_level, _) = seen
    assert (flagged.log_level, level) == ("debug", "debug")
    assert (from_env.log_level, env_level) == ("error", "error")
    assert log_config["loggers"]["uvicorn.access"]["handlers"] == []
    assert logging.getLogger(ACCESS_LOGGER).level == logging.ERROR  # the last configured


# --- the contract -------------------------------------------------------------------------------


def test_openapi_documents_the_header_and_the_error_field(runtime: TorchRuntime) -> None:
    schema = create_app(make_settings(), runtime).openapi()
    assert "X-Request-ID" in schema["components"]["headers"]
    responses = [response for path_item in schema["paths"].values()
                 for operation in path_item.values()
                 for response in operation["responses"].values()]
    assert len(responses) > 20
    assert all(response["headers"]["X-Request-ID"] == {
        "$ref": "#/components/headers/X-Request-ID"} for response in responses)
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert "request_id" in detail["required"] and "request_id" in detail["properties"]
