"""Packages that extend the library's registries (rewards, prompt sources, template rewriters)
without the library importing them.

Why: the core must not depend on any one world. The toy world, or a user's own package, names a
``register()`` function under the ``craft.plugins`` entry-point group in its packaging metadata
(this project's pyproject.toml does so for ``craft.toyworld.plugin``); the registries call
:func:`load_plugins` before they answer, so a plugin's names are there whenever they are asked
for. ``register()`` must stay cheap: import heavy modules inside the factories it registers.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

GROUP = "craft.plugins"
_loaded = False
_lock = threading.RLock()


def load_plugins() -> None:
    """Run every installed plugin's ``register()`` once per process."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        _loaded = True  # set first: a plugin's register() may itself ask a registry
        from importlib.metadata import entry_points

        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            try:
                ep.load()()
            except ImportError as e:
                log.warning("craft plugin %s (%s) could not be loaded: %s", ep.name, ep.value, e)


__all__ = ["GROUP", "load_plugins"]
