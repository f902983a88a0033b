"""Small UI helpers shared by the tabs: job panels, messages, captions, CSS."""

from __future__ import annotations

import html
import logging
from typing import Any, Callable

import gradio as gr

from craft import CraftError
from craft.stages.filtering import short_reward_name
from studio.jobs import JOBS, JobSnapshot, format_seconds

logger = logging.getLogger(__name__)

CSS = """
/* Toy images are 32 px: upscale them without smoothing so one sees what the rewards see. */
.pixelated img, .pixelated canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.job-bar { height: 10px; background: #e6e9ef; border-radius: 5px; overflow: hidden; }
.job-bar > div { height: 100%; background: #2f9e5b; transition: width .4s; }
.job-bar.failed > div { background: #d9534f; }
.job-bar.cancelled > div { background: #e0a13a; }
.kept-count { font-size: 1.25em; }
.studio-error { color: #b52a25; }
.job-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
/* Table headers wrap between words, never letter by letter in a narrow column. */
table th, [role=columnheader] { word-break: normal !important; overflow-wrap: normal !important;
                                 white-space: nowrap; }
/* The why table fits its column (~350 px at 1400 px): compact cells, headers wrapping between
   words (the page-wide rule above kept them on one line and cut the table off), numbers and
   names whole; a still narrower column scrolls the table, never the page. */
#curate-why { min-width: 0; max-width: 100%; }
#curate-why table { display: block; max-width: 100%; overflow-x: auto; font-size: 11px; }
#curate-why th, #curate-why td { padding: 2px 4px !important; word-break: normal !important;
                                 overflow-wrap: normal !important; }
#curate-why th { white-space: normal !important; }
#curate-why td { white-space: nowrap; }
#curate-showing p { margin: 0; text-align: center; }
.drift-warning { color: #9a5b00; font-weight: 600; }
.report table { font-size: 12px; }
"""

POLL_SECONDS = 1.0
# The most rows a table sends to the browser: a 10k-row table in the page slowed every event of
# every tab by ~300 ms in the browser (benchmarks/studio.md). Tables say what they leave out.
MAX_TABLE_ROWS = 500


def _page_css() -> str:
    from studio.grid import LIGHTBOX_CSS

    return CSS + LIGHTBOX_CSS

# Page-wide key handling, loaded once in <head>: Enter in a slider's number box applies the
# typed value at once (Gradio applies it when the box loses focus, so Enter seemed to do
# nothing).
HEAD_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (e.key === 'Enter' && t && t.tagName === 'INPUT' && t.type === 'number' &&
      t.closest('.block') && t.closest('.block').querySelector('input[type=range]')) {
    e.preventDefault();
    t.blur();
  }
}, true);
</script>
"""


class Tab:
    """A tab's controls and handlers. ``self.ctx`` is the run of the event being handled (each
    browser has its own: studio.session); the constructor gets the first run, for initial
    values only. ``self.jobs`` are that run's jobs (studio.jobs: a page starts, sees and
    cancels only its own run's)."""

    @property
    def ctx(self):
        from studio.session import current

        return current()

    @property
    def jobs(self):
        return run_jobs()


def run_jobs():
    """The jobs of the run of the event being handled."""
    from studio.session import current

    return JOBS.for_run(str(current().run_dir))


def start_job(kind: str, title: str, fn: Callable[..., Any], info: dict | None = None):
    """Start a job of the current run, recording who started it (with --auth)."""
    from studio.session import current_user

    return run_jobs().start(kind, title, fn, info, owner=current_user())


short_name = short_reward_name  # (craft.stages.filtering: the engine's summaries use it too)


def error_md(e: BaseException | str) -> str:
    """An error line, in the page's words (studio.wording.for_page: the engine's command-line
    hints become the page's buttons; a missing step says when the whole loop is making it)."""
    from studio.wording import for_page

    text = e if isinstance(e, str) else " ".join(str(e).split())
    return f"<span class='studio-error'>⚠ {html.escape(for_page(text))}</span>"


def ok_md(text: str) -> str:
    """A success line; markup characters in it are shown, not parsed (file names, prompts)."""
    return f"✓ {html.escape(text, quote=False)}"


def user_error(e: BaseException) -> str:
    """Message for an exception caught in a handler: CraftError text as is, others typed."""
    if isinstance(e, CraftError) or isinstance(e, ValueError):
        return error_md(e)
    logger.exception("studio handler failed")
    return error_md(f"{type(e).__name__}: {e}")


class JobPanel:
    """Status line, progress bar and log of the latest job of one kind, refreshed by a timer."""

    def __init__(self, kind: str, log_lines: int = 8):
        self.kind = kind
        self.status = gr.Markdown("No job yet.", elem_id=f"{kind}-job-status")
        self.bar = gr.HTML(_bar(None), elem_id=f"{kind}-job-bar")
        self.log = gr.Textbox(label="Log (newest first)", lines=log_lines, max_lines=log_lines,
                              interactive=False, elem_classes=["job-log"],
                              elem_id=f"{kind}-job-log")
        self.timer = gr.Timer(POLL_SECONDS, active=False)

    @property
    def outputs(self) -> list[Any]:
        return [self.status, self.bar, self.log]

    def render(self, snap: JobSnapshot | None = None) -> list[Any]:
        snap = snap if snap is not None else run_jobs().latest(self.kind)
        if snap is None:  # the whole loop may have run this tab's stage (studio.wording)
            from studio.wording import loop_line

            line = loop_line(self.kind)
            return [line or "No job yet.", _bar(None), ""]
        return [snap.summary(), _bar(snap), "\n".join(reversed(snap.log[-40:]))]

    def latest(self) -> JobSnapshot | None:
        """This run's latest job of the panel's kind."""
        return run_jobs().latest(self.kind)

    def is_running(self) -> bool:
        return run_jobs().running(self.kind) is not None

    def on_tick(self, app, fn: Callable[..., Any], inputs: Any, outputs: list[Any]) -> Any:
        """Poll with ``fn`` (wired through ``app.on``: the session's run is bound); an exception
        in it is logged and the outputs are left as they are (a broken refresh must not spam
        the page with an error every second)."""
        n = len(outputs)

        def tick(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception:  # noqa: BLE001
                logger.exception("%s poll failed", self.kind)
                out = [gr.skip()] * n
                if self.timer in outputs and not self.is_running():
                    out[outputs.index(self.timer)] = gr.Timer(active=False)  # stop retrying
                return out

        tick.__name__ = f"poll_{self.kind}"
        return app.on(self.timer.tick, tick, inputs, outputs, show_progress="hidden")

    def keep_polling(self) -> Any:
        """For a tab refresh: start polling if a job runs, else leave the timer alone (a refresh
        racing a Start click must not switch off the poll the click just switched on)."""
        return gr.Timer(active=True) if self.is_running() else gr.skip()


def job_buttons(running: bool) -> list[Any]:
    """Updates for a tab's (Start, Cancel) pair: Start while nothing runs, Cancel while it runs."""
    return [gr.update(interactive=not running),
            gr.update(interactive=running, variant="stop" if running else "secondary")]


def started_message(snap: JobSnapshot | None, what: str) -> str:
    """What a Start button says: "<what> started", or, for a job that waits for its device
    (studio.jobs.DeviceQueue), that it is queued and where."""
    if snap is not None and snap.status == "queued":
        return ok_md(f"{what} queued: " + (snap.queue_line.removeprefix("queued: ")
                                            or "it starts when its device is free"))
    return ok_md(f"{what} started")


def cancel_message(kind: str, what: str) -> str:
    """Cancel this run's job of ``kind`` (never another run's); a job still waiting in the
    device queue leaves it at once, without having run."""
    jobs = run_jobs()
    snap = jobs.running(kind)
    if jobs.cancel(kind):
        now = jobs.manager.get(snap.id) if snap is not None else None
        if now is not None and now.status == "cancelled" and snap.status == "queued":
            return ok_md(f"the {what} was waiting for its device: taken out of the queue, "
                         f"nothing ran")
        return ok_md(f"cancel requested: the {what} stops after its current batch or step")
    return f"no {what} of this run is running"


def others_markdown() -> str:
    """Other runs' running jobs, read-only, each with its run's full path."""
    others = run_jobs().others()
    if not others:
        return ""
    lines = [f"- {html.escape(o.kind)} · `{html.escape(o.run_dir)}` · "
             + (html.escape(o.queue_line or "queued") if o.status == "queued"
                else f"{o.done}/{o.total}")
             + (f" · started by {html.escape(o.owner)}" if o.owner else "") for o in others]
    return "**Running in other runs** (shown here, controlled from their own pages):\n" + \
        "\n".join(lines)


def finished_message(snap: JobSnapshot | None,
                     again: str = "starting it again continues") -> Any:
    """What a tab's message line says once its job has ended (it said "… started" before);
    ``again``: how to continue a cancelled one."""
    if snap is None or snap.running:
        return gr.skip()
    took = format_seconds(snap.elapsed_s)
    if snap.status == "cancelled" and snap.info.get("never_started"):
        return ok_md(f"{snap.title}: taken out of the queue after waiting {took}; nothing ran")
    if snap.status == "done":
        return ok_md(f"{snap.title}: finished in {took}")
    if snap.status == "cancelled":
        return f"{html.escape(snap.title)}: cancelled after {took}; what it made is kept, and " \
               f"{again}"
    return error_md(f"{snap.title} failed: {snap.error or 'see its log'}")


def processes_control(kind: str) -> Any:
    """How many processes a stage runs on: 1 = a thread of this studio; N > 1 = ``accelerate
    launch`` with N processes (one per GPU), the same command the README gives."""
    return gr.Number(1, precision=0, minimum=1, maximum=256, step=1, label="processes",
                     info="1: in this studio; N: accelerate launch with N processes",
                     elem_id=f"{kind}-processes", min_width=120, scale=0)


def _bar(snap: JobSnapshot | None) -> str:
    if snap is None:
        return "<div class='job-bar'><div style='width:0%'></div></div>"
    pct = 100.0 if snap.status == "done" else 100 * snap.fraction
    return (f"<div class='job-bar {snap.status}' data-status='{snap.status}'>"
            f"<div style='width:{pct:.1f}%'></div></div>")


def safe(fn: Callable[..., Any], n_outputs: int, message_index: int = 0) -> Callable[..., Any]:
    """Wrap a handler so any error lands in its message output (a CraftError / ValueError as
    its text, anything else typed and logged) instead of a traceback; other outputs are left
    unchanged. The one place the studio's handlers catch exceptions: ``app.on(...,
    message=component)`` applies it."""
    import functools

    @functools.wraps(fn)  # keeps the signature: Gradio's event data still reaches fn
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - shown in the page
            out = [gr.skip()] * n_outputs
            out[message_index] = user_error(e)
            return out[0] if n_outputs == 1 else tuple(out)

    return wrapper


__all__ = ["CSS", "HEAD_JS", "JobPanel", "POLL_SECONDS", "Tab", "cancel_message", "error_md",
           "finished_message", "job_buttons", "ok_md", "others_markdown", "processes_control",
           "run_jobs", "safe", "short_name", "start_job", "started_message", "user_error"]
