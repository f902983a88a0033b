"""The map of the pool: every candidate's image embedding (craft.stages.embeddings) projected to 2-D
(its first two principal components: the axes say so), drawn on a canvas, coloured by any
reward, the composite or kept / not kept (the legend gives each colour's values); hovering a
point shows its image. Dragging a box
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
  <div class="pm-tip" hidden></div>
  <div class="pm-legend">${value.legend_title ? `<b>${value.legend_title}</b>` : ''}${
      (value.legend || []).map(l =>
      `<span class="pm-key"><i style="background:${l[1]}"></i>${l[0]}</span>`).join('')}</div>
  <div class="pm-note">${value.note || ''}</div>
</div>
"""

CSS = """
.pm { position: relative; }
.pm-canvas { width: 100%; height: 400px; border: 1px solid var(--border-color-primary);
             border-radius: 6px; cursor: crosshair; display: block; }
.pm-legend { margin-top: 4px; font-size: 12px; }
.pm-legend b { margin-right: 10px; }
.pm-key { margin-right: 14px; white-space: nowrap; }
.pm-key i { display: inline-block; width: 11px; height: 11px; border-radius: 6px;
            margin-right: 4px; vertical-align: middle; }
.pm-note { font-size: 12px; color: #666; }
.pm-tip { position: absolute; pointer-events: none; background: #fff; padding: 4px;
          border: 1px solid #999; border-radius: 4px; font-size: 11px; z-index: 5;
          box-shadow: 0 2px 6px #0003; }
.pm-tip img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
"""

# The plot area inside the canvas: room for the axes' names below and on the left.
SCRIPT = """
let box = null, start = null;
const L = 34, B = 26, T = 6, R = 6;
function canvas() { return element.querySelector('.pm-canvas'); }
function area() { const cv = canvas(); return [cv.clientWidth - L - R, cv.clientHeight - T - B]; }
function px(p) { const [w, h] = area(); return [L + p[0] * w, T + (1 - p[1]) * h]; }
function draw() {
  const cv = canvas();
  if (!cv) return;
  const W = cv.clientWidth, H = cv.clientHeight, dpr = window.devicePixelRatio || 1;
  cv.width = W * dpr; cv.height = H * dpr;
  const g = cv.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, W, H);
  const v = props.value || {};
  const [w, h] = area();
  g.strokeStyle = '#888'; g.lineWidth = 1;  // axes
  g.beginPath(); g.moveTo(L, T); g.lineTo(L, T + h); g.lineTo(L + w, T + h); g.stroke();
  g.fillStyle = '#555'; g.font = '11px sans-serif';
  const ax = v.axes || ['', ''];
  g.fillText(ax[0], L + w / 2 - 40, H - 8);
  g.save(); g.translate(12, T + h / 2 + 40); g.rotate(-Math.PI / 2); g.fillText(ax[1], 0, 0);
  g.restore();
  const pts = v.points || [], colors = v.colors || [], sel = new Set(v.selected || []);
  for (const p of pts) {
    const [x, y] = px(p);
    g.fillStyle = colors[p[2]] || '#999';
    g.globalAlpha = sel.size && !sel.has(p[3]) ? 0.2 : 0.9;
    g.beginPath(); g.arc(x, y, 2.6, 0, 2 * Math.PI); g.fill();
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
function hover(e) {
  const tip = element.querySelector('.pm-tip'), v = props.value || {};
  const [mx, my] = pos(e);
  let best = null, d2 = 49;
  (v.points || []).forEach((p, i) => {
    const [x, y] = px(p), d = (x - mx) ** 2 + (y - my) ** 2;
    if (d < d2) { d2 = d; best = i; }
  });
  if (best === null) { tip.hidden = true; return; }
  const p = v.points[best], src = (v.thumbs || [])[best];
  tip.innerHTML = (src ? `<img src="${src}">` : '') + `#${p[3]}` +
                  (v.labels ? ` · ${v.labels[best]}` : '');
  tip.style.left = (mx + 12) + 'px'; tip.style.top = (my + 12) + 'px';
  tip.hidden = false;
}
element.addEventListener('mousedown', (e) => {
  if (!e.target.classList.contains('pm-canvas')) return;
  start = pos(e); box = [...start, ...start]; draw();
});
element.addEventListener('mousemove', (e) => {
  if (!start) { if (e.target.classList.contains('pm-canvas')) hover(e); return; }
  const p = pos(e);
  box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]),
         Math.max(start[0], p[0]), Math.max(start[1], p[1])];
  draw();
});
element.addEventListener('mouseleave', () => { element.querySelector('.pm-tip').hidden = true; });
window.addEventListener('mouseup', () => {
  if (!start) return;
  const [w, h] = area();
  const x = (q) => (q - L) / w, y = (q) => 1 - (q - T) / h;
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

HOVER_MAX = 5_000  # points whose thumbnails the map carries (hover shows the image)
AXES = ["principal component 1 of the image embeddings →", "component 2 →"]


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
        colors = ["#8d99ae", "#1f8a4c"]
        legend, title = [["not kept", colors[0]], ["kept", colors[1]]], "colour:"
    else:
        v = f.loc[ids, color_by].to_numpy(float)
        fin = np.isfinite(v)
        qs = np.nanquantile(v[fin], np.linspace(0, 1, len(PALETTE) + 1)[1:-1]) if fin.any() \
            else np.array([])
        codes = np.where(fin, np.searchsorted(qs, v), len(PALETTE))
        colors = [*PALETTE, "#bbbbbb"]
        edges = [float(np.nanmin(v)) if fin.any() else 0.0, *map(float, qs),
                 float(np.nanmax(v)) if fin.any() else 0.0]
        legend = [[f"{edges[k]:.3g} – {edges[k + 1]:.3g}", PALETTE[k]]
                  for k in range(len(PALETTE)) if k + 1 < len(edges)]
        if not fin.all():
            legend.append(["no score", "#bbbbbb"])
        title = f"{color_by} (fifths of the pool):"
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
    out = {"points": pts, "colors": colors, "legend": legend, "legend_title": title,
           "note": note, "axes": AXES, "selected": [int(i) for i in selected]}
    if len(show) <= HOVER_MAX and "image_path" in f:
        from studio.grid import FILE_ROUTE

        paths = f.loc[ids[show], "image_path"].astype(str).to_numpy()
        out["thumbs"] = [FILE_ROUTE + p for p in paths]
        out["labels"] = ["kept" if kept[i] else "not kept" for i in show]
    return out


def in_box(ids: np.ndarray, xy: np.ndarray, box: dict) -> list[int]:
    """Every candidate inside the box (0-1 map coordinates), whether drawn or not."""
    x0, x1 = sorted((float(box["x0"]), float(box["x1"])))
    y0, y1 = sorted((float(box["y0"]), float(box["y1"])))
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    return [int(i) for i in ids[inside]]


__all__ = ["KEPT", "MAX_POINTS", "PoolMap", "in_box", "map_value", "unit_square"]
