"""The ``craft`` command line: one subcommand per pipeline stage, each a thin call into the library.

Adding a command: write ``_add_NAME(subparsers)`` that registers the subparser and sets
``handler=`` (a function ``args -> int | None``), then list it in ``COMMANDS`` (or, from
another package, register the function under the ``craft.commands`` entry-point group).
Handlers raise :class:`craft.CraftError` for anything the user can fix; ``main`` turns that into
a one-line message and exit code 2, so no traceback reaches a user for a typo; a stage stopped
on request exits 3 (see craft.cli.common).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from craft import CraftError, __version__
from craft.cli.common import EXIT_STOPPED, EXIT_USER_ERROR, add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

# Other packages (the studio, the toy world) add commands through this entry-point group: each
# entry point is a function ``register(subparsers)``. The library itself imports neither.
COMMAND_PLUGINS = "craft.commands"


# ------------------------------------------------------------------------------------ config


def _config_show(args: argparse.Namespace) -> int:
    from craft.run.config import config_to_yaml

    sys.stdout.write(config_to_yaml(config_from_args(args)))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from craft.stages.preflight import preflight

    plan = None
    if not args.no_plan:
        from craft.cli.plan import gpu_from_args

        plan = (args.gpus, gpu_from_args(args))
    checks = preflight(config_from_args(args), plan=plan)
    width = max(len(c.what) for c in checks)
    for c in checks:
        sys.stdout.write(f"{'ok     ' if c.ok else 'MISSING'}  {c.what:<{width}}  {c.detail}\n")
    bad = [c for c in checks if not c.ok]
    sys.stdout.write(f"{len(checks) - len(bad)} of {len(checks)} ready" +
                     (f"; fix the {len(bad)} MISSING line(s) before `craft run`\n" if bad
                      else "; `craft run` will find everything it reads\n"))
    return EXIT_USER_ERROR if bad else 0


def _add_config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect configs")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the resolved config (defaults + file + --set) as "
                                       "YAML; fails on unknown keys or invalid values")
    add_config_arguments(show, positional=True)
    show.set_defaults(handler=_config_show)
    check = sub.add_parser("check", help="check everything a run will read (base model, prompt "
                                         "files, expander, every reward's weights, training "
                                         "options) and list what is missing; reads no weights")
    add_config_arguments(check, positional=True)
    from craft.cli.plan import add_gpu_arguments

    add_gpu_arguments(check)
    check.add_argument("--no-plan", action="store_true",
                       help="skip the memory plan (the slowest check: ~1 min at 12 B)")
    check.set_defaults(handler=_config_check)


def _add_stages(subparsers: argparse._SubParsersAction) -> None:
    from craft.cli.stages import add_stage_commands

    add_stage_commands(subparsers)


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    from craft.cli.plan import register

    register(subparsers)


def _add_rehearse(subparsers: argparse._SubParsersAction) -> None:
    from craft.cli.rehearse import register

    register(subparsers)


def _add_serve_rewards(subparsers: argparse._SubParsersAction) -> None:
    from craft.cli.serve import add_serve_rewards

    add_serve_rewards(subparsers)


def _add_plugins(subparsers: argparse._SubParsersAction) -> None:
    """Commands registered by installed packages (``craft studio``, ``craft toy``)."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # a plugin whose dependencies are missing: say so, go on
            logger.debug("craft command %s unavailable: %s", ep.name, e)
            continue
        register(subparsers)


# Command name -> function that registers its subparser, in the order `craft --help` lists them.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "config": _add_config,
    "stages": _add_stages,
    "plan": _add_plan,
    "rehearse": _add_rehearse,
    "plugins": _add_plugins,
    "serve-rewards": _add_serve_rewards,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="craft", description="CRAFT Studio: align text-to-image diffusion models with "
                                  "human preference by reward-filtered, advantage-weighted SFT.")
    parser.add_argument("--version", action="version", version=f"craft-studio {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS.values():
        register(subparsers)
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under a multi-process launch only the main process logs below WARNING (one log, not N).
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    if _rank() > 0 and args.verbose < 2:
        level = logging.WARNING
    prefix = f"[rank {_rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args) or 0
    except (CraftError, OSError) as e:  # OSError: unreadable file, full disk, no permission...
        if args.verbose >= 2:
            raise
        from craft.stages.engine import StageStopped

        message = " ".join(str(e).split())
        if isinstance(e, StageStopped):
            print(f"craft: stopped: {message}", file=sys.stderr)
            return EXIT_STOPPED
        print(f"craft: error: {message} (-vv shows the traceback)" if isinstance(e, OSError)
              else f"craft: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the launch's process group cleanly (torch warns at exit otherwise)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
