"""Untrusted image bytes -> a PIL RGB image, or a `ServiceError` saying what was wrong.

Order matters for safety: sizes are checked before work that scales with them. Base64 text is
measured before decoding; the format is sniffed from magic bytes (the client's content type is
ignored) and only PNG, JPEG and WebP reach Pillow, with only that format's plugin; the pixel count
is read from the header by `Image.open` (lazy) and checked before `load()` decodes anything, so a
decompression bomb is refused at the cost of parsing a header. Pillow's own bomb check
(`Image.MAX_IMAGE_PIXELS`) stays on as a second line: `configure_pillow` aligns it with ours.

Decoding is CPU work: callers run `decode_image_bytes` off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from service.errors import BadImageError, PayloadTooLargeError, UnsupportedMediaTypeError

SUPPORTED = ("PNG", "JPEG", "WEBP")

# Formats clients commonly send that we refuse, for a message that names what was received.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def configure_pillow(max_image_pixels: int) -> None:
    """Set Pillow's process-wide bomb limit to ours.

    Pillow warns above `MAX_IMAGE_PIXELS` and raises `DecompressionBombError` above twice that;
    our explicit header check refuses anything above `max_image_pixels` first, so this only
    matters for code paths that open images without that check.
    """
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    # Between 1x and 2x the limit Pillow only warns; our check refuses those images right after
    # with a clear message, so the warning is noise (one per call site, from worker threads).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str:
    """Pillow's format name from magic bytes: PNG, JPEG or WEBP; 415 for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            raise UnsupportedMediaTypeError(
                f"unsupported image type {name}; send PNG, JPEG or WebP")
    raise UnsupportedMediaTypeError(
        "image bytes are not a PNG, JPEG or WebP file (unrecognised format)")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 (optionally a `data:image/...;base64,` URL, whitespace allowed) -> bytes."""
    text = _DATA_URL.sub("", text, count=1)
    if any(c in text for c in " \n\r\t"):  # line-wrapped base64 (MIME) is common
        text = "".join(text.split())
    # 4 base64 characters carry 3 bytes: refuse before allocating the decoded copy.
    if len(text) // 4 * 3 > max_bytes:
        raise PayloadTooLargeError(
            f"image is about {len(text) // 4 * 3} bytes, more than the limit of {max_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImageError(f"image is not valid base64: {exc}") from None


def decode_image_bytes(data: bytes, max_image_pixels: int, max_bytes: int) -> Image.Image:
    """Encoded image bytes -> a fully decoded RGB image (EXIF orientation is not applied: boxes
    refer to the stored pixel grid, as in the reference pipeline).

    Raises `PayloadTooLargeError` (413: bytes or pixels over the limits),
    `UnsupportedMediaTypeError` (415) or `BadImageError` (400: empty, corrupt, truncated).
    """
    if not data:
        raise BadImageError("image is empty")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"image is {len(data)} bytes, more than the limit of {max_bytes}")
    fmt = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        # Pillow's own header check (over twice MAX_IMAGE_PIXELS, which `configure_pillow` sets
        # to our limit); its message would quote the doubled limit, so say ours instead.
        raise PayloadTooLargeError(
            f"image is more than the limit of {max_image_pixels} pixels (refused from its "
            "header, before decoding)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"cannot read the {fmt} image: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadImageError(f"image has an empty size ({width}x{height})")
        pixels = width * height
        if pixels > max_image_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height} = {pixels} pixels, more than the limit of "
                f"{max_image_pixels} pixels (refused from its header, before decoding)")
        try:
            image.load()
            rgb = image.convert("RGB")
        except Image.DecompressionBombError:
            raise PayloadTooLargeError(
                f"image is more than the limit of {max_image_pixels} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise BadImageError(f"the {fmt} image is corrupt or truncated: {exc}") from None
    return rgb


def decode_image_source(source: bytes | str, max_image_pixels: int, max_bytes: int
                        ) -> Image.Image:
    """An image as a request carries it -> RGB: base64 text (a JSON body, a job's or a table's
    `image`) or the encoded bytes (an upload, a file), `max_bytes` bounding either."""
    data = decode_base64(source, max_bytes) if isinstance(source, str) else source
    return decode_image_bytes(data, max_image_pixels, max_bytes)
