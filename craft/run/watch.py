"""What a run tells whoever watches its device memory (``craft rehearse``'s meter,
craft/stages/rehearsal.py): the models it loads, the modules it moves off the accelerator and
back, and named sections of a stage (encoding the training set, a checkpoint, a preview, a
sampling round). Nothing listens in an ordinary run, and then every call here returns at once.

Why it exists: on a GPU the rehearsal reads CUDA's own peak, which sees everything; on a CPU it
counts live tensors (craft.planning.memtrack), which sees a tensor when an operator makes it,
not when a loader reads it from disk, and cannot see a module "leave" the device, since on a CPU
there is nowhere to move it. So the code says so where it happens: ``loaded(model)`` after a
load, ``left_device(module)`` where a GPU run would move it to the host (the CPU run keeps it
where it is), ``back_on_device(module)`` where it would come back, ``section(name)`` around the
parts a plan prices apart, and ``host()`` around copies a GPU run makes in host memory (a
checkpoint's weights on their way to disk). The run does exactly what it would do unwatched.

Imports nothing: it sits at the bottom with the rest of craft/run.
"""

from __future__ import annotations

import contextlib

_LISTENERS: list = []


@contextlib.contextmanager
def watching(listener):
    """``listener`` is told what the run does while the block runs. It may implement any of
    ``loaded(obj)``, ``left_device(obj)``, ``back_on_device(obj)`` and
    ``section(name, entering: bool)``."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)


def _tell(what: str, *args) -> None:
    for listener in list(_LISTENERS):
        fn = getattr(listener, what, None)
        if fn is not None:
            fn(*args)


def loaded(obj):
    """A model was just loaded (a pipeline, a reward, an encoder); returns it."""
    if _LISTENERS:
        _tell("loaded", obj)
    return obj


def left_device(obj) -> None:
    """``obj`` (a module or a pipeline) is off the accelerator from here on (on a CPU, where a
    GPU run would have moved it)."""
    if _LISTENERS:
        _tell("left_device", obj)


def back_on_device(obj) -> None:
    """``obj`` is back on the accelerator."""
    if _LISTENERS:
        _tell("back_on_device", obj)


@contextlib.contextmanager
def section(name: str):
    """A named part of a run: a stage of ``craft run`` (``prompts``, ``generate``, ``score``,
    ``train``, ``evaluate``), or a part of training: ``encode`` (the training set),
    ``checkpoint`` (a checkpoint or the final save), ``preview`` (fixed-seed previews),
    ``sample`` (an online method's round)."""
    if not _LISTENERS:
        yield
        return
    _tell("section", name, True)
    try:
        yield
    finally:
        _tell("section", name, False)


@contextlib.contextmanager
def host():
    """Tensors made inside are host memory on a GPU run (e.g. weights copied to the CPU for
    saving); a CPU run's accounting of device memory leaves them out."""
    with section("host"):
        yield


def listening() -> bool:
    return bool(_LISTENERS)


__all__ = ["back_on_device", "host", "left_device", "listening", "loaded", "section",
           "watching"]
