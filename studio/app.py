"""CRAFT Studio: the Gradio app over the whole CRAFT loop.

Layout and event wiring only; every computation is a call into ``craft`` (or the UI-free helpers
in :mod:`studio.curation`). Long stages run as background jobs (:mod:`studio.jobs`).

    craft studio                          # the toy world, run directory runs/studio
    craft studio --run-dir runs/sd15 --config configs/sd15.yaml --port 7861 --auth me:secret

Security defaults: binds 127.0.0.1 unless ``--host`` says otherwise; ``--auth user:password``
(or the CRAFT_STUDIO_AUTH environment variable, which keeps the password out of the process
list) turns on a login; it serves only files under the open run directories and ``assets/``;
uploads are size-limited, copied into the run as data and parsed as text/tables only (pickle,
numpy and torch files are refused; configs are read with ``yaml.safe_load``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from craft.config import config_to_yaml, load_config, save_config
from studio.defaults import DEFAULT_MAX_UPLOAD, DEFAULT_PORT, DEFAULT_RUN_DIR
from studio.context import StudioContext
from studio.settings import Settings
from studio.ui import CSS, ok_md, user_error

logger = logging.getLogger(__name__)

TAB_NAMES = ("Prompts", "Generate", "Score", "Curate", "Groups", "Train", "Compare")
SETTINGS_FILE = "studio-settings.yaml"


class StudioApp:
    """Builds the Blocks and keeps references to every tab (tests and screenshots use them)."""

    def __init__(self, ctx: StudioContext):
        self.ctx = ctx
        self.settings = Settings()
        self.tabs: dict[str, Any] = {}
        self.demo: gr.Blocks | None = None

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
        with gr.Blocks(title="CRAFT Studio", analytics_enabled=False) as demo:
            gr.Markdown("## CRAFT Studio · align a text-to-image model with composite rewards")
            with gr.Row(equal_height=True):
                self.run_dir = gr.Dropdown(sibling_runs(ctx.run_dir), value=str(ctx.run_dir),
                                           allow_custom_value=True, filterable=True,
                                           label="Run directory (pick one or type a new path)",
                                           scale=4, elem_id="run-dir")
                self.open_btn = gr.Button("Open / create run", scale=1, elem_id="run-open")
            self.run_info = gr.Markdown(ctx.describe(), elem_id="run-info")
            # The run's counts change as jobs write; a slow, cheap poll keeps the line current.
            self.info_timer = gr.Timer(5.0)
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
            with gr.Tabs(elem_id="studio-tabs") as self.tabset:
                with gr.Tab("Prompts", id="prompts") as t_prompts:
                    self.tabs["Prompts"] = PromptsTab(ctx, self.settings)
                with gr.Tab("Generate", id="generate") as t_generate:
                    self.tabs["Generate"] = GenerateTab(ctx, self.settings)
                with gr.Tab("Score", id="score") as t_score:
                    self.tabs["Score"] = ScoreTab(ctx, self.settings)
                with gr.Tab("Curate", id="curate") as t_curate:
                    self.tabs["Curate"] = CurateTab(ctx, self.settings)
                with gr.Tab("Groups", id="groups") as t_groups:
                    self.tabs["Groups"] = GroupsTab(ctx, self.tabs["Curate"])
                with gr.Tab("Train", id="train") as t_train:
                    self.tabs["Train"] = TrainTab(ctx, self.settings)
                with gr.Tab("Compare", id="compare") as t_compare:
                    self.tabs["Compare"] = CompareTab(ctx, self.settings)
            tab_blocks = dict(zip(TAB_NAMES, (t_prompts, t_generate, t_score, t_curate, t_groups,
                                              t_train, t_compare)))
            for tab in self.tabs.values():
                tab.wire(self)
            for name, block in tab_blocks.items():
                self._refresh_event(block.select, name)
            self._refresh_event(demo.load, "Prompts")
            self._wire_header()
        self.demo = demo
        return demo

    def _refresh_event(self, event, name: str):
        tab = self.tabs[name]
        inputs = getattr(tab, "refresh_inputs", [])
        fn = _guarded(tab.refresh, len(tab.refresh_outputs))
        dep = event(fn, inputs, tab.refresh_outputs, show_progress="hidden")
        return dep.then(_guarded(self.ctx.describe, 1), None, self.run_info,
                        show_progress="hidden")

    def _refresh_all(self, dep):
        for name in TAB_NAMES:
            tab = self.tabs[name]
            dep = dep.then(_guarded(tab.refresh, len(tab.refresh_outputs)),
                           getattr(tab, "refresh_inputs", []), tab.refresh_outputs,
                           show_progress="hidden")
        return dep

    # ------------------------------------------------------------------ header

    def _wire_header(self) -> None:
        ctx = self.ctx
        bound = self.settings.components

        def on_open(path):
            try:
                info = ctx.open_run(path)
            except Exception as e:  # noqa: BLE001
                return [user_error(e), gr.skip(), *[gr.skip()] * len(bound)]
            return [info, gr.update(choices=sibling_runs(ctx.run_dir), value=str(ctx.run_dir)),
                    *self.settings.values_from(ctx.cfg)]

        self.info_timer.tick(_guarded(ctx.describe, 1), None, self.run_info,
                             show_progress="hidden")
        dep = self.open_btn.click(on_open, self.run_dir, [self.run_info, self.run_dir, *bound])
        self._refresh_all(dep)

        def on_save(*values):
            try:
                cfg = self.settings.config_from(ctx.cfg, values)
                ctx.set_config(cfg)
                ctx.remember_config()
                path = save_config(cfg, ctx.run_dir / SETTINGS_FILE)
                text = config_to_yaml(cfg)
            except Exception as e:  # noqa: BLE001
                return user_error(e), gr.skip(), gr.skip()
            return (ok_md(f"saved to `{path}`; the same pipeline from the command line: "
                          f"`craft run {path} --run-dir {ctx.run_dir}`"),
                    gr.update(value=str(path), visible=True),
                    gr.update(value=text, visible=True))

        self.save_btn.click(on_save, bound, [self.settings_msg, self.settings_file,
                                             self.settings_yaml])

        def on_check(*values):
            try:
                return check_markdown(self.settings.config_from(ctx.cfg, values))
            except Exception as e:  # noqa: BLE001
                return user_error(e)

        self.check_btn.click(on_check, bound, self.settings_msg)

        def on_load(path):
            if not path:
                return [gr.skip(), gr.skip(), *[gr.skip()] * len(bound)]
            try:
                cfg = load_config(path)
                ctx.set_config(cfg)
                ctx.remember_config()
            except Exception as e:  # noqa: BLE001
                return [user_error(e), gr.skip(), *[gr.skip()] * len(bound)]
            note = ""
            curate = self.tabs["Curate"]
            if list(cfg.rewards.names) != curate.rewards:
                note = (" (its rewards.names differ from this studio's reward sliders; restart "
                        "`craft studio --config FILE` to get sliders for them)")
            return [ok_md(f"loaded {Path(path).name}{note}"), gr.update(value=config_to_yaml(cfg),
                                                                        visible=True),
                    *self.settings.values_from(cfg)]

        dep = self.load_file.upload(on_load, self.load_file,
                                    [self.settings_msg, self.settings_yaml, *bound])
        dep = dep.then(lambda: ctx.describe(), None, self.run_info)
        self._refresh_all(dep)


def check_markdown(cfg) -> str:
    """:func:`craft.preflight.preflight` as a table: every piece the settings need, found or
    missing, with the fix for each missing one (the studio's `craft config check`)."""
    from craft.preflight import preflight

    checks = preflight(cfg)
    bad = sum(not c.ok for c in checks)
    rows = [f"| {'✓' if c.ok else '✗ missing'} | {c.what} | "
            f"{c.detail.replace('|', '/').replace(chr(10), ' ')} |" for c in checks]
    head = (f"**{len(checks) - bad} of {len(checks)} ready**" +
            (f": fix the {bad} missing item(s) before generating or training." if bad else
             ": every file and setting these settings need is here."))
    return "\n".join([head, "", "| | item | detail |", "|---|---|---|", *rows])


def sibling_runs(run_dir: Path) -> list[str]:
    """Run directories next to ``run_dir`` (folders holding a run store), for the selector."""
    from craft.store import DB_NAME

    parent = Path(run_dir).parent
    found = {str(run_dir)}
    try:
        found |= {str(p) for p in parent.iterdir() if (p / DB_NAME).exists()}
    except OSError:
        pass
    return sorted(found)


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
              overrides: Sequence[str] = ()) -> StudioApp:
    """Create the context (opening / creating the run) and build the Blocks."""
    ctx = StudioContext(run_dir, config, tuple(overrides))
    app = StudioApp(ctx)
    app.build()
    return app


def launch(app: StudioApp, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT,
           auth: tuple[str, str] | None = None, max_upload: str = DEFAULT_MAX_UPLOAD,
           block: bool = True, quiet: bool = False):
    """Start the server. ``allowed_paths`` is the context's live list (assets + opened runs)."""
    app.demo.queue(default_concurrency_limit=4)
    return app.demo.launch(
        server_name=host, server_port=port, auth=auth, allowed_paths=app.ctx.allowed_paths,
        max_file_size=max_upload, css=CSS, ssr_mode=False, share=False, quiet=quiet,
        prevent_thread_lock=not block, show_error=True, footer_links=["settings"],
        # Gradio's run history would store every event's inputs and outputs in the browser:
        # the Curate tab sends hundreds, and each slider move got slower as it grew.
        run_history=False, mcp_server=False)


__all__ = ["StudioApp", "TAB_NAMES", "build_app", "launch"]
