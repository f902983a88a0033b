"""The ``craft`` command line: one subcommand per pipeline stage, each a thin call into the library.

Adding a command: write ``_add_NAME(subparsers)`` that registers the subparser and sets
``handler=`` (a function ``args -> int | None``), then list it in ``COMMANDS``. Handlers raise
:class:`craft.CraftError` for anything the user can fix; ``main`` turns that into a one-line
message and exit code 2, so no traceback reaches a user for a typo.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from craft import CraftError, __version__

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


def add_config_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """The config options every pipeline command shares: a YAML file and ``--set`` overrides."""
    help_text = "YAML config (default: configs/toy.yaml)"
    if positional:
        parser.add_argument("config", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--config", "-c", default=None, help=help_text)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), e.g. --set train.lr=5e-5; "
                             "repeatable")


def config_from_args(args: argparse.Namespace):
    """The resolved :class:`craft.config.CraftConfig` for parsed ``add_config_arguments``."""
    from craft.config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------------------------ config


def _config_show(args: argparse.Namespace) -> int:
    from craft.config import config_to_yaml

    sys.stdout.write(config_to_yaml(config_from_args(args)))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from craft.preflight import preflight

    checks = preflight(config_from_args(args))
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
    check.set_defaults(handler=_config_check)


# ------------------------------------------------------------------------------------ toy


def _add_toy(subparsers: argparse._SubParsersAction) -> None:
    """The toy world's commands live in craft.toyworld; register the group only if it exists.

    ``add_toy_subparsers(sub)`` adds actions to ``sub`` and sets ``handler`` on each. It runs
    for every ``craft`` invocation, so cli_toy must import heavy modules inside its handlers.
    """
    try:
        from craft.toyworld.cli_toy import add_toy_subparsers
    except ModuleNotFoundError as e:
        if e.name not in ("craft.toyworld", "craft.toyworld.cli_toy"):
            raise  # a real missing dependency inside the toy world: show it
        logger.debug("toy world commands unavailable: %s", e)
        return
    parser = subparsers.add_parser("toy", help="the embedded toy world (base model, demo)")
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)
    add_toy_subparsers(sub)


def _add_stages(subparsers: argparse._SubParsersAction) -> None:
    from craft.cli_stages import add_stage_commands

    add_stage_commands(subparsers)


def _add_studio(subparsers: argparse._SubParsersAction) -> None:
    """``craft studio``: the Gradio app; its arguments live in studio.cli (no Gradio import)."""
    from studio.cli import add_studio_parser

    add_studio_parser(subparsers)


# Command name -> function that registers its subparser, in the order `craft --help` lists them.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "config": _add_config,
    "stages": _add_stages,
    "toy": _add_toy,
    "studio": _add_studio,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args) or 0
    except (CraftError, OSError) as e:  # OSError: unreadable file, full disk, no permission...
        if args.verbose >= 2:
            raise
        message = " ".join(str(e).split())
        print(f"craft: error: {message} (-vv shows the traceback)" if isinstance(e, OSError)
              else f"craft: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
