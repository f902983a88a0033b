"""The plan checked against a real run on this machine: the same tracker (craft.memtrack) on the
real tensors of ``craft.training.train``, so a difference is a difference between what the plan
simulates and what the training loop holds, not between two ways of counting.

What is counted, as the plan counts it for a GPU: everything training creates (the trainable
weights, the encoded set, AdamW, the EMA, gradients, activations) plus the frozen denoiser when
it stays on the device (LoRA; full fine-tuning with the anchor). Not counted: the text encoders
and the VAE, which leave the GPU once the set is encoded (on a CPU there is nowhere to move
them, so they stay; the plan is about the GPU).
"""

from __future__ import annotations

import dataclasses

from craft.memtrack import MemoryTracker

GIB = 2 ** 30


@dataclasses.dataclass
class Measured:
    peak_bytes: int  # steady-state step: the peak over steps 2..N
    by_category: dict[str, int]
    steps: int


def measure_training_step(cfg, frame, out_dir, pipe) -> Measured:
    """Train ``cfg`` on ``frame`` (``cfg.train.steps`` >= 2) with the tracker on; the peak of
    the steps after the first (the first allocates AdamW's moments)."""
    from craft.pipes import denoiser
    from craft.training import TrainCallbacks, train

    if cfg.train.steps < 2:
        raise ValueError("measure at least 2 steps: the first one allocates AdamW's state")
    tracker = MemoryTracker()
    if cfg.train.lora or cfg.train.anchor_weight > 0:
        tracker.track_module(denoiser(pipe), trainable="weights")
    seen: dict = {}

    def on_step(step, total, metrics):
        if step == 1:
            tracker.reset_peak()
        else:
            seen["peak"] = tracker.peak
            seen["parts"] = dict(tracker.peak_by_category)
            seen["steps"] = step

    with tracker:
        train(cfg, frame, out_dir, pipe=pipe, callbacks=TrainCallbacks(on_step=on_step))
    return Measured(seen["peak"], seen["parts"], seen["steps"])


__all__ = ["Measured", "measure_training_step"]
