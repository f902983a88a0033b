"""``craft serve-rewards --rewards NAME[,NAME]``: serve registered rewards over HTTP from this
process (its environment, its GPU), for runs elsewhere that name them in ``rewards.remote``
(craft/rewards/server.py; the client: craft/rewards/remote.py).

Listens on 127.0.0.1 unless ``--host`` says otherwise; ``--token-env VAR`` (or ``--token``)
makes every request carry that token. Runs until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from craft import CraftError

log = logging.getLogger(__name__)
TOKEN_ENV = "CRAFT_REWARD_TOKEN"


def _serve(args: argparse.Namespace) -> int:
    from craft.rewards.server import RewardServer
    from craft.rewards import load_reward

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    if not names:
        raise CraftError("--rewards: name at least one reward, e.g. --rewards hpsv21,pickscore")
    token = args.token or os.environ.get(args.token_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise CraftError(f"--host {args.host} serves other machines: give a token (--token-env "
                         f"VAR with the token in $VAR, default ${TOKEN_ENV}) so only runs that "
                         "know it can score")
    if args.read_timeout < 0:
        raise CraftError(f"--read-timeout {args.read_timeout:g}: seconds >= 0 (0: never)")
    paths = dict(p.split("=", 1) for p in args.path)
    rewards = {n: load_reward(n, device=args.device, batch_size=args.batch_size,
                              path=paths.get(n)) for n in names}
    server = RewardServer(rewards, host=args.host, port=args.port, token=token,
                          max_images=args.max_images, read_timeout=args.read_timeout or None)
    sys.stdout.write(f"serving {', '.join(names)} at {server.url} "
                     f"({'token required' if token else 'no token'}); Ctrl-C stops\n"
                     f"in a run's config: rewards.remote: {{{names[0]}: {{url: {server.url}"
                     + (f", token_env: {args.token_env}" if token else "") + "}}\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def add_serve_rewards(subparsers: argparse._SubParsersAction) -> None:
    from craft.rewards.server import READ_TIMEOUT_S
    from craft.rewards.wire import MAX_IMAGES

    p = subparsers.add_parser("serve-rewards", help="serve rewards over HTTP for runs elsewhere "
                              "(rewards.remote)", description=__doc__.split("\n\n")[0])
    p.add_argument("--rewards", required=True, metavar="NAME[,NAME]",
                   help="registered rewards to serve (`craft plugins` lists them)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1: this machine only; 0.0.0.0 needs a token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    p.add_argument("--token", default=None, help="token every request must carry (prefer "
                   "--token-env: a command line is visible to other users)")
    p.add_argument("--token-env", default=TOKEN_ENV, metavar="VAR",
                   help=f"environment variable holding the token (default {TOKEN_ENV})")
    p.add_argument("--device", default="auto", help="device for the reward models")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES,
                   help=f"images per request at most (default {MAX_IMAGES})")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
                   help=f"close a connection that sends nothing for this long, e.g. a request "
                        f"whose body never comes (default {READ_TIMEOUT_S:g}; 0: never)")
    p.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                   help="a reward's local checkpoint (as rewards.paths)")
    p.set_defaults(handler=_serve)


__all__ = ["add_serve_rewards"]
