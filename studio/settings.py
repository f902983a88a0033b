"""Config <-> UI bindings, so the studio's settings round-trip through a YAML that ``craft run``
accepts.

Each tab binds its controls to config keys (``train.lr``, ``filter.weights.toy_fidelity``...).
:meth:`Settings.config_from` turns the controls' current values into a validated
:class:`CraftConfig` (over the current config, so unbound fields keep their values), and
:meth:`Settings.values_from` turns a loaded config back into control values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from craft.run.config import ConfigError, CraftConfig, config_from_dict, config_to_dict


def _identity(v: Any) -> Any:
    return v


def optional_int(v: Any) -> int | None:
    """UI 0 / empty means "no limit" (None) for fields such as prompts.max_prompts."""
    if v is None or v == "" or (isinstance(v, (int, float)) and int(v) == 0):
        return None
    return int(v)


def none_as_zero(v: Any) -> Any:
    return 0 if v is None else v


def as_int(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def lines_to_list(v: Any) -> list[str]:
    return [line.strip() for line in str(v or "").splitlines() if line.strip()]


def list_to_lines(v: Any) -> str:
    return "\n".join(v or ())


@dataclass
class Binding:
    key: str  # section.name or section.name.entry (one entry of a mapping field)
    component: Any
    to_ui: Callable[[Any], Any] = _identity
    from_ui: Callable[[Any], Any] = _identity
    persisted_by: str | None = None  # a tab that saves this value with its own event


class Settings:
    """The registry of bound controls."""

    def __init__(self) -> None:
        self.bindings: list[Binding] = []

    def bind(self, key: str, component: Any, to_ui: Callable = _identity,
             from_ui: Callable = _identity, persisted_by: str | None = None) -> Any:
        if key.count(".") not in (1, 2):
            raise ValueError(f"binding key {key!r} must be section.name[.entry]")
        self.bindings.append(Binding(key, component, to_ui, from_ui, persisted_by))
        return component

    @property
    def components(self) -> list[Any]:
        return [b.component for b in self.bindings]

    def values_from(self, cfg: CraftConfig) -> list[Any]:
        data = config_to_dict(cfg)
        out = []
        for b in self.bindings:
            section, name, *entry = b.key.split(".")
            value = data[section][name]
            if entry:
                value = value.get(entry[0], 0.0)
            out.append(b.to_ui(value))
        return out

    def config_from(self, base: CraftConfig, values: list[Any] | tuple[Any, ...]) -> CraftConfig:
        """``base`` with every bound key set from ``values``; raises ConfigError if invalid."""
        if len(values) != len(self.bindings):
            raise ValueError(f"expected {len(self.bindings)} values, got {len(values)}")
        data = config_to_dict(base)
        for b, v in zip(self.bindings, values):
            section, name, *entry = b.key.split(".")
            v = as_int(b.from_ui(v)) if not isinstance(v, bool) else v
            if entry:
                data[section][name] = {**data[section][name], entry[0]: float(v or 0.0)}
            else:
                data[section][name] = v
        # A weight of 0 keeps a reward out of the composite; the filter wants it absent then
        # only if every weight is 0 (which is an error the user should see).
        return config_from_dict(data, "the studio's settings")

    def config_with(self, base: CraftConfig, key: str, value: Any) -> CraftConfig:
        """``base`` with the one bound ``key`` set from its control's ``value``."""
        values = self.values_from(base)
        values[self.index(key)] = value
        return self.config_from(base, values)

    def component(self, key: str) -> Any:
        """The control bound to ``key``."""
        return self.bindings[self.index(key)].component

    def index(self, key: str) -> int:
        for i, b in enumerate(self.bindings):
            if b.key == key:
                return i
        raise KeyError(key)


class UiState:
    """Controls whose values are not config but are saved with the run all the same (the Train
    form's run name, the chosen views and checkpoint, processes per stage): key -> control,
    with the value shown when the run has none saved."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Any, Any]] = {}

    def bind(self, key: str, component: Any, default: Any = None) -> Any:
        if key in self._items:
            raise ValueError(f"UI state key {key!r} is bound twice")
        self._items[key] = (component, default)
        return component

    def items(self) -> list[tuple[str, Any]]:
        return [(k, c) for k, (c, _) in self._items.items()]

    @property
    def components(self) -> list[Any]:
        return [c for c, _ in self._items.values()]

    def values_from(self, state: dict[str, Any]) -> list[Any]:
        """Control values for a run's saved UI state; unsaved keys keep the control as it is."""
        import gradio as gr

        return [state[k] if k in state else (d if d is not None else gr.skip())
                for k, (_, d) in self._items.items()]


__all__ = ["Binding", "ConfigError", "Settings", "UiState", "as_int", "lines_to_list", "list_to_lines",
           "none_as_zero", "optional_int"]
