"""Config <-> UI bindings, so the studio's settings round-trip through a YAML that ``craft run``
accepts.

Each tab binds its controls to config keys (``train.lr``, ``filter.weights.toy_fidelity``...).
:meth:`Settings.config_from` turns the controls' current values into a validated
:class:`CraftConfig` (over the current config, so unbound fields keep their values), and
:meth:`Settings.values_from` turns a loaded config back into control values.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Callable

import gradio as gr

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


class _CheckedHere:
    """Marks a control whose typed value the studio checks itself (see :func:`unchecked`)."""


class UncheckedNumber(gr.Number, _CheckedHere):
    """A ``gr.Number`` whose value reaches the handler as typed. Gradio's own bound check
    failed the whole event with a bare "Error" (nothing saved, nothing said, the box showing a
    value that was not saved); the studio says what is wrong instead (:func:`control_problem`)
    and puts the saved value back."""

    is_template = True  # the page draws it as a plain gr.Number

    def preprocess(self, payload: Any) -> Any:
        return _as_typed(payload, self.precision)


class UncheckedSlider(gr.Slider, _CheckedHere):
    """A ``gr.Slider`` whose typed value (its number box takes any number) reaches the handler
    as typed; see :class:`UncheckedNumber`."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return _as_typed(payload, self.precision)


def _as_typed(payload: Any, precision: int | None) -> Any:
    if payload is None or payload == "":
        return None
    if isinstance(payload, str):
        try:
            payload = float(payload)
        except ValueError:
            return payload  # not a number: control_problem says so
    if precision == 0 and isinstance(payload, float) and payload.is_integer():
        return int(payload)
    return payload


def unchecked(component: Any) -> Any:
    """``component`` (a bound gr.Number / gr.Slider) made to pass typed values through, so a
    value outside its bounds or not a number gets a message rather than Gradio's bare error."""
    if isinstance(component, _CheckedHere):
        return component
    if isinstance(component, gr.Slider):
        component.__class__ = UncheckedSlider
    elif isinstance(component, gr.Number):
        component.__class__ = UncheckedNumber
    return component


def label_of(component: Any, key: str) -> str:
    """How the page names a control: its label, else the config key."""
    label = getattr(component, "label", None)
    return str(label) if label else key


def shown(value: Any) -> str:
    """A control value as the page shows it in a message."""
    if value is None or value == "":
        return "an empty box"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def bounds_text(component: Any) -> str:
    lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
    whole = getattr(component, "precision", None) == 0
    kind = "a whole number" if whole else "a number"
    if lo is not None and hi is not None:
        return f"{kind} from {shown(float(lo))} to {shown(float(hi))}"
    if lo is not None:
        return f"{kind} of at least {shown(float(lo))}"
    if hi is not None:
        return f"{kind} of at most {shown(float(hi))}"
    return kind


def control_problem(component: Any, value: Any) -> str | None:
    """What is wrong with ``value`` typed into a number box or a slider's box (not a number,
    outside the control's bounds, not whole where it must be), or None. The config's own
    checks come after (Settings.config_with)."""
    if not isinstance(component, (gr.Number, gr.Slider)):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
    lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
    if not number or (lo is not None and value < lo) or (hi is not None and value > hi) or (
            getattr(component, "precision", None) == 0 and float(value) != int(value)):
        return f"must be {bounds_text(component)}"
    return None


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
        self.bindings.append(Binding(key, unchecked(component), to_ui, from_ui, persisted_by))
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
        self._items[key] = (unchecked(component), default)
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


__all__ = ["Binding", "ConfigError", "Settings", "UiState", "UncheckedNumber", "UncheckedSlider",
           "as_int", "bounds_text", "control_problem", "label_of", "lines_to_list",
           "list_to_lines", "none_as_zero", "optional_int", "shown", "unchecked"]
