"""The map of the pool: every candidate's image embedding (craft.embeddings) projected to 2-D,
drawn on a canvas, coloured by any reward, the composite or kept / not kept. Dragging a box
selects the candidates inside it (all of them, also those not drawn when the pool is larger
than :data:`MAX_POINTS`); the Curate grid then pages through the selection.
"""

from __future__ import annotations

from typing import Sequence

import gradio as gr
import numpy as np

MAX_POINTS = 20_000  # drawn at most (kept ones always); the selection covers every candidate
KEPT = "kept / not kept"
PALETTE = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")  # viridis, low to high

TEMPLATE = """
<div class="pm">
  <canvas class="pm-canvas"></canvas>
  <div class="pm-legend">${(value.legend || []).map(l =>
      `<span><i style="background:${l[1]}"></i>${l[0]}</span>`).join('')}</div>
  <div class="pm-note">${value.note || ''}</div>
</div>
"""

CSS = """
.pm { position: relative; }
.pm-canvas { width: 100%; height: 380px; border: 1px solid var(--border-color-primary);
             border-radius: 6px; cursor: crosshair; display: block; }
.pm-legend span { margin-right: 12px; font-size: 12px; }
.pm-legend i { display: inline-block; width: 10px; height: 10px; border-radius: 5px;
               margin-right: 4px; vertical-align: middle; }
.pm-note { font-size: 12px; color: #666; }
"""

SCRIPT = """
let box = null, start = null;
function canvas() { return element.querySelector('.pm-canvas'); }
function draw() {
  const cv = canvas();
  if (!cv) return;
  const w = cv.clientWidth, h = cv.clientHeight, dpr = window.devicePixelRatio || 1;
  cv.width = w * dpr; cv.height = h * dpr;
  const g = cv.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const v = props.value || {};
  const pts = v.points || [], colors = v.colors || [], sel = new Set(v.selected || []);
  for (const p of pts) {
    g.fillStyle = colors[p[2]] || '#999';
    g.globalAlpha = sel.size && !sel.has(p[3]) ? 0.25 : 0.85;
    g.fillRect(6 + p[0] * (w - 12) - 1.5, 6 + (1 - p[1]) * (h - 12) - 1.5, 3, 3);
  }
  g.globalAlpha = 1;
  if (box) {
    g.strokeStyle = '#2563eb'; g.lineWidth = 1.5;
    g.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
}
function pos(e) {
  const r = canvas().getBoundingClientRect();
  return [e.clientX - r.left, e.clientY - r.top];
}
element.addEventListener('mousedown', (e) => {
  if (!e.target.classList.contains('pm-canvas')) return;
  start = pos(e); box = [...start, ...start]; draw();
});
element.addEventListener('mousemove', (e) => {
  if (!start) return;
  const p = pos(e);
  box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]),
         Math.max(start[0], p[0]), Math.max(start[1], p[1])];
  draw();
});
window.addEventListener('mouseup', () => {
  if (!start) return;
  const cv = canvas(), w = cv.clientWidth, h = cv.clientHeight;
  const x = (px) => (px - 6) / (w - 12), y = (py) => 1 - (py - 6) / (h - 12);
  const b = box;
  start = null;
  if (b && (b[2] - b[0] > 3 || b[3] - b[1] > 3)) {
    trigger('map_box', {x0: x(b[0]), x1: x(b[2]), y0: y(b[3]), y1: y(b[1])});
  }
  box = null;
  draw();
});
watch('value', draw);
new ResizeObserver(draw).observe(element);
draw();
"""


class PoolMap(gr.HTML):
    """The canvas map (see the module docstring); event: map_box {x0, x1, y0, y1} in the map's
    0-1 coordinates."""

    def __init__(self, **kwargs):
        super().__init__(value={"points": [], "colors": [], "legend": [],
                                "note": "No map yet: press “Compute the map”."},
                         html_template=TEMPLATE, css_template=CSS, js_on_load=SCRIPT,
                         apply_default_css=False, **kwargs)


def unit_square(xy: np.ndarray) -> np.ndarray:
    """Map coordinates scaled into [0, 1] on each axis (what the canvas and boxes use)."""
    if len(xy) == 0:
        return xy
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return (xy - lo) / np.where(hi > lo, hi - lo, 1.0)


def map_value(frame, ids: np.ndarray, xy: np.ndarray, color_by: str,
              selected: Sequence[int] = (), seed: int = 0) -> dict:
    """The map's value: points (x, y, colour index, id) for at most MAX_POINTS candidates
    (every kept one, then a seeded sample), the palette and the legend."""
    f = frame.set_index("candidate_id")
    known = np.isin(ids, f.index.to_numpy())
    ids, xy = ids[known], xy[known]
    if len(ids) == 0:
        return {"points": [], "colors": [], "legend": [], "note": "The map has no candidates "
                                                                  "of this pool yet."}
    kept = f.loc[ids, "kept"].to_numpy(bool)
    if color_by == KEPT or color_by not in f:
        codes = kept.astype(int)
        colors, legend = ["#c7ccd6", "#1f8a4c"], [["not kept", "#c7ccd6"], ["kept", "#1f8a4c"]]
    else:
        v = f.loc[ids, color_by].to_numpy(float)
        fin = np.isfinite(v)
        qs = np.nanquantile(v[fin], np.linspace(0, 1, len(PALETTE) + 1)[1:-1]) if fin.any() \
            else []
        codes = np.where(fin, np.searchsorted(qs, v), len(PALETTE))
        colors = [*PALETTE, "#bbbbbb"]
        legend = [[f"{color_by}: low", PALETTE[0]], ["high", PALETTE[-1]]]
    show = np.flatnonzero(kept)
    rest = np.flatnonzero(~kept)
    room = max(0, MAX_POINTS - len(show))
    if len(rest) > room:
        rest = np.sort(np.random.default_rng(seed).choice(rest, room, replace=False))
    show = np.r_[show, rest]
    pts = [[round(float(xy[i, 0]), 4), round(float(xy[i, 1]), 4), int(codes[i]), int(ids[i])]
           for i in show]
    note = (f"{len(show):,} of {len(ids):,} candidates drawn (every kept one); a box selects "
            f"all inside it" if len(show) < len(ids) else
            f"{len(ids):,} candidates · drag a box to select them in the grid")
    return {"points": pts, "colors": colors, "legend": legend, "note": note,
            "selected": [int(i) for i in selected]}


def in_box(ids: np.ndarray, xy: np.ndarray, box: dict) -> list[int]:
    """Every candidate inside the box (0-1 map coordinates), whether drawn or not."""
    x0, x1 = sorted((float(box["x0"]), float(box["x1"])))
    y0, y1 = sorted((float(box["y0"]), float(box["y1"])))
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    return [int(i) for i in ids[inside]]


__all__ = ["KEPT", "MAX_POINTS", "PoolMap", "in_box", "map_value", "unit_square"]
