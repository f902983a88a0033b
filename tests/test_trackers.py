"""Experiment trackers (train.report_to, craft/methods/trackers.py): the files TensorBoard and wandb
(offline, no network) write for a training run are read back: the steps' scalars, the
previews as images, the config, and the evaluation; a cancelled and resumed run continues the
same tracker run. (The 2-process command with trackers: tests/test_scaleout.py.)"""

from __future__ import annotations

import pytest

from conftest import tiny_overrides

pytestmark = pytest.mark.slow


def tensorboard_events(folder) -> dict:
    """{"scalars": {tag: [(step, value)]}, "images": {tag: [step]}, "text": [tag]} of every
    event file under ``folder``."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    out: dict = {"scalars": {}, "images": {}, "text": set()}
    for run, tags in mux.Runs().items():
        acc = mux.GetAccumulator(run)
        for tag in tags.get("scalars", []):
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags.get("images", []):
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        out["text"] |= set(tags.get("tensors", []))
    return out


def test_a_run_and_its_evaluation_in_tensorboard_and_wandb(tmp_path, tiny_model_dir,
                                                            monkeypatch):
    from craft.run.config import load_config
    from craft.stages.engine import open_run, stage_evaluate, stage_generate, stage_prompts, \
        stage_score, stage_tune

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{
        "train.steps": 4, "train.checkpoint_every": 2, "train.preview_every": 2,
        "train.report_to": "tensorboard,wandb"}))
    run = open_run(tmp_path / "run", cfg)
    stage_prompts(run, cfg)
    stage_generate(run, cfg)
    stage_score(run, cfg)
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    first, _ = stage_tune(run, cfg, "tracked", should_stop=stop_after_two)
    assert first.status == "cancelled"
    result, final = stage_tune(run, cfg, "tracked", resume=True)
    assert result.status == "done"
    ev = stage_evaluate(run, cfg)

    folder = tmp_path / "run" / "train" / "tracked" / "trackers"
    tb = tensorboard_events(folder / "tensorboard")
    loss = dict(tb["scalars"]["train/loss"])
    assert sorted(loss) == [1, 2, 3, 4]  # the resumed run went on in the same tracker run
    for tag in ("train/lr", "train/grad_norm", "train/step_time"):
        assert sorted(dict(tb["scalars"][tag])) == [1, 2, 3, 4]
    assert sorted(set(tb["images"]["previews"])) == [0, 2, 4]
    delta = dict(tb["scalars"]["eval/eval/composite/delta"])
    summary = ev.summary.set_index(["model", "reward"])
    assert delta[4] == pytest.approx(summary.loc[("tracked", "composite"), "diff"], rel=1e-6)
    assert any(t.startswith("run/trained_on") for t in tb["text"])

    runs = list((folder / "wandb" / "wandb").glob("offline-run-*"))
    assert len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1  # one run id, resumed
    assert all(list(r.glob("*.wandb")) for r in runs)
    # the studio's Train tab names the folders and the commands that open them
    from types import SimpleNamespace

    from studio.tabs.train import tracker_hint

    hint = tracker_hint(SimpleNamespace(run_dir=tmp_path / "run"), "tracked")
    assert f"tensorboard --logdir {folder / 'tensorboard'}" in hint and "wandb sync" in hint
    assert tracker_hint(SimpleNamespace(run_dir=tmp_path / "run"), "other") == ""
