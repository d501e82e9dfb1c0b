"""Model files: strict round trip, and the packaged text encoder left out of small models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_export.checkpoints.weights import (
    WEIGHTS_FILE,
    load_model,
    load_pretrained_language,
    save_model,
)
from model_export.modeling.config import get_preset
from model_export.modeling.model import Glipv2Model


@pytest.fixture(scope="module")
def small_model() -> Glipv2Model:
    torch.manual_seed(0)
    model = Glipv2Model(get_preset("small"))
    load_pretrained_language(model)
    return model.eval()


def test_round_trip_with_packaged_language(small_model: Glipv2Model, tmp_path: Path) -> None:
    save_model(small_model, tmp_path, external_language=True)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert not any(k.startswith("language.bert.") for k in stored)
    loaded = load_model(tmp_path)
    for key, value in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_key_is_refused(small_model: Glipv2Model, tmp_path: Path) -> None:
    save_model(small_model, tmp_path, external_language=True)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    del stored["head.bias0"]
    save_file(stored, str(tmp_path / WEIGHTS_FILE),
              metadata={"format": "glipv2", "external_prefixes": '["language.bert."]'})
    with pytest.raises(ValueError, match=r"head\.bias0"):
        load_model(tmp_path)


def test_tied_lm_head_uses_word_embeddings(small_model: Glipv2Model) -> None:
    text = torch.randn(1, 3, small_model.config.language.hidden_size)
    logits = small_model.lm_logits(text)
    assert logits.shape == (1, 3, small_model.config.language.vocab_size)
    assert not any(k.startswith("mlm_head.decoder") for k in small_model.state_dict())
    head = small_model.mlm_head
    hidden = head.transform.LayerNorm(torch.nn.functional.gelu(head.transform.dense(text)))
    embeddings = small_model.language.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(logits, hidden @ embeddings.T + head.bias)
