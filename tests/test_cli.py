"""The `craft` command line: resolved config output, one-line user errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import yaml

from craft import CraftError
from craft.cli.main import COMMANDS, main
from craft.run.config import config_from_dict, load_config


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "--set", "train.lr=5e-5", "--set", "filter.top_k=7"]) == 0
    out = capsys.readouterr().out
    cfg = config_from_dict(yaml.safe_load(out))
    assert cfg == load_config(overrides=["train.lr=5e-5", "filter.top_k=7"])


def test_config_show_with_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n")
    assert main(["config", "show", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 3


@pytest.mark.parametrize("argv, fragment", [
    (["config", "show", "--set", "train.lrr=1"], "unknown key in section 'train': 'train.lrr'"),
    (["config", "show", "missing.yaml"], "config file not found: missing.yaml"),
    (["config", "show", "--set", "train.micro_batch=5"], "must be a multiple"),
])
def test_user_errors_are_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("craft: error: ") and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_commands_registry_lists_config():
    assert "config" in COMMANDS


def test_toy_group_is_absent_without_the_toy_cli(monkeypatch):
    monkeypatch.setitem(sys.modules, "craft.toyworld.cli_toy", None)  # import fails
    with pytest.raises(SystemExit) as e:
        main(["toy", "demo"])
    assert e.value.code == 2  # argparse: invalid choice, not a stub that pretends to work


def test_commands_come_from_entry_points(monkeypatch, capsys):
    """Packages add `craft` commands through the craft.commands entry points (the studio and
    the toy world do); the library imports neither."""
    import importlib.metadata

    fake = types.ModuleType("fake_plugin")

    def register(subparsers):
        hello = subparsers.add_parser("hello")
        hello.add_argument("--fail", action="store_true")
        hello.set_defaults(handler=lambda args: fail() if args.fail else print("hi"))

    def fail():
        raise CraftError("no base model at assets/toy-base; run `craft toy train-base`")

    fake.register = register
    monkeypatch.setitem(sys.modules, "fake_plugin", fake)
    real = importlib.metadata.entry_points

    def entry_points(group=None, **kw):
        found = list(real(group=group, **kw))
        if group == "craft.commands":
            found.append(importlib.metadata.EntryPoint("hello", "fake_plugin:register", group))
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert main(["hello"]) == 0 and capsys.readouterr().out == "hi\n"
    assert main(["hello", "--fail"]) == 2
    assert "craft: error: no base model" in capsys.readouterr().err
    names = {e.name for e in real(group="craft.commands")}
    assert {"studio", "toy"} <= names


def test_the_library_imports_no_front_end_and_no_toy_world():
    """craft's core modules import neither the studio nor the toy world (they plug in)."""
    code = ("import sys, craft.cli.main, craft.stages.engine, craft.stages.prompts, craft.stages.expansion, "
            "craft.rewards, craft.run.config, craft.stages.filtering, craft.run.store; "
            "bad = [m for m in sys.modules if m.startswith(('studio', 'craft.toyworld', "
            "'gradio'))]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_entry_point(tmp_path):
    """The installed module path runs as a program (what the `craft` script calls)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH")]))}
    bad = subprocess.run([sys.executable, "-m", "craft.cli", "config", "show", "--set",
                          "model.dtype=fp32"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("craft: error: model.dtype: expected one of")
    assert "Traceback" not in bad.stderr
