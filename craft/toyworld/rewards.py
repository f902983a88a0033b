"""Toy rewards computed from pixels: the stand-ins for HPSv2.1, PickScore, AES and a held-out one.

Each reward is a plain callable ``reward(images, prompts) -> np.ndarray`` (one float per image,
higher is better, roughly in [0, 1]). Images are PIL images or uint8 arrays (H, W, 3); prompts
are toy captions, and only their colour, shape and background are read (rewards score against
the *original* prompt). A prompt outside the toy grammar gives NaN: "not applicable", never 0.

All four rest on one measurement, ``analyse``: estimate the background colour from the border,
segment the object as the largest connected blob that stands out from it, and measure the
blob's colour, shape, size, position and edge width.

- fidelity (HPS-like): the object has the prompt's colour and shape.
- aesthetic (AES-like, prompt-free): the object is large, centred and sharp on a clean
  background, whatever the prompt said.
- selection (PickScore-like): a mix of prompt agreement and aesthetics.
- heldout (the ImageReward/MPS analogue, evaluation only): the background has the prompt's
  colour and the image holds one clean object.
- precision (a second held-out reward, evaluation only): the object's outline is the prompt's
  shape drawn exactly (intersection over union with the ideal shape fitted to its bounding box,
  and a round or square shape as wide as it is high) and its colour is the prompt's colour
  closely (a match 2.5 times as strict as fidelity's). The training rewards only check which
  shape the blob's fill ratio suggests and a loose colour match, so this is where a tuned model
  can look right to them and be drawn worse; it is far from its ceiling for every model, so a
  cost can show.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from .grammar import PALETTE, SHAPES, parse_caption

_PALETTE_ARR = np.array(list(PALETTE.values()), dtype=np.float32)
_COLOUR_SIGMA = 50.0  # RGB distance at which a colour match falls to exp(-1/2)
_STRICT_COLOUR_SIGMA = 20.0  # the same for toy_precision's strict colour match
_MIN_PEAK = 40.0  # an object must differ from the background by this much (RGB distance)
# Shape prototypes in (fill ratio of the bounding box, centroid height within the box).
_SHAPE_PROTO = {"circle": (0.785, 0.5), "square": (0.97, 0.5), "triangle": (0.52, 0.6)}
_SHAPE_SCALE = (0.09, 0.05)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the rewards know about an image; every field is a plain number."""

    present: float  # 1 if an object stands out from the background, else 0
    object_rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]
    radius: float  # half the larger side of the object's bounding box, pixels
    centre_offset: float  # distance of the object's centroid from the image centre, pixels
    centroid_dx: float  # signed centroid offset from the centre, pixels (x right, y down)
    centroid_dy: float
    fill: float  # object area / bounding-box area
    vertical_centroid: float  # centroid height inside the bounding box, 0 top .. 1 bottom
    edge_contrast: float  # steepest step across the object's edge / object contrast: ~0.6 sharp, <0.35 blurry
    background_std: float  # std of the background pixels, RGB units
    stray: float  # fraction of standing-out pixels outside the main object
    outline: tuple[float, ...] = (0.0, 0.0, 0.0)  # IoU with each of SHAPES fitted to the box


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.float32)


def analyse(image) -> Analysis:
    img = _as_array(image)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    d = np.linalg.norm(img - bg, axis=-1)
    peak = float(np.sort(d, axis=None)[-8:].mean())
    if peak < _MIN_PEAK:
        return Analysis(0.0, tuple(bg), tuple(bg), 0.0, float(np.hypot(h, w) / 2), 0.0, 0.0,
                        0.0, 0.5, 0.0, float(img.std(axis=(0, 1)).mean()), 0.0)
    above = d > 0.5 * peak
    labels, n = ndimage.label(above)
    sizes = ndimage.sum(above, labels, index=np.arange(1, n + 1))
    main = labels == (int(np.argmax(sizes)) + 1)
    area = float(main.sum())
    stray = float((above.sum() - area) / max(above.sum(), 1))

    core = main & (d > 0.75 * peak)
    obj = np.median(img[core if core.any() else main], axis=0)
    ys, xs = np.nonzero(main)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bw, bh = x1 - x0, y1 - y0
    fill = area / float(bw * bh)
    vcent = float((ys.mean() - y0 + 0.5) / bh)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    offset = float(np.hypot(cx - w / 2, cy - h / 2))

    # One-pixel steps across the boundary: an anti-aliased sharp edge jumps >= half the
    # contrast in one pixel, a Gaussian blur of 1.2-2 px at most a third of it.
    step = np.maximum(np.abs(np.diff(d, axis=0, append=d[-1:])),
                      np.abs(np.diff(d, axis=1, append=d[:, -1:])))
    step = np.maximum(step, np.maximum(np.abs(np.diff(d, axis=0, prepend=d[:1])),
                                       np.abs(np.diff(d, axis=1, prepend=d[:, :1]))))
    boundary = main & ~ndimage.binary_erosion(main)
    edge_contrast = float(np.percentile(step[boundary], 75) / peak) if boundary.any() else 0.0
    bg_pixels = img[~ndimage.binary_dilation(above, iterations=3)]
    bg_std = float(bg_pixels.std(axis=0).mean()) if len(bg_pixels) > 16 else 50.0
    return Analysis(1.0, tuple(obj), tuple(bg), max(bw, bh) / 2.0, offset, float(cx - w / 2),
                    float(cy - h / 2), fill, vcent,
                    edge_contrast, bg_std, stray, _outline_ious(main[y0:y1, x0:x1]))


def _outline_ious(blob: np.ndarray) -> tuple[float, ...]:
    """IoU of the blob (cropped to its bounding box) with each ideal shape drawn in that box as
    the renderer draws it (craft/toyworld/render.py): an inscribed circle, the full square, a
    triangle with its apex at the top centre. Circle and square are also scaled by the box's
    squared aspect ratio (min side / max side): a stretched blob is not a circle drawn well."""
    bh, bw = blob.shape
    ys, xs = np.mgrid[0:bh, 0:bw].astype(np.float32) + 0.5
    u, v = (xs - bw / 2) / (bw / 2), ys / bh  # u in [-1, 1] across, v in [0, 1] down
    ideal = {"circle": u ** 2 + ((ys - bh / 2) / (bh / 2)) ** 2 <= 1.0,
             "square": np.ones_like(blob, dtype=bool),
             "triangle": np.abs(u) <= v}
    aspect = min(bw, bh) / max(bw, bh)
    out = []
    for s in SHAPES:
        m = ideal[s]
        iou = float((blob & m).sum() / max((blob | m).sum(), 1))
        out.append(iou * aspect ** 2 if s in ("circle", "square") else iou)
    return tuple(out)


def colour_match(rgb, name: str, sigma: float = _COLOUR_SIGMA) -> float:
    dist = float(np.linalg.norm(np.asarray(rgb, dtype=np.float32) - np.array(PALETTE[name])))
    return float(np.exp(-0.5 * (dist / sigma) ** 2))


def shape_match(a: Analysis, name: str) -> float:
    """Probability of ``name`` under a soft nearest-prototype classifier of the blob's shape."""
    if not a.present:
        return 0.0
    logits = {}
    for s in SHAPES:
        f, v = _SHAPE_PROTO[s]
        logits[s] = -0.5 * (((a.fill - f) / _SHAPE_SCALE[0]) ** 2
                            + ((a.vertical_centroid - v) / _SHAPE_SCALE[1]) ** 2)
    m = max(logits.values())
    z = sum(np.exp(v - m) for v in logits.values())
    return float(np.exp(logits[name] - m) / z)


def size_score(a: Analysis) -> float:
    return float(np.clip((a.radius - 3.0) / (10.0 - 3.0), 0.0, 1.0)) * a.present


def centring_score(a: Analysis) -> float:
    return float(np.exp(-((a.centre_offset / 5.0) ** 2))) * a.present


def sharpness_score(a: Analysis) -> float:
    return float(np.clip((a.edge_contrast - 0.3) / (0.6 - 0.3), 0.0, 1.0)) * a.present


def clean_background_score(a: Analysis) -> float:
    return float(np.exp(-((a.background_std / 10.0) ** 2)))


def _components(a: Analysis, prompt: str) -> dict[str, float]:
    p = parse_caption(prompt)
    return {
        "colour": colour_match(a.object_rgb, p["colour"]) * a.present,
        "shape": shape_match(a, p["shape"]),
        "background": colour_match(a.background_rgb, p["background"]),
        "size": size_score(a),
        "centring": centring_score(a),
        "sharpness": sharpness_score(a),
        "clean": clean_background_score(a),
        "single": a.present * (1.0 - min(1.0, 4.0 * a.stray)),
        "outline": a.outline[SHAPES.index(p["shape"])] * a.present,
        "hue": colour_match(a.object_rgb, p["colour"], _STRICT_COLOUR_SIGMA) * a.present,
    }


def components(image, prompt: str) -> dict[str, float]:
    """The named sub-scores every toy reward mixes (useful for captions and debugging)."""
    return _components(analyse(image), prompt)


# Reward name -> weights over the components. Kept as data so the docs and the studio can show
# exactly what each reward measures.
MIXES: dict[str, dict[str, float]] = {
    "toy_fidelity": {"colour": 0.55, "shape": 0.45},
    "toy_selection": {"colour": 0.3, "shape": 0.15, "background": 0.15, "size": 0.2,
                      "sharpness": 0.2},
    "toy_aesthetic": {"size": 0.3, "centring": 0.3, "sharpness": 0.25, "clean": 0.15},
    "toy_heldout": {"background": 0.6, "single": 0.4},
    "toy_precision": {"outline": 0.5, "hue": 0.5},
}


@lru_cache(maxsize=4096)
def _parseable(prompt: str) -> bool:
    try:
        parse_caption(prompt)
        return True
    except ValueError:
        return False


def score_mix(mix: dict[str, float], images: Sequence, prompts: Sequence[str]) -> np.ndarray:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt "
                         "per image")
    out = np.full(len(images), np.nan, dtype=np.float64)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        if not _parseable(prompt):
            continue
        c = _components(analyse(img), prompt)
        out[i] = sum(w * c[k] for k, w in mix.items())
    return out


def _make(name: str):
    def reward(images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        return score_mix(MIXES[name], images, prompts)

    reward.__name__ = name
    reward.__doc__ = f"Toy reward {name}: " + ", ".join(
        f"{w:g}*{k}" for k, w in MIXES[name].items())
    return reward


toy_fidelity = _make("toy_fidelity")
toy_selection = _make("toy_selection")
toy_aesthetic = _make("toy_aesthetic")
toy_heldout = _make("toy_heldout")
toy_precision = _make("toy_precision")

TOY_REWARDS = {"toy_fidelity": toy_fidelity, "toy_selection": toy_selection,
               "toy_aesthetic": toy_aesthetic, "toy_heldout": toy_heldout,
               "toy_precision": toy_precision}
