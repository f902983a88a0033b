"""``craft toy ...``: train the toy base model, and a quick look at what it draws.

Imported on every ``craft`` call, so heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from craft import CraftError
from craft.run.config import PROJECT_ROOT

DEFAULT_MODEL = PROJECT_ROOT / "assets" / "toy-base"
DEFAULT_MODELS = {"sd15": DEFAULT_MODEL, "sd3": PROJECT_ROOT / "assets" / "toy-flow"}


def _train_base(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from tqdm import tqdm

    from .train_base import BaseTrainConfig, train_base

    cfg = BaseTrainConfig.for_family(args.family)
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(BaseTrainConfig)}
        if key not in fields:
            raise CraftError(f"--set {item}: unknown train-base setting {key!r}; known: "
                             f"{sorted(fields)}")
        kind = type(getattr(cfg, key))
        overrides[key] = value if kind is str else kind(
            float(value) if "e" in value or "." in value else value)
    cfg = dataclasses.replace(cfg, **overrides)
    out = Path(args.out or DEFAULT_MODELS[args.family])
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    logging.getLogger("craft").setLevel(logging.INFO)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, total: int, metrics: dict) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total, desc=phase, initial=step - 1, unit="step",
                                     dynamic_ncols=True)
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    result = train_base(out, work, cfg, progress)
    for bar in bars.values():
        bar.close()
    if result is None:
        print(f"stopped early; rerun the same command to resume from {work}")
        return 1
    print(f"saved the toy base model to {out} (checkpoints and caches in {work})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from craft.stages.generation import SamplingParams, generate_images
    from craft.models.loading import load_pipeline
    from .grammar import rich_caption, toy_prompt_split
    from .rewards import TOY_REWARDS

    from craft.run.distributed import setup_process


    setup_process()  # flush denormals (the rule lives there)
    pipe = load_pipeline(args.model)
    _, held = toy_prompt_split()
    prompts = held[: args.prompts]
    params = SamplingParams(num_inference_steps=args.steps, guidance_scale=args.guidance)
    seeds = list(range(args.seeds))
    rows = []
    for kind, texts in (("plain", prompts), ("rich", [rich_caption(p) for p in prompts])):
        flat = [t for t in texts for _ in seeds]
        images = [im for _, b in generate_images(pipe, flat, seeds * len(texts), params)
                  for im in b]
        scores = {n: f([np.asarray(i) for i in images], [p for p in prompts for _ in seeds])
                  for n, f in TOY_REWARDS.items()}
        rows.append((kind, images, scores))
    print(f"{'prompts':8s} " + " ".join(f"{n:>14s}" for n in TOY_REWARDS))
    for kind, _, scores in rows:
        print(f"{kind:8s} " + " ".join(f"{scores[n].mean():14.3f}" for n in TOY_REWARDS))
    from PIL import Image

    cell, n = 96, len(seeds)
    sheet = Image.new("RGB", (2 * n * cell + 16, len(prompts) * cell), "white")
    for (kind, images, _), x0 in zip(rows, (0, n * cell + 16)):
        for k, im in enumerate(images):
            sheet.paste(im.resize((cell, cell), Image.NEAREST),
                        (x0 + (k % n) * cell, (k // n) * cell))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}: each row one held-out prompt; left plain, right its rich rewrite "
          "(same seeds)")
    return 0


def add_toy_subparsers(sub: argparse._SubParsersAction) -> None:
    tb = sub.add_parser("train-base", help="train the toy base model from scratch (seeded, "
                                            "resumable; ~45 min on 2 CPU cores)")
    tb.add_argument("--family", choices=sorted(DEFAULT_MODELS), default="sd15",
                    help="sd15: the UNet base (SD1.5 classes); sd3: the flow-matching MMDiT base "
                         "(SD3 classes, on the UNet base's VAE)")
    tb.add_argument("--out", default=None,
                    help="where to save the diffusers pipeline (default: assets/toy-base, "
                         "or assets/toy-flow for --family sd3)")
    tb.add_argument("--work-dir", default=None,
                    help="checkpoints and caches; a rerun resumes from here "
                         "(default: OUT.work next to OUT)")
    tb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a BaseTrainConfig field, e.g. --set unet_steps=2000")
    tb.set_defaults(handler=_train_base)

    demo = sub.add_parser("demo", help="draw held-out plain prompts and their rich rewrites with "
                                       "the toy model, score them, save a PNG sheet")
    demo.add_argument("--model", default=str(DEFAULT_MODEL))
    demo.add_argument("--prompts", type=int, default=8)
    demo.add_argument("--seeds", type=int, default=6)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--guidance", type=float, default=3.0)
    demo.add_argument("--out", default="toy_demo.png")
    demo.set_defaults(handler=_demo)


def register(subparsers: argparse._SubParsersAction) -> None:
    """``craft toy ...`` (registered through the ``craft.commands`` entry points)."""
    parser = subparsers.add_parser("toy", help="the embedded toy world (base model, demo)")
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)
    add_toy_subparsers(sub)
