"""The code's shape, kept: no import cycle (imports inside functions count), the run's config and
store at the bottom, no branching on a training method's name outside craft/methods/ and the
config, no long functions outside Gradio layout, and a method registry the config agrees with."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("craft", "studio")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of craft/studio it imports anywhere in its text."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg
                                                                                   else 0)]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    graph[mod].add(n)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycles(_imports(_modules())) == []


def test_the_run_is_at_the_bottom():
    """craft/run (config, store, layout, ...) imports nothing above it."""
    graph = _imports(_modules())
    above = ("craft.models", "craft.stages", "craft.methods", "craft.planning", "craft.cli",
             "craft.rewards", "craft.toyworld", "studio")
    # the method registry is a name table importing nothing above craft (checked below): the
    # config checks train.method against it
    bad = {m: sorted(d for d in deps if d.startswith(above) and d != "craft.methods.registry")
           for m, deps in graph.items() if m.startswith("craft.run")}
    assert {m: d for m, d in bad.items() if d} == {}


METHOD_NAME = re.compile(r"""(==|!=)\s*['"](craft|sft|dpo|grpo)['"]|['"](craft|sft|dpo|grpo)['"]\s*(==|!=)"""
                         r"""|method\)?\s+(not\s+)?in\s*[\(\[\{]""")


def test_nothing_outside_the_methods_branches_on_a_method_name():
    """A layer asks the method (craft.methods.registry.get_method) what it trains on, how it is
    planned and described; only the methods package and the config's cross-checks name them."""
    allowed = ("craft/methods/", "craft/run/config.py")
    found = []
    for path in [*ROOT.joinpath("craft").rglob("*.py"), *ROOT.joinpath("studio").rglob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(allowed):
            continue
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if METHOD_NAME.search(line) and "logger" not in line and "settings key" not in line:
                found.append(f"{rel}:{k}: {line.strip()}")
    # studio/jobs.py's logger names and studio/context.py's settings key are not method names
    found = [f for f in found if not f.startswith(("studio/jobs.py", "studio/context.py"))]
    assert found == []


def test_no_function_over_80_lines_outside_gradio_layout():
    """A Gradio tab's ``__init__`` declares its layout (declarative); every other function stays
    short enough to read at once."""
    long = []
    for path in [*ROOT.joinpath("craft").rglob("*.py"), *ROOT.joinpath("studio").rglob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                layout = rel.startswith("studio/tabs/") and node.name == "__init__"
                if n > 80 and not layout:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_the_method_registry_imports_nothing_above_craft():
    graph = _imports(_modules())
    assert graph["craft.methods.registry"] <= {"craft"}


def test_the_config_offers_exactly_the_registered_methods():
    from craft.methods.registry import get_method, method_names
    from craft.run.config import field_choices

    assert tuple(field_choices("train", "method")) == method_names()
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.title and m.data in ("kept", "pairs", "prompts")


def test_an_unknown_method_is_refused_with_the_choices():
    from craft import CraftError
    from craft.methods.registry import get_method

    with pytest.raises(CraftError, match="unknown method 'ppo'.*craft, sft, dpo, grpo"):
        get_method("ppo")
