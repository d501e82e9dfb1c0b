"""Tuned prompts: the registry file format and its checks, tuning the offset with the model
frozen, and `prompt_id` in the service (the offset reaches the fusion engine)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from engines.runtimes.torch_eager import TorchRuntime
from model_export.checkpoints.tuned_prompts import (
    PromptRegistryError,
    TunedPrompt,
    load_tuned_prompts,
    save_tuned_prompt,
)
from model_export.checkpoints.weights import save_model
from model_export.modeling.config import get_preset
from model_export.modeling.model import Glipv2Model
from model_export.processing.prompt import build_detection_prompt, load_tokenizer
from model_export.training.prompt_tuning import TuningConfig, tune_prompt
from service.app import create_app
from service.settings import ServiceSettings

WORLD_PNG = Path(__file__).parent / "fixtures" / "world" / "000000.png"
WIDTH = get_preset("small").language.hidden_size


def _tokens(classes: list[str]) -> int:
    return len(load_tokenizer()(build_detection_prompt(classes).caption)["input_ids"])


def _prompt(name: str, classes: list[str], scale: float = 0.0, seed: int = 0) -> TunedPrompt:
    generator = torch.Generator().manual_seed(seed)
    offset = scale * torch.randn(_tokens(classes), WIDTH, generator=generator)
    return TunedPrompt(name, classes, offset, "test")


def test_registry_round_trip(tmp_path: Path) -> None:
    saved = _prompt("two-shapes", ["circle", "square"], scale=1.0)
    save_tuned_prompt(saved, tmp_path)
    loaded = load_tuned_prompts(tmp_path, WIDTH, 256)
    assert list(loaded) == ["two-shapes"]
    prompt = loaded["two-shapes"]
    assert prompt.classes == ["circle", "square"] and prompt.description == "test"
    assert prompt.caption == "circle. square"
    torch.testing.assert_close(prompt.offset, saved.offset)


@pytest.mark.parametrize(("case", "message"), [
    ("width", "offset is (4, 32), the prompt needs (5, 384)"),
    ("tokens", "offset is (7, 384), the prompt needs (5, 384)"),
    ("format", "format is 'other', expected 'glipv2-tuned-prompt'"),
    ("garbage", "not a tuned prompt"),
    ("too-long", "tokens, more than the model's limit of 3"),
])
def test_registry_refuses_prompts_the_model_cannot_use(tmp_path: Path, case: str,
                                                       message: str) -> None:
    path = tmp_path / "bad.safetensors"
    metadata = {"format": "glipv2-tuned-prompt", "classes": '["circle", "square"]'}
    offset = torch.zeros(5, WIDTH)
    if case == "width":
        offset = torch.zeros(4, 32)
    elif case == "tokens":
        offset = torch.zeros(7, WIDTH)
    elif case == "format":
        metadata["format"] = "other"
    if case == "garbage":
        path.write_bytes(b"not safetensors at all")
    else:
        save_file({"offset": offset}, str(path), metadata=metadata)
    with pytest.raises(PromptRegistryError, match=r"bad\.safetensors") as error:
        load_tuned_prompts(tmp_path, WIDTH, 3 if case == "too-long" else 256)
    assert message in str(error.value)


def test_registry_names_and_folder_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must match"):
        save_tuned_prompt(_prompt("../escape", ["circle"]), tmp_path)
    with pytest.raises(PromptRegistryError, match="does not exist"):
        load_tuned_prompts(tmp_path / "missing", WIDTH, 256)


# --- tuning -----------------------------------------------------------------------------------


def test_tuning_learns_the_offset_and_leaves_the_model_alone(
        tiny_model: Glipv2Model, tmp_path: Path) -> None:
    save_model(tiny_model, tmp_path / "model", external_language=True)
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    config = TuningConfig(steps=8, batch_size=1, lr=0.05, min_size=96, scenes=1)
    prompt, losses = tune_prompt(tmp_path / "model", "circles", ["circle", "square"], config,
                                 progress=False)
    # one scene, over and over: the detection loss must fall, through the offset alone
    assert losses[-1] < 0.9 * losses[0], losses
    assert prompt.offset.shape == (_tokens(["circle", "square"]), WIDTH)
    assert prompt.offset.abs().max() > 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="has no \\['person'\\]"):
        tune_prompt(tmp_path / "model", "people", ["person"], config, progress=False)


# --- serving ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_model: Glipv2Model, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("prompts")
    save_tuned_prompt(_prompt("plain", ["circle", "square"]), folder)  # zero offset
    save_tuned_prompt(_prompt("tuned", ["circle", "square"], scale=2.0), folder)
    settings = ServiceSettings(model_name="tiny", api_keys=[], prompts_dir=folder)
    with TestClient(create_app(settings, TorchRuntime(tiny_model))) as test_client:
        yield test_client


def _detect(client: TestClient, **query: object) -> list[dict]:
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    response = client.post("/v1/detect", json={"image": image, "threshold": 0.0, **query})
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def test_models_lists_the_registered_prompts(client: TestClient) -> None:
    model = client.get("/v1/models").json()["models"][0]
    assert model["prompt_ids"] == ["plain", "tuned"]


def test_prompt_id_detects_with_its_classes_and_its_offset(client: TestClient) -> None:
    by_classes = _detect(client, classes=["circle", "square"])
    assert by_classes and {d["label"] for d in by_classes} <= {"circle", "square"}
    # a zero offset is the plain prompt: the same answer
    assert _detect(client, prompt_id="plain") == by_classes
    # a non-zero offset reaches the fusion engine: the scores change
    tuned = _detect(client, prompt_id="tuned")
    assert {d["label"] for d in tuned} <= {"circle", "square"}
    assert [d["score"] for d in tuned] != [d["score"] for d in by_classes]
    # the text cache holds plain features: the classes request is unchanged afterwards
    assert _detect(client, classes=["circle", "square"]) == by_classes


def test_unknown_prompt_id_names_the_registered_ones(client: TestClient) -> None:
    image = base64.b64encode(WORLD_PNG.read_bytes()).decode()
    response = client.post("/v1/detect", json={"image": image, "prompt_id": "lvis"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    message = response.json()["error"]["message"]
    assert "unknown prompt_id 'lvis'" in message and "plain, tuned" in message
