"""The reward server's wire format, in one place for the server (craft/reward_server.py) and
its client (craft/rewards/remote.py).

JSON over HTTP, never pickle: a request is ``{"reward": NAME, "prompts": [...], "images":
[base64 PNG, ...]}``, a reply ``{"reward": NAME, "scores": [float | null, ...]}`` (null = NaN,
"not applicable"). PNG is lossless, so the server scores exactly the pixels the client has;
a float64 goes through JSON's shortest round-trip repr unchanged, so a served reward's scores
equal in-process scoring bit for bit.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

PROTOCOL = 1
MAX_IMAGES = 256  # per request (the client splits larger batches)
MAX_BODY_BYTES = 64 * 2 ** 20  # per request: 256 PNGs of 512 px fit easily
TOKEN_HEADER = "Authorization"  # "Bearer TOKEN"


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


def scores_to_json(values) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, float)]


def scores_from_json(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


__all__ = ["MAX_BODY_BYTES", "MAX_IMAGES", "PROTOCOL", "TOKEN_HEADER", "image_from_b64",
           "png_b64", "scores_from_json", "scores_to_json"]
