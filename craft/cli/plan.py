"""``craft plan CONFIG``: will this run fit, and how long will it take, before GPUs are reserved.

The plan runs every stage of the config at its real size on fake tensors (craft.planning), so it
needs neither a GPU nor the weights. Exit 0: every stage fits; exit 4: some stage does not
(each with the cheapest ``--set`` that fits, or the number of GPUs sharding needs); exit 2: the
config or the options are wrong.
"""

from __future__ import annotations

import argparse
import json
import sys

from craft.cli.common import add_config_arguments, config_from_args

EXIT_DOES_NOT_FIT = 4


def add_gpu_arguments(parser: argparse.ArgumentParser, gpus_default: int | None = 1) -> None:
    """The GPUs to plan for (shared by `craft plan`, `craft config check` and `craft run`)."""
    from craft.planning.hardware import DEFAULT_GPU, GPUS

    g = parser.add_argument_group("the GPUs to plan for")
    g.add_argument("--gpus", type=int, default=gpus_default, metavar="N",
                   help="GPUs the run will use (processes of `accelerate launch`)"
                        + (f"; default {gpus_default}" if gpus_default else ""))
    g.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="memory of each GPU in GiB (with --gpu: overrides its memory)")
    g.add_argument("--gpu", default=None, metavar="NAME",
                   help=f"a known GPU ({', '.join(GPUS)}; default {DEFAULT_GPU}, "
                        "or the CUDA device here when there is one)")
    g.add_argument("--utilization", type=float, default=None, metavar="F",
                   help="fraction of the GPU's peak FLOP/s the time estimate assumes "
                        "(default 0.35)")


def gpu_from_args(args):
    """The Gpu of ``--gpu`` / ``--gpu-memory``, else the local CUDA device's memory, else the
    default H100."""
    from craft.planning.hardware import local_gpu, resolve_gpu

    if args.gpu is None and args.gpu_memory is None:
        return local_gpu() or resolve_gpu(None, None)
    return resolve_gpu(args.gpu, args.gpu_memory)


def cmd_plan(args) -> int:
    from craft.planning import make_plan
    from craft.planning.hardware import DEFAULT_UTILIZATION

    cfg = config_from_args(args)
    plan = make_plan(cfg, gpus=args.gpus, gpu=gpu_from_args(args),
                     utilization=args.utilization or DEFAULT_UTILIZATION)
    sys.stdout.write(plan.table(markdown=args.markdown) + "\n")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plan_record(plan), indent=1))
    return 0 if plan.fits else EXIT_DOES_NOT_FIT


def plan_record(plan) -> dict:
    """The plan as plain data (``--json``; benchmarks/real_scale.py)."""
    import dataclasses

    out = dataclasses.asdict(plan)
    out["gpu"] = dataclasses.asdict(plan.gpu)
    out["fits"] = plan.fits
    for s, rec in zip(plan.stages, out["stages"]):
        rec.update(simulated=s.simulated, needed=s.needed)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory and time of every stage of a config at its real size, "
                     "simulated on fake tensors (no GPU, no weights): fits or not, and the "
                     "cheapest change that fits",
        description=__doc__.split("\n\n")[0])
    add_config_arguments(p, positional=True)
    add_gpu_arguments(p)
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    p.set_defaults(handler=cmd_plan)


__all__ = ["EXIT_DOES_NOT_FIT", "add_gpu_arguments", "gpu_from_args", "plan_record", "register"]
