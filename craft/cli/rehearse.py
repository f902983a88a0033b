"""``craft rehearse CONFIG``: a dress rehearsal of the run at its real sizes, random weights,
tiny counts, checking the plan against what it measures (craft/stages/rehearsal.py).

On a GPU it is the one-minute check before a day-long run: every model and reward of the config
at its real size goes through every stage of ``craft run`` (generate, score, filter, train with
a checkpoint saved and loaded back, publish, evaluate), and each stage's peak memory is set
beside ``craft plan``'s. On a CPU it proves the code paths at the real sizes. Exit 0: it all ran
and the plan holds within its margin; 5: a stage broke (named); 6: the plan is off by more than
its margin at some stage (named); 2: the config or the options are wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from craft.cli.common import add_config_arguments, config_from_args


def default_run_dir(args, cfg, device: str) -> Path:
    stem = Path(args.config).stem if args.config else "toy"
    tag = f"{stem}-{cfg.train.method}{'-lora' if cfg.train.lora else ''}-{device}"
    return Path("runs") / "rehearsal" / tag


def _fresh(run_dir: Path) -> None:
    """A rehearsal starts from an empty run: a folder a rehearsal left is cleared; any other
    non-empty folder is refused (it is not ours to delete)."""
    import shutil

    from craft import CraftError

    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / "rehearsal").is_dir():
        raise CraftError(f"--run-dir {run_dir} holds something other than a rehearsal; give "
                         "an empty or new folder")
    shutil.rmtree(run_dir)


def cmd_rehearse(args) -> int:
    import os

    import torch

    from craft.stages.rehearsal import Counts, full_batch_counts, rehearse
    from craft.stages.rehearsal_report import checks_table, extra_table

    overrides = list(args.overrides) + ([f"train.method={args.method}"] if args.method else [])
    args.overrides = overrides
    cfg = config_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args, cfg, device)
    if int(os.environ.get("RANK", "0")) == 0:
        _fresh(run_dir)
    counts = Counts(args.prompts, args.variants, args.seeds, args.sampler_steps,
                    args.eval_prompts)
    full = args.full_batches if args.full_batches is not None else device == "cuda"
    if full:
        counts = full_batch_counts(cfg, counts, int(os.environ.get("WORLD_SIZE", "1")))
    out = rehearse(cfg, run_dir, counts=counts, device=device, margin=args.margin,
                   cache_dir=args.cache, keep_weights=args.keep_weights,
                   name=args.config or "configs/toy.yaml")
    if out is None:  # not the main process
        return 0
    print(checks_table(out, markdown=False))
    if out.extra:
        print("\n" + extra_table(out, markdown=False))
    print(f"\n{out.verdict()}\nreport: {run_dir / 'rehearsal' / 'report.md'} (and report.json)")
    if out.failure is not None:
        print(f"\n{out.failure.trace.strip()}", file=sys.stderr)
    return out.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    from craft.run.choices import TRAIN_METHODS

    p = subparsers.add_parser(
        "rehearse", help="a dress rehearsal of the run at its real sizes: random weights of "
                         "every model and reward, tiny counts, every stage of `craft run`; each "
                         "stage's measured peak memory and time beside the plan's",
        description=__doc__.split("\n\n")[0])
    add_config_arguments(p, positional=True)
    p.add_argument("--method", choices=TRAIN_METHODS, default=None,
                   help="the training method to rehearse (default the config's)")
    p.add_argument("--run-dir", default=None,
                   help="where the rehearsal runs (default runs/rehearsal/CONFIG-METHOD-DEVICE; "
                        "cleared first when a rehearsal left it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: CUDA when there is a GPU, else the CPU")
    c = p.add_argument_group("how much it runs (tiny counts; resolution, dtype and the "
                             "models stay real)")
    c.add_argument("--prompts", type=int, default=2, help="training prompts (default 2)")
    c.add_argument("--variants", type=int, default=1, help="variants a prompt (default 1)")
    c.add_argument("--seeds", type=int, default=1, help="seeds a (prompt, variant) (default 1)")
    c.add_argument("--sampler-steps", type=int, default=2, help="sampler steps (default 2)")
    c.add_argument("--eval-prompts", type=int, default=1,
                   help="evaluation prompts (default 1: one base / tuned image pair)")
    c.add_argument("--full-batches", dest="full_batches", action="store_true", default=None,
                   help="enough prompts to fill every batch of the config, so the peaks are "
                        "those of the real batch sizes (default on a GPU)")
    c.add_argument("--one-image-batches", dest="full_batches", action="store_false",
                   help="every batch one image (default on a CPU)")
    p.add_argument("--margin", type=float, default=None, metavar="F",
                   help="relative tolerance of the check instead of the plan's stated margin "
                        "(e.g. 0.05; 0 = exact)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where the random weights are built and kept (default "
                        "$CRAFT_REHEARSAL_CACHE or ~/.cache/craft/rehearsal)")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep the checkpoints and the tuned model the rehearsal trained "
                        "(random weights; deleted by default)")
    p.set_defaults(handler=cmd_rehearse)


__all__ = ["cmd_rehearse", "default_run_dir", "register"]
