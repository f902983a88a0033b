"""Training methods by name, as rewards are (craft/rewards/base.py): ``train.method`` names one.

The registry holds names and where each method's type lives, and imports a method only when it
is asked for, so the config (craft/run/config.py, at the bottom of the library) can check a name
against it without importing the training code. A package adds a method with
:func:`register_method` from its ``craft.plugins`` entry point (craft/plugins.py).
"""

from __future__ import annotations

import importlib

from craft import CraftError

# name -> "module:attribute" of the method's instance (each a craft.methods.base.Method)
_BUILTIN = {
    "craft": "craft.methods.craft:CRAFT",
    "sft": "craft.methods.sft:SFT",
    "dpo": "craft.methods.dpo:DPO",
    "grpo": "craft.methods.grpo:GRPO",
}
_TARGETS: dict[str, str] = dict(_BUILTIN)
_LOADED: dict = {}

BUILTIN_METHODS: tuple[str, ...] = tuple(_BUILTIN)


def register_method(name: str, target: str) -> None:
    """Make ``train.method: NAME`` load ``target`` ("package.module:ATTRIBUTE", an instance of
    craft.methods.base.Method)."""
    if ":" not in target:
        raise CraftError(f"register_method({name!r}, {target!r}): the target must read "
                         f"'package.module:ATTRIBUTE'")
    _TARGETS[name] = target
    _LOADED.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method's name (the built-in ones first)."""
    return tuple(_TARGETS)


def get_method(name: str):
    """The method called ``name`` (a craft.methods.base.Method)."""
    if name not in _TARGETS:
        raise CraftError(f"train.method: unknown method {name!r}; choose one of "
                         f"{', '.join(method_names())}")
    if name not in _LOADED:
        module, attr = _TARGETS[name].split(":")
        method = getattr(importlib.import_module(module), attr)
        if method.name != name:
            raise CraftError(f"method {_TARGETS[name]} calls itself {method.name!r}, but it is "
                             f"registered as {name!r}")
        _LOADED[name] = method
    return _LOADED[name]


__all__ = ["BUILTIN_METHODS", "get_method", "method_names", "register_method"]
