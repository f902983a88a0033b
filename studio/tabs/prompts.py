"""Prompts: choose the original prompts (built-in toy or sample set, an uploaded file, pasted
text), preview them and a few prompts' variants, then add them to the run (a background job:
an LLM expander can take a while)."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from craft import CraftError
from craft.run.config import field_choices, field_help
from studio.context import RunContext
from studio.settings import Settings, none_as_zero, optional_int
from craft.stages.calls import StageCall
from studio.launcher import stage_job
from studio.ui import (MAX_TABLE_ROWS, JobPanel, Tab, finished_message, ok_md, safe,
                       start_job, user_error)

UPLOAD_TYPES = [".txt", ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet"]
SOURCES = {"toy": "Toy prompts (built-in)", "sample": "Sample prompts (built-in, natural "
                                                       "language)",
           "upload": "Upload a file", "paste": "Paste text",
           "run": "This run's prompts (every source added so far)"}


def source_kind(source: str) -> str:
    """Which of :data:`SOURCES` ``prompts.source`` is (what the Prompts tab shows checked)."""
    from craft.stages.engine import RUN_PROMPTS_FILE

    if source in ("toy", "sample"):
        return source
    if source.replace("\\", "/").endswith(RUN_PROMPTS_FILE):
        return "run"
    return "paste" if Path(source).name.startswith("pasted-") else "upload"


def kind_updates(source: str) -> list:
    """The radio and the upload / paste boxes for ``source``."""
    key = source_kind(source)
    return [SOURCES[key], gr.update(visible=key == "upload"), gr.update(visible=key == "paste"),
            gr.update(visible=key == "paste")]
PREVIEW_ROWS = 200
VARIANT_PREVIEW_PROMPTS = 3


def _safe_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "prompts.txt"
    return stem[:80]


def check_source(path: str | Path, column: str | None = None, name: str | None = None) -> None:
    """Refuse (ValueError naming the problem) a file no prompt can be read from: empty, binary,
    no prompt column... read in its own format ("auto": its extension), as Add will read it.
    Called before the file becomes the run's prompts.source, so a refused file changes
    nothing (not RUN/config.yaml) and leaves nothing for Add to start a job on."""
    from craft.stages.prompts import load_prompts

    try:
        load_prompts(str(path), "auto", column or None)
    except ValueError as e:  # PromptError: say it with the name the user knows
        raise ValueError(str(e).replace(str(path), name or Path(path).name)) from None


def new_source_settings(source: str, own_format: bool = True) -> dict[str, Any]:
    """The settings a newly chosen prompt source sets (studio.settings_sync.commit changes): a
    file the user brings (``own_format``) is read in its own format ("auto": its extension),
    never in the run's previous source's (a run that recorded several sources in
    RUN/prompts/train.jsonl said format: jsonl, and a .txt added then was read as JSON)."""
    return {"prompts.source": source, **({"prompts.format": "auto"} if own_format else {})}


def store_upload(ctx: RunContext, tmp_path: str, column: str | None = None) -> str:
    """Copy an uploaded prompt file into RUN/uploads/ (so the config can point at it and the run
    is self-contained); returns the new path. The file is only ever parsed as text/table data,
    and one no prompt can be read from is refused (:func:`check_source`) and not stored."""
    src = Path(tmp_path)
    suffix = src.suffix.lower()
    if suffix not in UPLOAD_TYPES:
        raise ValueError(f"{src.name}: unsupported file type {suffix or '(none)'}; upload one of "
                         f"{', '.join(UPLOAD_TYPES)}")
    check_source(src, column)
    dest_dir = ctx.run_dir / "uploads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:8]
    dest = dest_dir / f"{Path(_safe_name(src.name)).stem}-{digest}{suffix}"
    shutil.copyfile(src, dest)
    return str(dest)


def store_paste(ctx: RunContext, text: str) -> str:
    if not text or not text.strip():
        raise ValueError("the pasted text is empty; paste one prompt per line")
    dest_dir = ctx.run_dir / "uploads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    dest = dest_dir / f"pasted-{hashlib.sha1(data).hexdigest()[:8]}.txt"
    new = not dest.exists()
    dest.write_bytes(data)
    try:
        check_source(dest, name="the pasted text")
    except ValueError:
        if new:
            dest.unlink(missing_ok=True)
        raise
    return str(dest)


def preview(source: str, fmt: str, column: str, max_prompts, num_variants, expander: str,
            seed) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Load (without storing) and show the prompts and the variants of the first few."""
    from craft.stages.expansion import expand_prompts
    from craft.stages.prompts import load_prompts

    ps = load_prompts(source, fmt or "auto", column or None, optional_int(max_prompts),
                      seed=int(seed or 0))
    table = pd.DataFrame({"#": range(1, len(ps.prompts) + 1), "prompt": ps.prompts}).head(
        PREVIEW_ROWS)
    msg = f"**{html.escape(str(source))}** ({ps.format}): {html.escape(ps.summary())}"
    if ps.skipped:
        first = ps.skipped[:5]
        msg += "<br>skipped: " + "; ".join(f"line {s.line}: {html.escape(s.reason)}"
                                          for s in first)
        if len(ps.skipped) > 5:
            msg += f"; … {len(ps.skipped) - 5} more"
    nv = int(num_variants or 0)
    if nv and expander == "template":
        exp = expand_prompts(ps.prompts[:VARIANT_PREVIEW_PROMPTS], "template", nv, int(seed or 0))
        rows = [(p, i, v) for p, vs in zip(exp.prompts, exp.variants) for i, v in enumerate(vs, 1)]
        variants = pd.DataFrame(rows, columns=["prompt", "variant", "text"])
    else:
        variants = pd.DataFrame({"prompt": [], "variant": [], "text": []})
        if nv:
            msg += "<br>The LLM expander writes variants when you add the prompts to the run."
    return msg, table, variants


def stored_tables(ctx: RunContext) -> tuple[Any, pd.DataFrame]:
    """The run's prompts (the first MAX_TABLE_ROWS, labelled with the total) and the variants
    of the first few."""
    prompts = ctx.store.prompts_df()
    variants = ctx.store.variants_df("train")
    counts = variants[variants["idx"] > 0].groupby("prompt_id").size()
    table = pd.DataFrame({"id": prompts["id"], "split": prompts["split"], "prompt": prompts["text"],
                          "variants": [int(counts.get(i, 0)) for i in prompts["id"]]})
    sample_ids = list(prompts.loc[prompts["split"] == "train", "id"][:VARIANT_PREVIEW_PROMPTS])
    v = variants[variants["prompt_id"].isin(sample_ids) & (variants["idx"] > 0)]
    vt = pd.DataFrame({"prompt": v["prompt"], "variant": v["idx"], "text": v["text"]})
    label = "Prompts in the run" + (f" (the first {MAX_TABLE_ROWS} of {len(table)})"
                                    if len(table) > MAX_TABLE_ROWS else f" ({len(table)})")
    return gr.update(value=table.head(MAX_TABLE_ROWS), label=label), vt


class PromptsTab(Tab):
    def __init__(self, ctx: RunContext, settings: Settings):
        cfg = ctx.cfg
        gr.Markdown("Load the **original prompts** CRAFT aligns on and expand each into richer "
                    "**variants** (used only to generate candidates; every image is scored and "
                    "trained against its original prompt).")
        with gr.Row():
            with gr.Column(scale=2):
                self.kind = gr.Radio(list(SOURCES.values()), value=SOURCES["toy"],
                                     label="Prompt set", elem_id="prompts-kind")
                self.upload = gr.File(label="Prompt file (txt, csv, tsv, json, jsonl, parquet)",
                                      file_types=UPLOAD_TYPES, type="filepath", visible=False,
                                      elem_id="prompts-upload")
                self.paste = gr.Textbox(label="Paste prompts, one per line", lines=6,
                                        visible=False, elem_id="prompts-paste")
                self.use_paste = gr.Button("Use pasted text", visible=False, size="sm")
                self.source = settings.bind("prompts.source", gr.Textbox(
                    cfg.prompts.source, label="prompts.source",
                    info=field_help("prompts", "source"), elem_id="prompts-source"))
            with gr.Column(scale=1):
                self.fmt = settings.bind("prompts.format", gr.Dropdown(
                    list(field_choices("prompts", "format")), value=cfg.prompts.format,
                    label="format", info=field_help("prompts", "format")))
                self.column = settings.bind("prompts.column", gr.Textbox(
                    cfg.prompts.column or "", label="column",
                    info=field_help("prompts", "column")),
                    to_ui=lambda v: v or "", from_ui=lambda v: (v or "").strip() or None)
                self.max_prompts = settings.bind("prompts.max_prompts", gr.Number(
                    none_as_zero(cfg.prompts.max_prompts), precision=0, minimum=0,
                    label="max prompts (0 = all)", elem_id="prompts-max"),
                    to_ui=none_as_zero, from_ui=optional_int)
            with gr.Column(scale=1):
                self.num_variants = settings.bind("prompts.num_variants", gr.Slider(
                    0, 12, value=cfg.prompts.num_variants, step=1, label="V: variants per prompt",
                    info=field_help("prompts", "num_variants"), elem_id="prompts-variants"))
                self.expander = settings.bind("prompts.expander", gr.Dropdown(
                    list(field_choices("prompts", "expander")), value=cfg.prompts.expander,
                    label="expander", info=field_help("prompts", "expander")))
                self.seed = settings.bind("prompts.seed", gr.Number(
                    cfg.prompts.seed, precision=0, label="seed"))
        with gr.Accordion("Held-out evaluation prompts and LLM expander", open=False):
            with gr.Row():
                self.eval_source = settings.bind("prompts.eval_source", gr.Textbox(
                    cfg.prompts.eval_source, label="prompts.eval_source",
                    info=field_help("prompts", "eval_source")))
                self.max_eval = settings.bind("prompts.max_eval_prompts", gr.Number(
                    none_as_zero(cfg.prompts.max_eval_prompts), precision=0, minimum=0,
                    label="max evaluation prompts (0 = all)"), to_ui=none_as_zero,
                    from_ui=optional_int)
                self.expander_model = settings.bind("prompts.expander_model", gr.Textbox(
                    cfg.prompts.expander_model or "", label="expander_model (llm_local)"),
                    to_ui=lambda v: v or "", from_ui=lambda v: (v or "").strip() or None)
                self.expander_url = settings.bind("prompts.expander_url", gr.Textbox(
                    cfg.prompts.expander_url or "", label="expander_url (llm_http)"),
                    to_ui=lambda v: v or "", from_ui=lambda v: (v or "").strip() or None)
        with gr.Row():
            self.preview_btn = gr.Button("Preview", elem_id="prompts-preview")
            self.add_btn = gr.Button("Add prompts to the run", variant="primary",
                                     elem_id="prompts-add")
        self.message = gr.Markdown(elem_id="prompts-message")
        self.panel = JobPanel("prompts", log_lines=4)
        with gr.Row():
            self.preview_table = gr.Dataframe(label="Preview (not yet in the run)",
                                              interactive=False, max_height=300,
                                              elem_id="prompts-preview-table")
            self.preview_variants = gr.Dataframe(label="Variants of the first prompts",
                                                 interactive=False, max_height=300, wrap=True)
        gr.Markdown("### In this run")
        with gr.Row():
            self.stored = gr.Dataframe(label="Prompts in the run", interactive=False,
                                       max_height=360, elem_id="prompts-stored")
            self.stored_variants = gr.Dataframe(label="Stored variants of the first prompts",
                                                interactive=False, max_height=360, wrap=True)

    # ------------------------------------------------------------------ wiring

    def wire(self, app) -> None:
        preview_inputs = [self.source, self.fmt, self.column, self.max_prompts,
                          self.num_variants, self.expander, self.seed]
        preview_outputs = [self.message, self.preview_table, self.preview_variants]

        def chosen(source: str, seen, own_format: bool = False):
            """A source the user chose (a built-in set, an upload, a paste) is the run's
            prompts.source at once (studio.settings_sync), so a reload shows it checked. A
            file the user brings (``own_format``) is read in its own format: prompts.format
            "auto", not the run's previous source's (e.g. the jsonl of its recorded sources)."""
            from studio.settings_sync import commit

            try:
                seen, _ = commit(self.ctx, app.settings, new_source_settings(source, own_format),
                                 seen or {})
            except CraftError:  # a value the config refuses: nothing saved (as try_commit)
                pass
            return seen

        def on_kind(kind, seen):
            key = next(k for k, v in SOURCES.items() if v == kind)
            # the built-in sets are chosen at once; a file waits for its upload / paste
            # (an empty source: Add says to choose one, never adds a previous file)
            source = {"toy": "toy", "sample": "sample", "run": self.ctx.cfg.prompts.source
                      if source_kind(self.ctx.cfg.prompts.source) == "run" else ""}.get(key, "")
            return (gr.update(visible=key == "upload"), gr.update(visible=key == "paste"),
                    gr.update(visible=key == "paste"), source,
                    chosen(source, seen) if source else gr.skip())

        def preview_if_any(source, *rest):  # nothing chosen yet (a file to come): no preview
            return safe(preview, 3)(source, *rest) if source else [gr.skip()] * 3

        app.then(app.on(self.kind.input, on_kind, [self.kind, app.seen],
                        [self.upload, self.paste, self.use_paste, self.source, app.seen]),
                 preview_if_any, preview_inputs, preview_outputs)

        def on_upload(path, column, seen):
            if not path:
                return "", "", gr.skip(), gr.skip()
            try:  # the type, then the content (empty, binary, no prompt column...)
                source = store_upload(self.ctx, path, column)
            except ValueError as e:  # a refused file: the run's config is left as it was, and
                # nothing stays pending for Add (it says to choose a prompt set)
                return "", user_error(e), gr.skip(), gr.skip()
            seen = chosen(source, seen, own_format=True)
            return source, "", self.ctx.cfg.prompts.format, seen

        app.on(app.on(self.upload.upload, on_upload, [self.upload, self.column, app.seen],
                      [self.source, self.message, self.fmt, app.seen]).success,
               preview_if_any, preview_inputs, preview_outputs)
        app.on(self.upload.clear, lambda: ("", ""), None, [self.source, self.message])

        def on_paste(text, seen):
            source = store_paste(self.ctx, text)
            seen = chosen(source, seen, own_format=True)
            return source, self.ctx.cfg.prompts.format, seen

        app.on(app.on(self.use_paste.click, on_paste, [self.paste, app.seen],
                      [self.source, self.fmt, app.seen]).success, safe(preview, 3),
               preview_inputs, preview_outputs)
        app.on(self.preview_btn.click, safe(preview, 3), preview_inputs, preview_outputs)
        self._wire_add(app)

    def _wire_add(self, app) -> None:
        """Add the pending source to the run (a job: an LLM expander can take a while)."""

        def on_add(source, seen):
            from studio.settings_sync import commit

            ctx = self.ctx
            if not (source or "").strip():
                raise ValueError("choose a prompt set first: a built-in set, an uploaded file "
                                 "or pasted text (a file the upload refused is not added)")
            # the pending source (an upload sets it without a keystroke) becomes the run's
            seen, text = commit(ctx, app.settings, {"prompts.source": source}, seen or {})
            if text:
                raise ValueError("the prompt source was changed in another window; reload the "
                                 "settings first")
            start_job("prompts", f"Add prompts · {ctx.run_dir}", stage_job(
                StageCall("prompts"), ctx.run_dir, ctx.settings_now(), 1))
            return [ok_md("adding prompts…"), gr.Timer(active=True), gr.update(interactive=False),
                    seen]

        app.on(self.add_btn.click, on_add, [self.source, app.seen],
               [self.message, self.panel.timer, self.add_btn, app.seen], message=self.message)

        def tick(seen):
            from studio.settings_sync import snapshot

            ctx = self.ctx
            snap = self.jobs.latest("prompts")
            out = self.panel.render(snap)
            if snap is None or snap.running:
                return [*out, *[gr.skip()] * 10]
            stored, variants = stored_tables(ctx)
            result = snap.result or {}
            msg = (ok_md(f"added: {result['train_summary']} (train), "
                         f"{result['eval_summary']} (held out)"
                         + ("; the run's prompts now come from several sources, recorded in "
                            f"{result['sources_file']} (its config names that file)"
                            if result.get("sources_file") else ""))
                   if snap.status == "done" and result else finished_message(snap))
            cfg = ctx.reload_config()  # the stage may have recorded several sources
            seen = {**(seen or {}), **{k: v for k, v in snapshot(app.settings, cfg).items()
                                       if k.startswith("prompts.")}}
            return [*out, gr.Timer(active=False), stored, variants, msg,
                    gr.update(interactive=True), cfg.prompts.source,
                    *kind_updates(cfg.prompts.source)[:1], seen, *kind_updates(
                        cfg.prompts.source)[1:]]

        self.panel.on_tick(app, tick, app.seen, [
            *self.panel.outputs, self.panel.timer, self.stored, self.stored_variants,
            self.message, self.add_btn, self.source, self.kind, app.seen, self.upload, self.paste,
            self.use_paste])

    # ------------------------------------------------------------------ refresh

    @property
    def refresh_outputs(self) -> list:
        return [self.stored, self.stored_variants, *self.panel.outputs, self.panel.timer,
                self.kind, self.upload, self.paste, self.use_paste]

    def refresh(self) -> list:
        """The run's prompts, and its real source checked (after a reload or a restart too)."""
        stored, variants = stored_tables(self.ctx)
        return [stored, variants, *self.panel.render(), self.panel.keep_polling(),
                *kind_updates(self.ctx.cfg.prompts.source)]


__all__ = ["PromptsTab", "check_source", "new_source_settings", "preview", "store_paste",
           "store_upload"]
