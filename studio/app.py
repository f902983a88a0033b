"""CRAFT Studio: the Gradio app over the whole CRAFT loop.

Layout and event wiring only; every computation is a call into ``craft`` (or the UI-free helpers
in :mod:`studio.tabs.curate_views`). Long stages run as background jobs (:mod:`studio.jobs`). Each
browser looks at its own run (:mod:`studio.session`); what a user sets is saved in that run as
it changes (:mod:`studio.context`).

    craft studio                          # the toy world, run directory runs/studio
    craft studio --run-dir runs/sd15 --config configs/sd15.yaml --port 7861 --auth me:secret
    craft studio --runs-root /data/runs   # serve (open, create) only runs under /data/runs

Security defaults: binds 127.0.0.1 unless ``--host`` says otherwise; ``--auth user:password``
(or the CRAFT_STUDIO_AUTH environment variable, which keeps the password out of the process
list) turns on a login; it serves only files under the open run directories and ``assets/``;
``--runs-root`` confines which folders a browser may open or create; uploads are size-limited,
copied into the run as data and parsed as text/tables only (pickle, numpy and torch files are
refused; configs are read with ``yaml.safe_load``).
"""

from __future__ import annotations

import hashlib
import html
import logging
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from craft import CraftError
from craft.run.config import config_to_yaml, load_config, save_config
from studio.context import RunContext, Studio
from studio.defaults import DEFAULT_MAX_UPLOAD, DEFAULT_PORT, DEFAULT_RUN_DIR
from studio.session import current, for_session
from studio.settings import Settings, UiState
from studio.ui import HEAD_JS, _page_css, ok_md, others_markdown, safe

logger = logging.getLogger(__name__)

TAB_NAMES = ("Prompts", "Generate", "Score", "Curate", "Groups", "Train", "Compare")
SETTINGS_FILE = "studio-settings.yaml"
RUN_STORAGE_KEY = "craft-studio-run"
CHANGES_POLL_S = 2.0  # how often a page asks whether another window changed the run


class StudioApp:
    """Builds the Blocks and keeps references to every tab (tests and screenshots use them)."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.settings = Settings()
        self.ui = UiState()
        self.tabs: dict[str, Any] = {}
        self.demo: gr.Blocks | None = None

    @property
    def ctx(self) -> RunContext:
        """The context of the run the studio was started on (tests and scripts use it)."""
        return self.studio.context(self.studio.default_run)

    # ------------------------------------------------------------------ sessions

    def resolve(self, run_value: Any) -> RunContext:
        """The run a browser's saved value names, or the default run when it cannot be opened
        (deleted, or outside --runs-root)."""
        try:
            return self.studio.context(run_value or self.studio.default_run)
        except (CraftError, OSError) as e:
            logger.info("browser's run %r cannot be opened (%s); using the default", run_value, e)
            return self.ctx

    def on(self, trigger, fn, inputs=None, outputs=None, message=None, **kw):
        """Wire ``fn`` to ``trigger`` (e.g. ``button.click``) with the session's run bound;
        with ``message`` (one of the outputs) an error in ``fn`` is shown there (ui.safe)."""
        if message is not None:
            outs = _listed(outputs)
            fn = safe(fn, len(outs), outs.index(message))
        return trigger(for_session(fn, self.resolve), [self.run_state, *_listed(inputs)],
                       outputs, **kw)

    def then(self, dep, fn, inputs=None, outputs=None, **kw):
        return self.on(dep.then, fn, inputs, outputs, **kw)

    # ------------------------------------------------------------------ layout

    def build(self) -> gr.Blocks:
        from studio.tabs.compare import CompareTab
        from studio.tabs.curate import CurateTab
        from studio.tabs.generate import GenerateTab
        from studio.tabs.groups import GroupsTab
        from studio.tabs.prompts import PromptsTab
        from studio.tabs.score import ScoreTab
        from studio.tabs.train import TrainTab

        ctx = self.ctx
        secret = hashlib.sha256(f"craft-studio:{self.studio.runs_root or ''}".encode()).hexdigest()
        with gr.Blocks(title="CRAFT Studio", analytics_enabled=False) as demo:
            # Which run this browser looks at: kept in the browser (a reload or a restart of
            # the studio finds it again), the default run for a new browser.
            self.run_state = gr.BrowserState(str(ctx.run_dir), storage_key=RUN_STORAGE_KEY,
                                             secret=secret)
            gr.Markdown("## CRAFT Studio · align a text-to-image model with composite rewards")
            self._build_header(ctx)
            from studio.loop import LoopPanel

            self.loop = LoopPanel()
            with gr.Tabs(elem_id="studio-tabs") as self.tabset:
                with gr.Tab("Prompts", id="prompts") as t_prompts:
                    self.tabs["Prompts"] = PromptsTab(ctx, self.settings)
                with gr.Tab("Generate", id="generate") as t_generate:
                    self.tabs["Generate"] = GenerateTab(ctx, self.settings, self.ui)
                with gr.Tab("Score", id="score") as t_score:
                    self.tabs["Score"] = ScoreTab(ctx, self.settings, self.ui)
                with gr.Tab("Curate", id="curate") as t_curate:
                    self.tabs["Curate"] = CurateTab(ctx, self.settings, self.ui)
                with gr.Tab("Groups", id="groups") as t_groups:
                    self.tabs["Groups"] = GroupsTab(ctx, self.tabs["Curate"], self.ui)
                with gr.Tab("Train", id="train") as t_train:
                    self.tabs["Train"] = TrainTab(ctx, self.settings, self.ui)
                with gr.Tab("Compare", id="compare") as t_compare:
                    self.tabs["Compare"] = CompareTab(ctx, self.settings, self.ui)
            tab_blocks = dict(zip(TAB_NAMES, (t_prompts, t_generate, t_score, t_curate, t_groups,
                                              t_train, t_compare)))
            for tab in self.tabs.values():
                tab.wire(self)
            self.loop.wire(self)
            for name, block in tab_blocks.items():
                self._refresh_event(block.select, name)
            # A (re)load restores this browser's run, then shows the first tab; the others
            # refresh when they are opened. (Opening another run cancels a load still under
            # way: its answer, the previous run's settings, must not land after the new run's.)
            prompts = self.tabs["Prompts"]
            load = self.on(demo.load, self._on_load, None, self._restored_outputs())
            dep = self.then(load, _guarded(prompts.refresh, len(prompts.refresh_outputs)), None,
                            prompts.refresh_outputs, show_progress="hidden")
            last = self.then(dep, _guarded(self.loop.refresh, len(self.loop.refresh_outputs)),
                             None, self.loop.refresh_outputs, show_progress="hidden")
            self._load_deps = [load, dep, last]
            self._wire_header()
            self._wire_persistence()
        self.demo = demo
        return demo

    def _build_header(self, ctx) -> None:
        """The run selector, the run's line, other runs' jobs, the stale-settings banner and
        the settings file accordion."""
        with gr.Row(equal_height=True):
            # A typed path is opened as typed (Enter or the button); the list offers the
            # runs the studio knows. (One dropdown for both dropped a typed path on Enter.)
            self.run_dir = gr.Textbox(str(ctx.run_dir), max_lines=1, scale=4,
                                      label="Run directory: type a path and press Enter "
                                            "(a new folder becomes a new run)",
                                      elem_id="run-dir")
            self.run_pick = gr.Dropdown(self.studio.runs(), value=None, scale=2,
                                        label="…or open one of these runs",
                                        elem_id="run-pick")
            self.open_btn = gr.Button("Open / create run", scale=1, elem_id="run-open")
        self.run_info = gr.Markdown(ctx.describe(), elem_id="run-info")
        self.other_jobs = gr.Markdown(elem_id="other-jobs")
        # What this page last loaded or saved of each setting (studio.settings_sync): a
        # change made in another window is shown here, never silently overwritten.
        self.seen = gr.State({})
        # This page's last refused change(s), said in the settings line until a change of the
        # page is saved or the settings are reloaded (a poll must not wipe it).
        self.notice = gr.State("")
        with gr.Row():
            self.stale = gr.Markdown(elem_id="settings-stale")
            self.reload_settings = gr.Button("Reload settings", visible=False, scale=0,
                                             elem_id="settings-reload")
        # The run's counts change as jobs write; a slow, cheap poll keeps the line current.
        self.info_timer = gr.Timer(5.0)
        # Another window's saved setting or hand override reaches this page within a couple of
        # seconds: tabs poll the run's change counters (RunContext.changes: no query) with it.
        self.changes_timer = gr.Timer(CHANGES_POLL_S)
        with gr.Accordion("Settings: save as / load from a YAML config (`craft run` reads it)",
                          open=False):
            with gr.Row():
                self.save_btn = gr.Button("Save settings as YAML", elem_id="settings-save")
                self.load_file = gr.File(label="Load settings (.yaml)",
                                         file_types=[".yaml", ".yml"], type="filepath",
                                         elem_id="settings-load")
                self.check_btn = gr.Button("Check what these settings need",
                                           elem_id="settings-check")
            self.settings_msg = gr.Markdown(elem_id="settings-message")
            self.settings_file = gr.File(label="Saved settings", visible=False,
                                         elem_id="settings-file")
            self.settings_yaml = gr.Code(language="yaml", label="Current settings",
                                         visible=False, elem_id="settings-yaml")

    def _refresh_event(self, event, name: str):
        tab = self.tabs[name]
        dep = self.on(event, _guarded(tab.refresh, len(tab.refresh_outputs)),
                      getattr(tab, "refresh_inputs", []), tab.refresh_outputs,
                      show_progress="hidden")
        return self.then(dep, _guarded(lambda: current().describe(), 1), None, self.run_info,
                         show_progress="hidden")

    def _refresh_all(self, dep):
        for tab in [*(self.tabs[name] for name in TAB_NAMES), self.loop]:
            dep = self.then(dep, _guarded(tab.refresh, len(tab.refresh_outputs)),
                            getattr(tab, "refresh_inputs", []), tab.refresh_outputs,
                            show_progress="hidden")
        return dep

    # ------------------------------------------------------------------ restoring a run

    def _restored_outputs(self) -> list:
        return [self.run_dir, self.run_pick, self.run_info, self.seen, self.notice, self.stale,
                self.reload_settings, *self.settings.components, *self.ui.components]

    def _restored_values(self, ctx: RunContext) -> list:
        from studio.settings_sync import snapshot

        return [str(ctx.run_dir), gr.update(choices=self.studio.runs(), value=None),
                ctx.describe(),
                snapshot(self.settings, ctx.cfg), "", "", gr.update(visible=False),
                *self.settings.values_from(ctx.cfg), *self.ui.values_from(ctx.ui_state())]

    def _on_load(self):
        """A page (re)load: this browser's run, its saved settings and UI state."""
        return self._restored_values(current())

    # ------------------------------------------------------------------ header

    def _wire_header(self) -> None:
        self._wire_run_selector()
        self._wire_info()
        self._wire_settings_file()

    def _wire_run_selector(self) -> None:
        studio = self.studio

        def on_open(path):
            ctx = studio.context(path)
            return [str(ctx.run_dir), *self._restored_values(ctx)]

        outputs = [self.run_state, *self._restored_outputs()]
        opener = safe(on_open, len(outputs), outputs.index(self.run_info))
        # on_open's outputs start with the run state: the refresh chain that follows runs with
        # the newly opened run bound.
        for event, source in ((self.open_btn.click, self.run_dir),
                              (self.run_dir.submit, self.run_dir),
                              (self.run_pick.input, self.run_pick)):
            self._refresh_all(event(opener, source, outputs,
                                    cancels=getattr(self, "_load_deps", None)))

    def _wire_info(self) -> None:
        def on_info(seen, notice, line_now):
            text, reload = settings_line(self.settings, seen, notice)
            if text == (line_now or ""):  # leave it: a poll asked before this page's own
                text = reload = gr.skip()  # event answered must not undo what it said
            return current().describe(), others_markdown(), text, reload

        self.on(self.info_timer.tick, _guarded(on_info, 4), [self.seen, self.notice, self.stale],
                [self.run_info, self.other_jobs, self.stale, self.reload_settings],
                show_progress="hidden")
        # Reload: this page takes the run's current settings (and refreshes every tab).
        dep = self.on(self.reload_settings.click, self._on_load, None, self._restored_outputs())
        self._refresh_all(dep)

    def _wire_settings_file(self) -> None:
        def on_save():
            ctx = current()
            ctx.flush()  # every field is saved as it changes: the run's settings are it
            path = save_config(ctx.cfg, ctx.run_dir / SETTINGS_FILE)
            return (ok_md(f"saved to `{path}`; the same pipeline from the command line: "
                          f"`craft run {path} --run-dir {ctx.run_dir}`"),
                    gr.update(value=str(path), visible=True),
                    gr.update(value=config_to_yaml(ctx.cfg), visible=True))

        self.on(self.save_btn.click, on_save, None,
                [self.settings_msg, self.settings_file, self.settings_yaml],
                message=self.settings_msg)
        self.on(self.check_btn.click, lambda: check_markdown(current().cfg), None,
                self.settings_msg, message=self.settings_msg)
        bound = self.settings.components

        def on_load_file(path):
            from studio.settings_sync import snapshot

            ctx = current()
            if not path:
                return [gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * len(bound)]
            cfg = load_config(path)
            ctx.set_config(cfg)
            ctx.save_settings()
            note = ""
            curate = self.tabs["Curate"]
            if list(cfg.rewards.names) != curate.rewards:
                note = (" (its rewards.names differ from this studio's reward sliders; restart "
                        "`craft studio --config FILE` to get sliders for them)")
            return [ok_md(f"loaded {Path(path).name}{note}"), gr.update(value=config_to_yaml(cfg),
                                                                        visible=True),
                    snapshot(self.settings, cfg), *self.settings.values_from(cfg)]

        dep = self.on(self.load_file.upload, on_load_file, self.load_file,
                      [self.settings_msg, self.settings_yaml, self.seen, *bound],
                      message=self.settings_msg)
        dep = self.then(dep, lambda: current().describe(), None, self.run_info)
        self._refresh_all(dep)

    # ------------------------------------------------------------------ saving as it changes

    def _wire_persistence(self) -> None:
        """Every bound control saves its value into the run's settings as the user changes it
        (debounced, off the event's path), every UI-state control into the run's UI state."""
        for binding in self.settings.bindings:
            if binding.persisted_by is not None:
                continue  # its tab saves it with its own event (Curate's filter controls)
            for trigger, final in _user_events(binding.component):
                self.on(trigger, _persist_setting(self.settings, binding.key, final),
                        [binding.component, self.seen, self.notice],
                        [self.seen, self.notice, self.stale, self.reload_settings,
                         binding.component], queue=False, show_progress="hidden")
        for key, component in self.ui.items():
            for trigger, final in _user_events(component):
                self.on(trigger, _persist_ui(key, component, final, self.settings),
                        [component, self.seen, self.notice],
                        [self.notice, self.stale, self.reload_settings, component],
                        queue=False, show_progress="hidden")


def settings_line(settings: Settings, seen, notice: str = "") -> tuple[str, Any]:
    """The page's settings line and its Reload button (studio.settings_sync.settings_text)."""
    from studio.settings_sync import settings_text

    text = settings_text(current(), settings, seen, notice)
    return text, gr.update(visible=bool(text))


def _persist_setting(settings: Settings, key: str, final: bool = True):
    """Save one control's change into the run (studio.settings_sync.apply: not over a change
    made in another window, not a value the box's bounds or the config refuse). ``final`` (Enter,
    leaving the box, a release, a pick): a refused value is said, with why, and the control
    shows the saved value again; a keystroke's half-typed value waits."""

    def persist(value, seen, notice):
        from studio.settings_sync import apply, notice_after

        out = apply(current(), settings, {key: value}, seen or {}, final=final)
        if out.invalid and not final:  # half-typed: said once the user is done with the box
            return [gr.skip()] * 5
        notice = notice_after(out, settings, notice or "")
        text, reload = settings_line(settings, out.seen, notice)
        return out.seen, notice, text, reload, out.reset.get(key, gr.skip())

    persist.__name__ = f"persist_{key.replace('.', '_')}"
    return persist


def _persist_ui(key: str, component=None, final: bool = True, settings: Settings | None = None):
    """Save a UI-state control (processes, names, views) with the run; a number outside its
    box's bounds is refused as a setting is (said, and the box shows the saved value)."""
    from studio.settings import bounds_text, control_problem, label_of, shown

    def persist(value, seen=None, notice=""):
        ctx = current()
        problem = control_problem(component, value) if component is not None else None
        if problem is None:
            ctx.save_ui(**{key: value})
            return [gr.skip()] * 4
        if not final:
            return [gr.skip()] * 4
        saved = ctx.ui_state().get(key, component.value)
        notice = (f"<b>{html.escape(label_of(component, key))}</b> must be "
                  f"{html.escape(bounds_text(component))}; your <b>"
                  f"{html.escape(shown(value))}</b> was not saved (it stays "
                  f"{html.escape(shown(saved))})")
        text, reload = settings_line(settings, seen, notice)
        return notice, text, reload, saved

    persist.__name__ = f"persist_ui_{key.replace('.', '_')}"
    return persist


def _user_events(component) -> list[tuple[Any, bool]]:
    """The events by which a user (not the program) changes a control's value, each with
    whether the user is done with the value (a keystroke is not: the box is being typed in)."""
    if isinstance(component, gr.Slider):
        return [(component.release, True)]
    if isinstance(component, gr.Number):  # blur: a pasted or auto-filled value too
        return [(component.input, False), (component.submit, True), (component.blur, True)]
    if isinstance(component, gr.Textbox):
        return [(component.input, False), (component.blur, True)]
    return [(component.input, True)]


def _listed(inputs) -> list:
    if inputs is None:
        return []
    return list(inputs) if isinstance(inputs, (list, tuple, set)) else [inputs]


def check_markdown(cfg) -> str:
    """:func:`craft.stages.preflight.preflight` as a table: every piece the settings need, found or
    missing, with the fix for each missing one, and the memory plan's verdict for this
    machine's GPU (an 80 GB H100 where there is none): the studio's `craft config check`."""
    import html

    from craft.planning.hardware import local_gpu, resolve_gpu
    from craft.stages.preflight import preflight

    checks = preflight(cfg, plan=(1, local_gpu() or resolve_gpu(None, None)))
    bad = sum(not c.ok for c in checks)
    rows = [f"| {'✓' if c.ok else '✗ missing'} | {html.escape(c.what)} | "
            f"{html.escape(c.detail).replace('|', '/').replace(chr(10), ' ')} |" for c in checks]
    head = (f"**{len(checks) - bad} of {len(checks)} ready**" +
            (f": fix the {bad} missing item(s) before generating or training." if bad else
             ": every file and setting these settings need is here."))
    return "\n".join([head, "", "| | item | detail |", "|---|---|---|", *rows])


def _guarded(fn, n_outputs: int):
    """A refresh must never break the page: on error, log and leave the outputs alone."""

    def wrapper(*args):
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            logger.exception("refresh failed")
            out = [gr.skip()] * n_outputs
            return out[0] if n_outputs == 1 else out

    wrapper.__name__ = f"refresh_{getattr(fn, '__qualname__', 'tab')}"
    return wrapper


def build_app(run_dir: str | Path = DEFAULT_RUN_DIR, config: str | Path | None = None,
              overrides: Sequence[str] = (), runs_root: str | Path | None = None) -> StudioApp:
    """Open (create) the run and build the Blocks."""
    app = StudioApp(Studio(run_dir, config, tuple(overrides), runs_root))
    app.build()
    return app


def launch(app: StudioApp, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT,
           auth: tuple[str, str] | None = None, max_upload: str = DEFAULT_MAX_UPLOAD,
           block: bool = True, quiet: bool = False):
    """Start the server. ``allowed_paths`` is the studio's live list (assets + opened runs)."""
    app.demo.queue(default_concurrency_limit=4)
    return app.demo.launch(
        server_name=host, server_port=port, auth=auth, allowed_paths=app.studio.allowed_paths,
        max_file_size=max_upload, css=_page_css(), head=HEAD_JS, ssr_mode=False, share=False,
        quiet=quiet, prevent_thread_lock=not block, show_error=True,
        footer_links=["settings"],
        # Gradio's run history would store every event's inputs and outputs in the browser:
        # the Curate tab sends hundreds, and each slider move got slower as it grew.
        run_history=False, mcp_server=False)


__all__ = ["StudioApp", "TAB_NAMES", "build_app", "launch"]
