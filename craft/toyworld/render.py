"""Draw toy scenes as small RGB images.

Shapes are drawn at 4x and box-downsampled, so edges are anti-aliased like a real photo's and
"sharp" means one-pixel transitions; "blurry" applies a Gaussian blur of 1.2-2.0 px. The exact
radius, offset, blur, colour jitter and background texture come from ``scene.seed``, so a scene
renders to the same pixels every time.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .grammar import PALETTE, POSITIONS, Scene

IMAGE_SIZE = 32  # pixels, square
_SS = 4  # supersampling factor for anti-aliasing

# Radius ranges in pixels at IMAGE_SIZE=32 (the shape's circumscribed radius).
RADIUS = {"small": (3.0, 4.5), "medium": (6.0, 7.5), "large": (10.0, 12.0)}
BLUR_SIGMA = (1.2, 2.0)
COLOUR_JITTER = 12  # +/- per channel, uniform
TEXTURE_STD = 25.0  # noisy background: std of the low-frequency texture, per channel


def shape_geometry(scene: Scene, size: int = IMAGE_SIZE) -> tuple[float, float, float]:
    """Centre (x, y) and radius in pixels; shared by the renderer and the tests."""
    rng = np.random.default_rng(scene.seed)
    scale = size / IMAGE_SIZE
    lo, hi = RADIUS[scene.size]
    r = rng.uniform(lo, hi) * scale
    dx, dy = POSITIONS[scene.position]
    half = size / 2
    if scene.position == "in the center":
        dist, jx, jy = 0.0, rng.uniform(-1, 1) * scale, rng.uniform(-1, 1) * scale
    else:
        dist = min(half - r - 1.0 * scale, 10.0 * scale) * rng.uniform(0.85, 1.0)
        jx = jy = 0.0
    return half + dx * dist + jx, half + dy * dist + jy, r


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    j = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + j, 0, 255))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB PIL image."""
    cx, cy, r = shape_geometry(scene, size)
    rng = np.random.default_rng(scene.seed + 1)
    fg = _jitter(PALETTE[scene.colour], rng)
    bg = np.array(_jitter(PALETTE[scene.background], rng), dtype=np.float32)

    big = size * _SS
    canvas = np.broadcast_to(bg, (big, big, 3)).copy()
    if scene.texture == "noisy":
        coarse = rng.normal(0.0, TEXTURE_STD, size=(6, 6, 3)).astype(np.float32)
        tex = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
            (big, big), Image.BICUBIC)) for c in range(3)], axis=-1)
        canvas += tex
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img)
    X, Y, R = cx * _SS, cy * _SS, r * _SS
    if scene.shape == "circle":
        draw.ellipse([X - R, Y - R, X + R, Y + R], fill=fg)
    elif scene.shape == "square":
        h = R * 0.886  # same area as the circle of radius R
        draw.rectangle([X - h, Y - h, X + h, Y + h], fill=fg)
    elif scene.shape == "triangle":
        draw.polygon([(X, Y - R), (X - R * 0.95, Y + R * 0.8), (X + R * 0.95, Y + R * 0.8)],
                     fill=fg)
    img = img.resize((size, size), Image.BOX)
    if scene.sharpness == "blurry":
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*BLUR_SIGMA) * size
                                                  / IMAGE_SIZE))
    return img


def render_array(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """``render`` as a uint8 array of shape (size, size, 3)."""
    return np.asarray(render(scene, size), dtype=np.uint8)
