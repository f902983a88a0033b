"""The reward server's wire format, in one place for the server (craft/rewards/server.py) and
its client (craft/rewards/remote.py).

JSON over HTTP, never pickle: a request is ``{"reward": NAME, "prompts": [...], "images":
[IMAGE, ...]}``, a reply ``{"reward": NAME, "scores": [float | null, ...]}`` (null = NaN,
"not applicable"). An IMAGE is a base64 PNG string (encoding "png": smaller on a network) or
``{"raw": base64 of the uint8 RGB pixels row by row, "height": H, "width": W}`` (encoding
"raw": ~20x cheaper to encode than PNG at 512 px on a CPU, ~1.3x the bytes; for a server on
the same machine or a fast link; benchmarks/rewards.md). Both are lossless, so the server
scores exactly the pixels the client has; a float64 goes through JSON's shortest round-trip
repr unchanged, so a served reward's scores equal in-process scoring bit for bit (when a reward
batch travels in one request: a batch split over requests is scored as smaller batches, equal
up to float rounding).
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from craft.run.choices import IMAGE_ENCODINGS

PROTOCOL = 1
MAX_IMAGES = 256  # per request (the client splits larger batches)
MAX_BODY_BYTES = 64 * 2 ** 20  # per request: 256 PNGs of 512 px fit easily, ~60 raw ones
TOKEN_HEADER = "Authorization"  # "Bearer TOKEN"
ENCODINGS = IMAGE_ENCODINGS  # how the client sends images; the server reads both
MAX_SIDE = 8192  # pixels, either side of a raw image


def png_b64(image) -> str:
    """One image (PIL, or a uint8 (H, W, 3) array) as base64 PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    # fast compression: still lossless, and bytes on a network are cheaper than CPU time
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def encode_image(image, encoding: str = "png"):
    """One image (PIL, or a uint8 (H, W, 3) array) in the wire's ``encoding``."""
    if encoding == "png":
        return png_b64(image)
    if encoding != "raw":
        raise ValueError(f"encoding={encoding!r} is not one of {ENCODINGS}")
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image, dtype=np.uint8)
        image = array if array.ndim == 3 and array.shape[2] == 3 else Image.fromarray(array)
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image)
                                             else image, dtype=np.uint8))
    return {"raw": base64.b64encode(pixels.tobytes()).decode("ascii"),
            "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}


def encoded_size(item) -> int:
    """Characters an encoded image adds to a request (for splitting requests under the
    size limit)."""
    return len(item) if isinstance(item, str) else len(item["raw"]) + 40


def decode_image(item):
    """An encoded image back as a PIL RGB image; ValueError saying what is wrong."""
    if isinstance(item, str):
        return image_from_b64(item)
    if not isinstance(item, dict) or not isinstance(item.get("raw"), str):
        raise ValueError(f"an image must be a base64 PNG string or {{raw, height, width}}, "
                         f"not {type(item).__name__}")
    h, w = item.get("height"), item.get("width")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE
               for v in (h, w)):
        raise ValueError(f"a raw image needs whole-number height and width in 1..{MAX_SIDE}, "
                         f"got {h!r} x {w!r}")
    data = base64.b64decode(item["raw"], validate=True)
    if len(data) != h * w * 3:
        raise ValueError(f"a raw image of {h} x {w} RGB needs {h * w * 3} bytes, got "
                         f"{len(data)}")
    from PIL import Image

    return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy(), "RGB")


def scores_to_json(values) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, float)]


def scores_from_json(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


__all__ = ["ENCODINGS", "MAX_BODY_BYTES", "MAX_IMAGES", "MAX_SIDE", "PROTOCOL", "TOKEN_HEADER",
           "decode_image", "encode_image", "encoded_size", "image_from_b64", "png_b64",
           "scores_from_json", "scores_to_json"]
