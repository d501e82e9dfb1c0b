"""`?render=png`: a task's answer drawn on its image — boxes, labels, masks, the answer text.

For people looking at what the model does (demos, debugging, the README picture); clients that
compute with the answers use the JSON. Drawing happens off the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel

from model_export.processing.rle import decode_mask
from service.schemas import CaptionResponse, DetectResponse, SegmentResponse, VqaResponse

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
MASK_ALPHA = 0.45
_FONT_PX = 14


def render_png(image: Image.Image, response: BaseModel, title: str | None = None) -> bytes:
    """The image with the response drawn on it, as PNG bytes (same size as the image, plus a
    caption band on top when there is text to show)."""
    canvas = image.convert("RGB")
    labelled: list[tuple[Sequence[float], str]] = []
    text = title
    if isinstance(response, DetectResponse):
        labelled = [(d.box, f"{d.label} {d.score:.2f}") for d in response.detections]
    elif isinstance(response, SegmentResponse):
        for result in response.results:
            for segment in result.segments:
                canvas = _overlay_mask(canvas, segment.mask.counts, segment.mask.size,
                                       PALETTE[len(labelled) % len(PALETTE)])
                labelled.append((segment.box, f"{result.expression} {segment.score:.2f}"))
    elif isinstance(response, VqaResponse):
        labelled = [(g.box, g.phrase) for g in response.grounding]
        labelled += [(a.box, f"answer: {response.answer}") for a in response.answer_grounding]
        answer = f"{response.answer} ({response.score:.2f})"
        text = f"{title} -> {answer}" if title else answer
    elif isinstance(response, CaptionResponse):
        labelled = [(p.box, p.phrase) for p in response.phrases]
        text = response.caption
    else:
        raise TypeError(f"cannot render {type(response).__name__}")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_FONT_PX)
    # Last drawn is on top: the response's first item (its best score) must not be covered by a
    # weaker guess on the same object.
    for index, (box, label) in reversed(list(enumerate(labelled))):
        color = PALETTE[index % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        lift = bottom - top + 4
        y_text = y0 - lift if y0 >= lift else y0
        draw.rectangle((x0, y_text, x0 + right - left + 4, y_text + lift), fill=color)
        draw.text((x0 + 2, y_text + 1), label, fill=(255, 255, 255), font=font)
    if text:
        canvas = _with_band(canvas, text, font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay_mask(canvas: Image.Image, counts: str, size: Sequence[int],
                  color: tuple[int, int, int]) -> Image.Image:
    mask = decode_mask({"size": size, "counts": counts})
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * np.asarray(color, np.float32)
    return Image.fromarray(pixels.round().astype(np.uint8))


def _with_band(canvas: Image.Image, text: str,
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """A white band above the image holding `text` (wrapped to the image's width)."""
    draw = ImageDraw.Draw(canvas)
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > canvas.width - 8:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    line_px = _FONT_PX + 4
    band = Image.new("RGB", (canvas.width, canvas.height + line_px * len(lines) + 6),
                     (255, 255, 255))
    band.paste(canvas, (0, line_px * len(lines) + 6))
    band_draw = ImageDraw.Draw(band)
    for row, line in enumerate(lines):
        band_draw.text((4, 3 + row * line_px), line, fill=(0, 0, 0), font=font)
    return band
