"""``craft rehearse``: a dress rehearsal of a run with random weights, tiny counts, the plan checked
against what it measured (craft/stages/rehearsal.py). Here on a tiny model of SD1.5's real
architecture (tests/sd_fixtures.py) with the toy world's pixel rewards, so a whole rehearsal
(generate, score, filter, train, stop with a checkpoint, resume from it, publish with the model
card, evaluate) takes seconds; the measured peaks are the plan's accounting on real tensors.

Also the faults the real-size rehearsals found, each at tiny size: the plan's encode stage
without the denoiser, the training state left on the device into evaluation, LoRA previews of
a bfloat16 model that failed at step 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sd_fixtures import offline  # noqa: F401 (autouse: no network, an empty HF cache)

TOY_REWARDS = ["rewards.names=[toy_fidelity, toy_selection, toy_aesthetic]",
               "rewards.roles={h: toy_fidelity, p: toy_selection, a: toy_aesthetic}",
               "rewards.eval_names=[toy_fidelity, toy_heldout]",
               "filter.weights={toy_fidelity: 0.4, toy_selection: 0.4, toy_aesthetic: 0.2}",
               "prompts.source=toy", "prompts.eval_source=toy-heldout",
               "eval.diversity_encoder=pixels"]


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> Path:
    """A tiny model of SD1.5's architecture (craft.models.architectures, tiny widths), saved."""
    from sd_fixtures import build

    root = tmp_path_factory.mktemp("tiny-sd15")
    build("sd15", root).save_pretrained(root / "model", safe_serialization=True)
    return root / "model"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rehearsal-cache")


def _rehearse(tiny_sd15, cache, run_dir, *extra, capsys=None) -> tuple[int, str, dict]:
    """``craft rehearse configs/sd15.yaml`` on the tiny model; (exit code, stdout, report)."""
    from craft.cli.main import main

    sets = [f"model.pretrained={tiny_sd15}", *TOY_REWARDS]
    argv = ["rehearse", "configs/sd15.yaml", *[x for s in sets for x in ("--set", s)],
            "--run-dir", str(run_dir), "--cache", str(cache), *extra]
    rc = main(argv)
    out = capsys.readouterr().out if capsys is not None else ""
    report = run_dir / "rehearsal" / "report.json"
    return rc, out, json.loads(report.read_text()) if report.is_file() else {}


@pytest.mark.slow
def test_a_tiny_sd15_rehearsal_passes_and_writes_its_report(tiny_sd15, cache, tmp_path,
                                                            capsys):
    rc, out, rep = _rehearse(tiny_sd15, cache, tmp_path / "run", capsys=capsys)
    assert rc == 0, out
    assert (tmp_path / "run" / "rehearsal" / "report.md").is_file()
    stages = {c["stage"]: c for c in rep["checks"]}
    assert set(stages) == {"generation", "scoring", "training: encode the kept set",
                           "training: one step", "checkpoint + previews", "evaluation"}
    assert all(c["ok"] for c in stages.values()), stages
    # the real run's settings: bfloat16 weights and autocast (float16 / auto on a GPU)
    assert rep["setting"]["dtype"] == "bfloat16"
    assert rep["setting"]["mixed_precision"] == "bf16"
    assert rep["failure"] is None
    # stopped after 2 steps, resumed from the checkpoint for the third, published with a card
    assert [m["step"] for m in rep["metrics"]] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in rep["metrics"])
    assert (tmp_path / "run" / "final" / "README.md").is_file()
    assert (tmp_path / "run" / "eval" / "eval" / "side_by_side.png").is_file()
    assert "passed" in out


@pytest.mark.slow
def test_a_peak_outside_the_margin_fails_with_the_stage_named(tiny_sd15, cache, tmp_path,
                                                             capsys):
    """--margin 0 asks the plan to be exact: every stage that differs at all is named and the
    command exits 6 (and LoRA, with its previews of a bfloat16 model, runs through: no stage
    breaks)."""
    from craft.stages.rehearsal import EXIT_PLAN_OFF

    rc, out, rep = _rehearse(tiny_sd15, cache, tmp_path / "run", "--margin", "0",
                             "--set", "train.lora=true", capsys=capsys)
    assert rc == EXIT_PLAN_OFF
    assert rep["failure"] is None
    off = [c["stage"] for c in rep["checks"] if c["ok"] is False]
    assert off and "training: one step" in off
    assert "PLAN OFF" in out and "'training: one step'" in out


def test_a_wrong_plan_is_caught_at_its_stage_within_the_stated_margin():
    """The check itself: a plan that halves one stage is off there and only there."""
    from craft.stages.rehearsal import Record, compare

    class Stage:
        def __init__(self, name, gib, hours=None):
            self.stage, self.parts, self.hours = name, {"weights": gib}, hours

        @property
        def simulated(self):
            return sum(self.parts.values())

        @property
        def needed(self):
            return self.simulated * 1.15 + 1

    class Plan:
        stages = [Stage("generation", 2.0), Stage("training: one step", 8.0)]

    gib = 2 ** 30
    measured = {"generation": Record("generation", int(2.1 * gib)),
                "training: one step": Record("training: one step", int(16 * gib))}
    checks = {c.stage: c for c in compare(Plan(), measured, gpu=False)}
    assert checks["generation"].ok and not checks["training: one step"].ok
    on_gpu = {c.stage: c for c in compare(Plan(), measured, gpu=True)}
    assert on_gpu["training: one step"].tolerance == pytest.approx(0.15 * 8 * gib + gib)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_grpo_and_dpo_rehearse_under_bf16_with_finite_losses(method, tiny_sd15, cache,
                                                             tmp_path, capsys):
    """GRPO: its first update of every round has a ratio of exactly 1 (the samples came from
    these weights, under the same bf16 autocast); DPO, like CRAFT above, finite losses."""
    rc, out, rep = _rehearse(tiny_sd15, cache, tmp_path / "run", "--method", method,
                             capsys=capsys)
    assert rc == 0, out
    steps = rep["metrics"]
    assert steps and all(math.isfinite(m["loss"]) for m in steps)
    if method == "grpo":
        assert steps[0]["ratio"] == 1.0 and steps[0]["clip_fraction"] == 0.0
        stages = {c["stage"] for c in rep["checks"]}
        assert "GRPO: sample a round" in stages and "generation" not in stages
    else:
        assert all("dpo_accuracy" in m for m in steps)


def test_the_plans_encode_stage_holds_the_whole_pipeline(tiny_sd15):
    """The kept set is encoded with the whole pipeline on the device: the plan's encode stage
    holds every weight its generation stage holds (it had dropped the denoiser)."""
    from craft.planning.simulate import _data_encoding, simulate_generation
    from craft.planning.specs import model_spec
    from craft.run.config import load_config

    spec = model_spec(load_config("configs/sd15.yaml", [f"model.pretrained={tiny_sd15}"]))
    enc = _data_encoding.__wrapped__(spec, 1, 1)
    gen = simulate_generation(spec, 1, 2, 7.5, True)
    assert enc.parts["weights"] == gen.parts["weights"]


def test_training_leaves_nothing_of_its_state_behind(tiny_model_dir, tmp_path, monkeypatch):
    """After train() returns, the float32 copy and AdamW are gone at once, not whenever the
    cyclic garbage collector runs (they stayed on the device into evaluation)."""
    import gc
    import weakref

    import craft.methods.training as T
    from conftest import tiny_config
    from craft.planning.measure import random_frame

    seen = {}
    build = T.build_trainable

    def spy(cfg, pipe, acc):
        tr = build(cfg, pipe, acc)
        seen.update(raw=weakref.ref(tr.raw), opt=weakref.ref(tr.opt))
        return tr

    monkeypatch.setattr(T, "build_trainable", spy)
    cfg = tiny_config(tiny_model_dir, **{"train.steps": 1, "train.checkpoint_every": 0})
    frame = random_frame(tmp_path / "images", 4, 16)
    gc.disable()
    try:
        T.train(cfg, frame, tmp_path / "out")
        assert seen["raw"]() is None and seen["opt"]() is None
    finally:
        gc.enable()


def test_a_models_load_is_host_memory_until_it_is_on_its_device(tmp_path):
    """The CPU meter counts a reward from when it is loaded, not its checkpoint read and its
    random build on the host (a GPU run does both in host memory, then moves the model): the
    real-size rehearsal counted HPSv2.1 twice while it loaded, 7.4 GiB for 3.7."""
    import torch

    from craft.rewards.base import _REGISTRY, TorchReward, load_reward, register_reward
    from craft.run.watch import watching
    from craft.stages.rehearsal import CpuMeter

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": torch.nn.Linear(256, 256).state_dict()}, path)

    class FromCheckpoint(TorchReward):
        name = "from_checkpoint_reward"

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(256, 256)  # a random build, then the weights read
            self.model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])

    register_reward("from_checkpoint_reward")(lambda **kw: FromCheckpoint())
    meter = CpuMeter({})
    try:
        with meter, watching(meter):
            meter.stage("load")
            reward = load_reward("from_checkpoint_reward")
            after = meter.total
        records = meter.finish()
    finally:
        _REGISTRY.pop("from_checkpoint_reward", None)
    weights = sum(t.numel() * t.element_size() for t in reward.model.parameters())
    assert after == pytest.approx(weights, rel=0.01)
    assert records["load"].peak == pytest.approx(weights, rel=0.01)
