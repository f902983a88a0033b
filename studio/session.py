"""Which run each browser tab is looking at.

Why: the studio serves several browsers at once (a team, or one person's two windows), and each
may look at a different run. So the open run is a per-browser value (a ``gr.BrowserState``: it
survives a reload and a studio restart), and every event handler runs with that run's context
as :func:`current`. Contexts are shared by everyone looking at the same run (one store, one
frame cache, the same saved settings), and jobs stay visible to every browser.

Wiring an event: ``app.on(button.click, fn, inputs, outputs)`` instead of
``button.click(fn, inputs, outputs)``; ``fn`` then reads ``current()`` (tabs: ``self.ctx``). A
handler that takes Gradio event data declares it as its first parameter, as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Callable, Iterator

import gradio as gr

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("craft_studio_run")
_USER: contextvars.ContextVar = contextvars.ContextVar("craft_studio_user", default=None)


def current_user() -> str | None:
    """Who sent the event being handled (``craft studio --auth``), None without auth."""
    return _USER.get()


def current():
    """The run context of the event being handled (see the module docstring)."""
    ctx = _CURRENT.get(None)
    if ctx is None:
        raise RuntimeError("no run is bound to this call: wire the event with app.on(...)")
    return ctx


@contextlib.contextmanager
def bound(ctx) -> Iterator[Any]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def _event_data_type(fn: Callable) -> type | None:
    """The gr.EventData subclass ``fn`` takes as its first parameter, if any."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    from gradio import utils

    hint = utils.get_type_hints(fn).get(params[0].name)
    if isinstance(hint, type) and issubclass(hint, gr.EventData):
        return hint
    return None


def for_session(fn: Callable, resolve: Callable[[Any], Any]) -> Callable:
    """``fn`` as a handler whose first input is the session's run; ``resolve(run_value)`` gives
    the run context to bind while ``fn`` runs. Event data (if ``fn`` takes it) is passed on."""
    data_type = _event_data_type(fn)
    if data_type is None:
        def handler(request, run_value, *args):
            with bound(resolve(run_value)), _as_user(request):
                return fn(*args)

        handler.__annotations__ = {"request": gr.Request}
    else:
        def handler(evt, request, run_value, *args):
            with bound(resolve(run_value)), _as_user(request):
                return fn(evt, *args)

        handler.__annotations__ = {"evt": data_type, "request": gr.Request}
    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


@contextlib.contextmanager
def _as_user(request) -> Iterator[None]:
    token = _USER.set(getattr(request, "username", None) if request is not None else None)
    try:
        yield
    finally:
        _USER.reset(token)


__all__ = ["bound", "current", "current_user", "for_session"]
