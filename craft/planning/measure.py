"""The plan checked against a real run on this machine: the same tracker (craft.planning.memtrack) on the
real tensors of ``craft.methods.training.train``, so a difference is a difference between what the plan
simulates and what the training loop holds, not between two ways of counting.

What is counted, as the plan counts it for a GPU: everything training creates (the trainable
weights, the encoded set, AdamW, the EMA, gradients, activations) plus the frozen denoiser when
it stays on the device (LoRA; full fine-tuning with the anchor). Not counted: the text encoders
and the VAE, which leave the GPU once the set is encoded (on a CPU there is nowhere to move
them, so they stay; the plan is about the GPU).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from craft.planning.memtrack import MemoryTracker

GIB = 2 ** 30


@dataclasses.dataclass
class Measured:
    peak_bytes: int  # steady-state step: the peak over steps 2..N
    by_category: dict[str, int]
    steps: int


def measure_training_step(cfg, frame, out_dir, pipe) -> Measured:
    """Train ``cfg`` on ``frame`` (``cfg.train.steps`` >= 2) with the tracker on; the peak of
    the steps after the first (the first allocates AdamW's moments). Methods craft, sft and
    dpo (GRPO samples its own data: its plan is not measured here)."""
    from craft.models.families import denoiser
    from craft.methods.training import TrainCallbacks, train

    if cfg.train.steps < 2:
        raise ValueError("measure at least 2 steps: the first one allocates AdamW's state")
    from craft.methods.registry import get_method

    method = get_method(cfg.train.method)
    if method.online:
        raise ValueError(f"train.method={method.name} samples its own data: its step is not "
                         "measured here (measure an offline method: craft, sft or dpo)")
    tracker = MemoryTracker()
    if cfg.train.lora or method.needs_base(cfg):  # the frozen base stays
        tracker.track_module(denoiser(pipe), trainable="weights")
    # pairs: consecutive images as (winner, loser); memory does not depend on which
    pairs = (np.arange(len(frame) // 2 * 2).reshape(-1, 2) if method.data == "pairs"
             else None)
    seen: dict = {}

    def on_step(step, total, metrics):
        if step == 1:
            tracker.reset_peak()
        else:
            seen["peak"] = tracker.peak
            seen["parts"] = dict(tracker.peak_by_category)
            seen["steps"] = step

    with tracker:
        train(cfg, frame, out_dir, pipe=pipe, callbacks=TrainCallbacks(on_step=on_step),
              pairs=pairs)
    return Measured(seen["peak"], seen["parts"], seen["steps"])


def random_frame(folder, n: int, size: int):
    """``n`` random training images of ``size`` px (memory does not depend on their content)
    as a training frame."""
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return pd.DataFrame({"image_path": paths, "prompt": ["a red circle on a blue background"] * n,
                         "weight": np.linspace(0.5, 1.5, n)})


def plan_and_measure(cfg, work_dir, gpus: int = 1) -> dict:
    """The plan's simulated training step (no margin) and the measured one, in bytes, for
    ``cfg`` trained on random images at its generation size in ``work_dir``."""
    from pathlib import Path

    from craft.models.loading import load_from_config
    from craft.planning import make_plan, resolve_gpu
    from craft.planning.simulate import TrainSetup
    from craft.planning.specs import model_spec

    spec = model_spec(cfg)
    plan = make_plan(cfg, gpus=gpus, gpu=resolve_gpu(None, 80), suggest=False)
    step = plan.stage("training: one step")
    pipe = load_from_config(cfg.model, device="cpu")
    n = TrainSetup.from_config(cfg, gpus, family=spec.family).n_kept  # what the plan holds
    frame = random_frame(Path(work_dir) / "images", n, spec.height)
    measured = measure_training_step(cfg, frame, Path(work_dir) / "out", pipe)
    return {"planned": step.simulated * GIB, "parts": step.parts,
            "measured": measured.peak_bytes}


def main(argv=None) -> int:
    """``python -m craft.planning.measure CONFIG [--set ...] --out PATH``: plan and measure a
    training step; under ``accelerate launch`` every process writes PATH.rankN.json (the plan
    for that many processes, e.g. FSDP shards)."""
    import argparse
    import json
    import os
    import tempfile

    from craft.run.config import load_config

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as tmp:
        result = plan_and_measure(cfg, tmp, gpus=world)
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump({**result, "rank": rank, "processes": world}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Measured", "measure_training_step", "plan_and_measure", "random_frame"]
