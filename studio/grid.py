"""The candidate grid of the Curate tab: thumbnails with badges, the full caption on hover, an
enlarged view that does not change anything, and keyboard keys; a ``gr.HTML`` component with its
own template and script (Gradio's Gallery toggled an override on every click and cut captions).

Keys, once the grid has focus (click an image): arrows move the selection, ``k`` keeps (includes)
the selected image, ``x`` excludes it, ``a`` puts it back to automatic, ``u`` undoes the last
override, ``z`` / Enter / Space enlarges it (Esc closes), ``n`` / ``p`` (PageDown / PageUp) turn
the page. Each sends an event to the server (``grid_pick``, ``grid_keep``, ``grid_exclude``,
``grid_auto``, ``grid_undo``, ``grid_page``) with the candidate id; enlarging stays in the
browser.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import gradio as gr

FILE_ROUTE = "/gradio_api/file="  # how the server serves a file under its allowed paths

TEMPLATE = """
<div class="tg" role="grid" aria-label="candidates">
${(value && value.items && value.items.length) ? value.items.map((it, i) => `
  <figure class="tg-item${it.id === value.selected ? ' sel' : ''}" data-id="${it.id}"
          data-i="${i}" title="${it.title}">
    <img src="${it.src}" alt="candidate ${it.id}" draggable="false">
    <div class="tg-badges">${it.badges.map(b =>
        `<span class="tg-b tg-${b[0]}">${b[1]}</span>`).join('')}</div>
    <button class="tg-zoom" data-zoom="${i}" title="enlarge (z)" tabindex="-1">⤢</button>
    <figcaption>${it.short}</figcaption>
  </figure>`).join('') : `<div class="tg-empty">${(value && value.empty) || 'No images.'}</div>`}
</div>
"""

CSS = """
.tg { display: grid; grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 6px;
      outline: none; }
.tg-item { position: relative; margin: 0; border: 2px solid transparent; border-radius: 6px;
           padding: 2px; cursor: pointer; background: var(--block-background-fill); }
.tg-item.sel { border-color: #2563eb; box-shadow: 0 0 0 2px #93b4f5; }
.tg-item img { width: 100%; aspect-ratio: 1; image-rendering: pixelated; display: block;
               border-radius: 4px; }
.tg-item figcaption { font-size: 11px; line-height: 1.2; white-space: nowrap; overflow: hidden;
                      text-overflow: ellipsis; padding-top: 2px; }
.tg-badges { position: absolute; top: 4px; left: 4px; right: 22px; display: flex;
             flex-wrap: wrap; gap: 2px; pointer-events: none; }
.tg-b { font-size: 10px; line-height: 1.3; padding: 0 4px; border-radius: 3px; color: #fff;
        background: #555c; white-space: nowrap; }
.tg-kept { background: #1f8a4ccc; } .tg-excluded { background: #c0392bdd; }
.tg-included { background: #2563ebdd; } .tg-reference { background: #8a6d00dd; }
.tg-fails { background: #6b7280cc; } .tg-capped { background: #7c3aedcc; }
.tg-entered { background: #0e9f6edd; } .tg-left { background: #b45309dd; }
.tg-zoom { position: absolute; top: 3px; right: 3px; font-size: 12px; line-height: 1;
           padding: 2px 4px; border: none; border-radius: 3px; background: #fffc; cursor: zoom-in; }
.tg-empty { grid-column: 1 / -1; padding: 24px; color: #888; }  /* the whole row, not one cell */
"""

# The lightbox lives on document.body (the template is re-rendered on every update, which
# would close it); keys are listened for on the component's own element, which stays.
SCRIPT = """
const root = element;
root.tabIndex = 0;
let selected = (props.value && props.value.selected) || null;
let box = document.getElementById('tg-lightbox');
if (!box) {
  box = document.createElement('div');
  box.id = 'tg-lightbox';
  box.hidden = true;
  box.innerHTML = '<figure><img alt="enlarged candidate"><pre></pre>' +
                  '<small>click, Esc or z to close</small></figure>';
  box.addEventListener('click', () => { box.hidden = true; });
  document.body.appendChild(box);
}
const list = () => (props.value && props.value.items) || [];
function mark(id) {
  selected = id;
  root.querySelectorAll('.tg-item').forEach(el =>
    el.classList.toggle('sel', Number(el.dataset.id) === id));
}
function pick(id) { mark(id); trigger('grid_pick', {id: id}); }
function zoom(i) {
  const it = list()[i];
  if (!it) return;
  box.querySelector('img').src = it.src;
  const t = document.createElement('textarea');
  t.innerHTML = it.title;
  box.querySelector('pre').textContent = t.value;
  box.hidden = false;
}
root.addEventListener('click', (e) => {
  const z = e.target.closest('.tg-zoom');
  const it = e.target.closest('.tg-item');
  if (it) { pick(Number(it.dataset.id)); root.focus(); }
  if (z) { zoom(Number(z.dataset.zoom)); }
});
root.addEventListener('dblclick', (e) => {
  const it = e.target.closest('.tg-item');
  if (it) zoom(Number(it.dataset.i));
});
root.addEventListener('keydown', (e) => {
  const items = list();
  if (!items.length) return;
  let i = items.findIndex(x => x.id === selected);
  const first = root.querySelector('.tg-item');
  const cols = first ? Math.max(1, Math.round(root.querySelector('.tg').clientWidth /
                                              (first.offsetWidth + 6))) : 1;
  const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols}[e.key];
  if (step !== undefined) {
    e.preventDefault();
    i = i < 0 ? 0 : Math.min(items.length - 1, Math.max(0, i + step));
    pick(items[i].id);
    const el = root.querySelector(`.tg-item[data-id="${items[i].id}"]`);
    if (el) el.scrollIntoView({block: 'nearest'});
    return;
  }
  if (e.key === 'Escape') { box.hidden = true; return; }
  if (e.key === 'z' || e.key === 'Enter' || e.key === ' ') {
    e.preventDefault();
    if (!box.hidden) { box.hidden = true; } else if (i >= 0) { zoom(i); }
    return;
  }
  if (e.key === 'u') { e.preventDefault(); trigger('grid_undo', {}); return; }
  if (e.key === 'n' || e.key === 'PageDown') { e.preventDefault(); trigger('grid_page', {delta: 1}); return; }
  if (e.key === 'p' || e.key === 'PageUp') { e.preventDefault(); trigger('grid_page', {delta: -1}); return; }
  if (selected === null) return;
  if (e.key === 'k') { e.preventDefault(); trigger('grid_keep', {id: selected}); }
  else if (e.key === 'x') { e.preventDefault(); trigger('grid_exclude', {id: selected}); }
  else if (e.key === 'a') { e.preventDefault(); trigger('grid_auto', {id: selected}); }
});
watch('value', () => { selected = (props.value && props.value.selected) || null; });
"""

LIGHTBOX_CSS = """
#tg-lightbox { position: fixed; inset: 0; z-index: 1000; background: #000b; display: flex;
               align-items: center; justify-content: center; cursor: zoom-out; }
#tg-lightbox[hidden] { display: none; }
#tg-lightbox figure { margin: 0; background: #fff; padding: 12px; border-radius: 8px;
                      max-width: 90vw; }
#tg-lightbox img { width: min(512px, 80vh); aspect-ratio: 1; image-rendering: pixelated;
                   display: block; }
#tg-lightbox pre { white-space: pre-wrap; font-size: 12px; max-width: 512px; }
"""


def item_value(items: Sequence[dict], selected: int | None = None, empty: str = "") -> dict:
    """The grid's value from :func:`studio.tabs.curate_views.grid_items` rows: paths become the
    server's file URLs, every text is escaped (prompts are user text)."""
    esc = lambda t: html.escape(str(t), quote=True)  # noqa: E731
    return {"items": [{"id": int(it["id"]), "src": FILE_ROUTE + str(it["path"]),
                       "short": esc(it["short"]), "title": esc(it["title"]),
                       "badges": [[esc(c), esc(t)] for c, t in it["badges"]]} for it in items],
            "selected": None if selected is None else int(selected), "empty": esc(empty)}


class ThumbGrid(gr.HTML):
    """The grid (see the module docstring); events: grid_pick, grid_keep, grid_exclude,
    grid_auto, grid_undo, grid_page."""

    def __init__(self, value: Any = None, **kwargs):
        super().__init__(value=value or item_value([]), html_template=TEMPLATE,
                         css_template=CSS, js_on_load=SCRIPT, apply_default_css=False,
                         **kwargs)


def event_id(evt: gr.EventData) -> int | None:
    """The candidate id a grid event carries."""
    data = getattr(evt, "_data", None) or {}
    value = data.get("id") if isinstance(data, dict) else None
    return None if value is None else int(value)


def event_delta(evt: gr.EventData) -> int:
    data = getattr(evt, "_data", None) or {}
    return int(data.get("delta", 0)) if isinstance(data, dict) else 0


__all__ = ["FILE_ROUTE", "LIGHTBOX_CSS", "ThumbGrid", "event_delta", "event_id", "item_value"]
