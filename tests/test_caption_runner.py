"""The caption model as the decoder drives it, on a tiny random model: images of different
shapes decode in one step batch exactly as each alone, and the KV cache gathers beams."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from engines.runtimes.torch_eager import TorchRuntime
from model_export.data.world import render_index
from model_export.modeling.model import Glipv2Model
from service.batching import BatcherConfig
from service.caption_runner import CaptionRunner, CaptionWork, KVCache
from service.engine_client import Engine, EngineClient
from service.model_runner import ModelRunner
from service.pipeline.caption_search import CaptionSearch
from service.pipeline.model_input import prepare_image

SEARCH = CaptionSearch(max_tokens=8, beams=2)


@pytest.fixture(scope="module")
def runners(tiny_model: Glipv2Model) -> tuple[ModelRunner, CaptionRunner]:
    model = ModelRunner(TorchRuntime(tiny_model))
    return model, CaptionRunner(model.runtime, model.tokenizer, model.tokenizer_lock,
                                model.caption_grammar, model.vision_names)


def _work(model: ModelRunner, image: Image.Image) -> CaptionWork:
    prepared = prepare_image(image, model.config.preprocess)
    out = model.runtime.run("vision", {"images": prepared.pixels[None]})
    return CaptionWork([out[name] for name in model.vision_names], SEARCH)


def test_images_of_different_shapes_step_together_as_each_alone(
        runners: tuple[ModelRunner, CaptionRunner]) -> None:
    """Regions padded to the largest image and kept out of attention: one batch of a wide and a
    square image (different region counts) gives each the logits and cache it gets alone."""
    model, captions = runners
    wide = render_index(3, 0).image.resize((240, 120))
    square = render_index(3, 1).image.resize((200, 200))
    works = [_work(model, wide), _work(model, square)]
    regions = [captions.caption_images([w])[0].states["region_centres"].shape[1] for w in works]
    assert regions[0] != regions[1]
    images = [captions.caption_images([work])[0] for work in works]
    logits, caches = captions.caption_prefill(images)
    for i, image in enumerate(images):  # prefill: each alone equals the padded batch
        alone, _ = captions.caption_prefill([image])
        torch.testing.assert_close(logits[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    prefixes = [[[captions.cls_id, 1037], [captions.cls_id, 2417]]] * 2
    parts = [(image, prefix, cache.select([0, 0]))
             for image, prefix, cache in zip(images, prefixes, caches, strict=True)]
    together = captions.caption_step(parts)
    for part, (step_logits, cache) in zip(parts, together, strict=True):
        (alone_logits, alone_cache), = captions.caption_step([part])
        torch.testing.assert_close(step_logits, alone_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.keys, alone_cache.keys, atol=1e-5, rtol=1e-5)
        assert cache.length == 2


def test_cache_select_gathers_rows_in_order() -> None:
    keys = torch.arange(3 * 2 * 1 * 4 * 1, dtype=torch.float32).view(3, 2, 1, 4, 1)
    cache = KVCache(keys, -keys)
    chosen = cache.select([2, 0, 0])
    torch.testing.assert_close(chosen.keys, keys[[2, 0, 0]])
    torch.testing.assert_close(chosen.values, -keys[[2, 0, 0]])
    assert chosen.length == 4


def test_engine_client_serves_captions_through_the_decoder(tiny_model: Glipv2Model) -> None:
    """The caption engine is the iteration-level decoder, not a batcher of whole captions."""
    model = ModelRunner(TorchRuntime(tiny_model))
    client = EngineClient(model, [Engine.VISION, Engine.CAPTION],
                          batcher_config=BatcherConfig(), caption_max_rows=8)
    assert client.decoder is not None and Engine.CAPTION not in client.batchers
    assert client.decoder.config.max_rows == 8
