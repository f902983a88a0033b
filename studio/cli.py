"""``craft studio``: argument parsing without importing Gradio (the ``craft`` CLI registers every
command on each call, so this module must stay cheap; the app is imported by the handler)."""

from __future__ import annotations

import argparse
import logging
import os

from craft import CraftError

logger = logging.getLogger(__name__)

from studio.defaults import DEFAULT_MAX_UPLOAD, DEFAULT_PORT, DEFAULT_RUN_DIR, LOCAL_HOSTS


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` -> (user, password); None when not given."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise CraftError("--auth must be USER:PASSWORD (both non-empty), e.g. --auth me:s3cret; "
                         "or set CRAFT_STUDIO_AUTH=USER:PASSWORD")
    return user, password


def add_studio_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help=f"run directory to open or create (default: {DEFAULT_RUN_DIR})")
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config (default: the run's saved studio settings, else "
                             "configs/toy.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 "
                             "exposes the studio to the network, use --auth then)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="require a login (or set CRAFT_STUDIO_AUTH=USER:PASSWORD, which keeps "
                             "the password out of the process list)")
    parser.add_argument("--runs-root", default=None, metavar="DIR",
                        help="serve only run directories under DIR: a browser can open or "
                             "create runs there and nowhere else (relative run paths are taken "
                             "inside it)")
    parser.add_argument("--max-upload", default=DEFAULT_MAX_UPLOAD,
                        help=f"largest accepted upload, e.g. 5mb (default {DEFAULT_MAX_UPLOAD})")
    parser.add_argument("--jobs-per-device", type=int, default=None, metavar="N",
                        help="heavy jobs (generate, score, train, evaluate, the pool map, the "
                             "whole loop) run at once per device (the CPU, each GPU); the "
                             "others wait in line (default 1, or "
                             "$CRAFT_STUDIO_JOBS_PER_DEVICE; 0 = no limit)")


def studio_command(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth or os.environ.get("CRAFT_STUDIO_AUTH"))
    if args.host not in LOCAL_HOSTS and auth is None:
        logger.warning("binding %s without --auth: anyone who can reach this port can use the "
                       "studio", args.host)
    from craft.run.distributed import setup_process
    from studio.app import build_app, launch
    from studio.jobs import JOBS, per_device_setting

    per_device = per_device_setting(getattr(args, "jobs_per_device", None))
    setup_process()
    JOBS.configure(per_device=per_device)

    app = build_app(args.run_dir, args.config, args.overrides, runs_root=args.runs_root)
    print(f"CRAFT Studio on http://{args.host}:{args.port} · run {app.ctx.run_dir}"
          + (f" · runs under {app.studio.runs_root}" if app.studio.runs_root else "")
          + f" · heavy jobs: {per_device or 'no limit'} at a time per device "
            f"({', '.join(JOBS.queue.devices)})",
          flush=True)
    launch(app, args.host, args.port, auth, args.max_upload, block=True)
    return 0


def add_studio_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "studio", help="open the CRAFT Studio web app (Gradio) on a run directory",
        description="The interactive studio: prompts, generation, scoring, live curation, "
                    "groups, training and base-vs-tuned comparison in one browser page. Binds "
                    "127.0.0.1 unless --host says otherwise.")
    add_studio_arguments(parser)
    parser.set_defaults(handler=studio_command)


__all__ = ["DEFAULT_RUN_DIR", "add_studio_arguments", "add_studio_parser", "parse_auth",
           "studio_command"]
