"""Early rejection and the faster solvers (craft.stages.early_reject, trajectory, stopped):

- the rule: a prediction stops only when it misses its group's reference or the running top-K
  cut-off by more than the margin; the cut-off respects the per-prompt cap; NaN goes on;
- the cut: images that go on end as they would have in the full batch, stopped ones are None;
  the x0 prediction is the scheduler's own (DDIM's pred_original_sample);
- the store: a stopped candidate is stored as stopped (status, step, early scores, predicted
  composite), counted, costed, and finishing it moves it to the candidates in one transaction;
- the stage: every planned key is stored once, as finished or as stopped; finishing stopped
  candidates reproduces exactly what plain generation makes; `craft generate` and the Generate
  tab state the evaluations spent; under a 2-process launch killed with SIGKILL mid-generation
  the same command finishes with every candidate stored once.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config, tiny_overrides
from craft.run.store import NewCandidate, RunStore, StoppedCandidate, StoreError
from craft.stages.early_reject import Judge, build_judge, cost_sentence, running_cutoff
from craft.stages.generation import (SamplingParams, apply_scheduler, generate_candidates,
                                     generate_images, images_to_array, plan_candidates)
from craft.stages.trajectory import StepCut, cut_step, x0_prediction

MAX_PIXEL_DIFF = 2
EARLY = {"generation.early_reject": "true", "generation.early_reject_at": 0.5,
         "generation.early_reject_margin": 0.0, "generation.num_inference_steps": 4}


# ------------------------------------------------------------------------ the rule


def _judge(**kw) -> Judge:
    base = dict(names=("a", "b"), weights=np.array([0.5, 0.5]), required=np.array([True, False]),
                mean=np.zeros(2), sd=np.ones(2), refs={1: np.array([0.0, 0.0])}, margin=0.5,
                filter_margin=np.zeros(2), compare=True, top_k=2, cap=None,
                include_reference=True, composite_error_sd=1.0)
    return Judge(**{**base, **kw})


def test_the_rule_stops_only_what_misses_by_more_than_the_margin():
    j = _judge()  # not calibrated: early scores taken as they are, error SD = the reward's SD
    keep, pred, comp = j.decide([1, 1, 1, 2, 1], np.array([
        [-0.4, 9.0],  # below the reference on a required reward, within the margin: goes on
        [-0.6, 9.0],  # below by more than the margin: stops
        [-5.0, np.nan],  # not scorable: goes on
        [-5.0, 0.0],  # its group has no reference: the reference test cannot stop it
        [-0.6, -9.0]]))  # stops
    assert keep.tolist() == [True, False, True, True, False]
    assert comp[0] == pytest.approx(4.3) and pred[0].tolist() == [-0.4, 9.0]
    # the running cut-off: nothing until K pass, then the K-th best composite
    assert j.cutoff == -math.inf
    j.add_finished([1, 1, 1], np.array([[1.0, 1.0], [2.0, 2.0], [-1.0, 5.0]]), [False] * 3)
    assert j.cutoff == pytest.approx(1.0)  # the third does not pass (a < reference)
    keep, _, _ = j.decide([1, 1], np.array([[0.1, 1.0], [0.1, -1.2]]))  # 0.55, -0.55
    assert keep.tolist() == [True, False]  # -0.55 < 1.0 - 0.5 x 1.0 (composite error SD)


def test_the_calibration_removes_the_early_scores_bias_and_measures_its_error():
    rng = np.random.default_rng(1)
    final = rng.normal(0.5, 0.2, size=(200, 2))
    noise = rng.normal(0, 0.05, size=(200, 2))
    early = (final - 0.2) * 0.5 + noise  # part-way: lower and squeezed
    j = _judge(margin=2.0)
    j.calibrate(early, final)
    assert j.calibrated_on == 200
    assert np.abs(j.predict(early) - final).mean() < 0.12
    assert j.b[0] == pytest.approx(2.0 * 0.2 ** 2 / (0.2 ** 2 + 4 * 0.05 ** 2), rel=0.2)
    assert 0.05 < j.error_sd[0] < 0.12 and j.composite_error_sd > 0
    # a variant whose early score is the references' typical one is predicted at their mean
    # (0.5 > the reference 0.0): it goes on, though its raw early score is far below 0.5
    keep, pred, _ = j.decide([1], np.array([[0.15, 0.15]]))
    assert keep.tolist() == [True] and pred[0, 0] == pytest.approx(0.5, abs=0.05)
    j.calibrate(early[:2], final[:2])  # too few rows: nothing is fitted
    assert j.calibrated_on == 2


def test_running_cutoff_takes_the_cap_and_is_a_lower_bound():
    finished = [(1, 5.0), (1, 4.0), (1, 3.0), (2, 1.0), (3, 0.5)]
    assert running_cutoff(finished, 3, None) == 3.0
    assert running_cutoff(finished, 3, 1) == 0.5  # prompt 1 may give one: 5, 1, 0.5
    assert running_cutoff(finished, 6, None) == -math.inf
    rng = np.random.default_rng(0)
    full = [(int(p), float(c)) for p, c in zip(rng.integers(0, 9, 200), rng.normal(size=200))]
    for n in (20, 80, 150):  # any prefix of the pool gives a cut-off at or below the final one
        assert running_cutoff(full[:n], 10, 2) <= running_cutoff(full, 10, 2)


def test_build_judge_from_a_pool_frame():
    from craft.stages.filtering import FilterSettings

    settings = FilterSettings(rewards=("r1", "r2"), weights={"r1": 1.0, "r2": 1.0},
                              roles={"h": "r1"}, level="h", top_k=1)
    frame = pd.DataFrame({"prompt_id": [1, 1, 1, 2], "variant_idx": [0, 0, 1, 0],
                          "r1": [1.0, 3.0, 5.0, 0.0], "r2": [0.0, 2.0, 0.0, 1.0]})
    j = build_judge(frame, settings, margin=0.5)
    assert j.names == ("r1", "r2") and j.required.tolist() == [True, False]
    assert j.refs[1].tolist() == [2.0, 1.0] and j.refs[2].tolist() == [0.0, 1.0]
    assert j.mean.tolist() == pytest.approx([4 / 3, 1.0])
    assert np.isfinite(j.cutoff)  # the variant (5 > 2) and the references that pass count


# ------------------------------------------------------------------------ the cut


def test_a_cut_batch_ends_as_the_full_batch_and_the_x0_is_the_schedulers(tiny_pipe_copy):
    pipe = tiny_pipe_copy
    prompts = ["a red circle on a blue background", "a green square on a white background",
               "a yellow triangle on a black background"] * 2
    seeds = [3, 4, 5, 6, 7, 8]
    for name in ("ddim", "dpm", "unipc"):
        apply_scheduler(pipe, name)
        params = SamplingParams(num_inference_steps=6)
        full = images_to_array([im for _, b in generate_images(pipe, prompts, seeds, params, 6)
                                for im in b])
        seen = {}

        def check(idx, previews):
            seen["idx"], seen["n"] = idx.tolist(), len(previews)
            return idx % 2 == 0

        cut = StepCut(cut_step(6, 0.5), check)
        out = [im for _, b in generate_images(pipe, prompts, seeds, params, 6, cut=cut)
               for im in b]
        assert seen == {"idx": list(range(6)), "n": 6}
        assert [im is None for im in out] == [False, True] * 3
        for i in (0, 2, 4):
            got = images_to_array([out[i]])[0].astype(int)
            assert np.abs(got - full[i].astype(int)).max() <= MAX_PIXEL_DIFF, name
        assert "step" not in vars(pipe.scheduler)  # the scheduler's own step is back
    # every image stopped: nothing is returned and the pipeline is usable again
    cut = StepCut(2, lambda idx, previews: np.zeros(len(idx), bool))
    out = [im for _, b in generate_images(pipe, prompts[:2], seeds[:2], params, 2, cut=cut)
           for im in b]
    assert out == [None, None] and not pipe.interrupt
    # DDIM's own pred_original_sample is what x0_prediction computes for the VP schedulers
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe._craft_scheduler.config)
    sched.set_timesteps(10)
    x, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), sched.timesteps[3]
    out = sched.step(eps, t, x)
    mine = x0_prediction(sched, eps, t, x, (out.prev_sample,))
    assert torch.allclose(mine, out.pred_original_sample, atol=1e-5)


def test_flow_models_take_the_flow_sigma_solvers(tiny_flow_model_dir):
    from craft import CraftError
    from craft.models.loading import load_pipeline

    pipe = load_pipeline(tiny_flow_model_dir, family="sd3", dtype="float32", device="cpu")
    own = type(pipe.scheduler).__name__
    apply_scheduler(pipe, "dpm")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    apply_scheduler(pipe, "unipc")
    assert pipe.scheduler.config.use_flow_sigmas
    apply_scheduler(pipe, "euler")
    assert type(pipe.scheduler).__name__ == own == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(CraftError, match="not a sampler for this flow-matching"):
        apply_scheduler(pipe, "ddim")
    apply_scheduler(pipe, "dpm")
    params = SamplingParams(num_inference_steps=4)
    prompts, seeds = ["a red circle on a blue background"] * 3, [1, 2, 3]
    full = images_to_array([im for _, b in generate_images(pipe, prompts, seeds, params, 3)
                            for im in b])
    cut = StepCut(2, lambda idx, previews: idx != 1)
    out = [im for _, b in generate_images(pipe, prompts, seeds, params, 3, cut=cut) for im in b]
    assert out[1] is None
    assert np.abs(images_to_array([out[2]])[0].astype(int) - full[2].astype(int)).max() <= 2


# ------------------------------------------------------------------------ the store


def test_a_stopped_candidate_is_stored_as_stopped(tmp_path):
    with RunStore(tmp_path / "run") as store:
        (pid,) = store.add_prompts(["a red circle"])
        vid, = store.add_variants(pid, [(1, "a big red circle", "template")])
        stopped = StoppedCandidate(pid, vid, 7, "m", {"num_inference_steps": 10}, 3, 6, 20,
                                   {"r1": 0.25, "r2": float("nan")}, -1.5)
        assert store.record_stopped([stopped]) == 1
        df = store.stopped_df(model="m")
        row = df.iloc[0]
        assert (row.status, row.step, row.evaluations, row.plain_evaluations, row.variant_idx,
                row.variant) == ("stopped", 3, 6, 20, 1, "a big red circle")
        assert row.composite == -1.5 and row.early_r1 == 0.25 and np.isnan(row.early_r2)
        assert store.stopped_keys("m") == {(pid, vid, 7)}
        assert store.counts()["stopped"] == 1 and store.counts()["candidates"] == 0
        with pytest.raises(StoreError, match="only once"):
            store.record_stopped([stopped])
        from PIL import Image

        im = Image.new("RGB", (8, 8))
        v0 = int(store.variants_df().query("idx == 0")["id"].iloc[0])
        store.add_candidates([NewCandidate(pid, v0, 7, "m", {}, im, 20, 20)])
        cost = store.generation_cost("m")
        assert cost == {"candidates": 1, "stopped": 1, "evaluations": 26,
                        "plain_evaluations": 40, "uncounted": 0}
        assert cost_sentence(cost) == ("26 evaluations; 1 candidates stopped early; the plain "
                                       "sampler would have spent 40 (65% of it)")
        # finishing it: recorded as a candidate, no longer stopped (one transaction)
        store.add_candidates([NewCandidate(pid, vid, 7, "m", {}, im, 26, 20)])
        assert store.stopped_df().empty and store.counts()["stopped"] == 0
        with pytest.raises(StoreError, match="already stored as finished"):
            store.record_stopped([stopped])


# ------------------------------------------------------------------------ the stage


@pytest.fixture
def early_run(tmp_path, tiny_model_dir):
    from craft.stages.engine import prepare_prompts

    cfg = tiny_config(tiny_model_dir, **EARLY)
    store = RunStore(tmp_path / "run")
    prepare_prompts(store, cfg)
    yield store, cfg
    store.close()


def _key_images(store, model) -> dict:
    df = store.candidates_df(model=model)
    return {(r.prompt_id, r.variant_id, r.seed): images_to_array([store.load_image(int(r.id))])[0]
            for r in df.itertuples()}


def test_generation_stores_every_key_once_finished_or_stopped_and_finishing_reproduces_it(
        early_run, tiny_pipe_copy, tiny_model_dir, tmp_path):
    from craft.stages.stopped import finish_stopped, keepable_stopped

    store, cfg = early_run
    pipe = tiny_pipe_copy
    plan = {c[:3] for c in plan_candidates(store, cfg)}
    written = generate_candidates(store, cfg, pipe=pipe)
    model = cfg.model.pretrained
    cands, stopped = store.candidates_df(model=model), store.stopped_df(model=model)
    assert written == len(cands) and len(stopped) > 0, "nothing was stopped: not a test"
    keys = [*zip(cands.prompt_id, cands.variant_id, cands.seed),
            *zip(stopped.prompt_id, stopped.variant_id, stopped.seed)]
    assert sorted(keys) == sorted(plan) and len(set(keys)) == len(keys)
    assert (cands.loc[cands.variant_idx == 0].shape[0]
            == 4 * cfg.generation.seeds_per_prompt)  # every reference ran to the end
    assert (stopped.variant_idx > 0).all() and (stopped.step == cut_step(4, 0.5)).all()
    assert stopped.composite.notna().all() and stopped.early_toy_fidelity.notna().all()
    # finished candidates were scored as they came (the score stage will skip them)
    assert store.scores_df(["toy_fidelity"]).index.isin(cands.id).sum() == len(cands)
    cost = store.generation_cost(model)
    per = 4 * 2  # steps x guidance passes
    assert cost["plain_evaluations"] == len(plan) * per
    assert cost["evaluations"] == len(cands) * per + len(stopped) * 2 * 2
    assert generate_candidates(store, cfg, pipe=pipe) == 0  # a rerun skips stopped keys too
    listed = keepable_stopped(store, cfg)
    assert listed["could_keep"].dtype == bool and len(listed) == len(stopped)
    # finishing every stopped candidate gives exactly what plain generation makes
    out = finish_stopped(store, cfg, "all", pipe=pipe)
    assert out == {"finished": len(stopped), "asked": len(stopped)}
    assert store.stopped_df().empty
    plain_cfg = tiny_config(tiny_model_dir, **{**EARLY, "generation.early_reject": "false"})
    with RunStore(tmp_path / "plain") as plain:
        from craft.stages.engine import prepare_prompts

        prepare_prompts(plain, plain_cfg)
        generate_candidates(plain, plain_cfg, pipe=pipe)
        want = _key_images(plain, model)
    got = _key_images(store, model)
    # prompt and variant ids are assigned alike in both runs (same prompts, same order)
    assert set(got) == set(want)
    assert max(np.abs(got[k].astype(int) - want[k].astype(int)).max() for k in want) <= 2
    after = store.generation_cost(model)
    assert after["stopped"] == 0 and after["evaluations"] == cost["evaluations"] + len(
        stopped) * per


def test_craft_generate_and_the_generate_tab_state_the_evaluations(tmp_path, tiny_model_dir,
                                                                   capsys):
    from craft.cli.main import main

    run = tmp_path / "run"
    sets = [x for o in tiny_overrides(tiny_model_dir, **EARLY) for x in ("--set", o)]
    assert main(["prompts", "--run-dir", str(run), *sets]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    with RunStore(run) as store:
        cost = store.generation_cost()
        n = len(store.stopped_df())
    line = (f"{cost['evaluations']} evaluations; {n} candidates stopped early; the plain "
            f"sampler would have spent {cost['plain_evaluations']}")
    assert line in out and n > 0
    assert main(["generate", "--run-dir", str(run), "--list-stopped"]) == 0
    listed = capsys.readouterr().out
    assert f"{n} stopped candidates;" in listed and "could be kept" in listed
    # the Generate tab says the same sentence
    from studio.tabs.generate import plan_summary

    with RunStore(run) as store:
        from craft.run.handle import run_config

        cfg, _ = run_config(run)
        ctx = types.SimpleNamespace(store=store, cfg=cfg, counts=store.counts)
        text = plan_summary(ctx)
    assert line in text and "stored." in text
    # finishing them from the command line: every stopped candidate, scored like the rest
    assert main(["generate", "--run-dir", str(run), "--finish-stopped", "all"]) == 0
    out = capsys.readouterr().out
    assert f"finished {n} of {n} stopped candidates" in out
    assert "0 candidates stopped early" in out
    with RunStore(run) as store:
        assert store.stopped_df().empty and store.counts()["stopped"] == 0
        scored = store.scores_df(["toy_fidelity"])["toy_fidelity"]
        assert scored.notna().sum() == len(store.candidates_df())


def test_curate_shows_the_stopped_candidates_and_finishes_those_looser_settings_could_keep(
        tmp_path, tiny_model_dir, capsys):
    """Nothing vanishes: Curate's header counts the stopped candidates and how many the
    page's settings could keep, the why of an image names its prompt's stopped ones ("stopped
    at step s of n, predicted composite c"), the "Stopped early" table lists every one, and
    its button finishes those the (loosened) settings could keep, as a generate job."""
    from craft.cli.main import main
    from studio.app import build_app
    from studio.jobs import JOBS
    from studio.session import bound

    run = tmp_path / "run"
    sets = [x for o in tiny_overrides(tiny_model_dir, **EARLY) for x in ("--set", o)]
    assert main(["prompts", "--run-dir", str(run), *sets]) == 0
    assert main(["generate", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    app = build_app(run)
    ctx, curate = app.ctx, app.tabs["Curate"]
    with RunStore(run) as store:
        stopped = store.stopped_df()
    n, step, steps = len(stopped), int(stopped["step"].iloc[0]), 4
    assert n > 0, "nothing was stopped: not a test"
    with bound(ctx):  # the user loosens the filter: level none, K above the pool
        from studio.settings_sync import apply, snapshot

        out = apply(ctx, app.settings, {"filter.level": "none (keep every scorable)",
                                        "filter.top_k": 1000}, snapshot(app.settings, ctx.cfg))
        assert not out.parts(app.settings), out.parts(app.settings)
    assert ctx.cfg.filter.level == "none" and ctx.cfg.filter.top_k == 1000
    everything = app.settings.values_from(ctx.cfg)
    values = [everything[app.settings.index(k)] for k in curate.control_keys]
    with bound(ctx):
        kept, _, levels, _, _ = curate.counts(None, *values)
        assert "kept-number" in kept, kept
        assert f"{n} candidate{'s' if n > 1 else ''} stopped early" in levels
        assert f"at step {step} of {steps}" in levels
        # level none and K above the pool: every stopped candidate could be kept
        assert f"**{n}** of them could be kept under these settings" in levels
        c = curate.run(values)
        pid = int(stopped["prompt_id"].iloc[0])
        cid = int(c.frame.loc[c.frame["prompt_id"] == pid, "candidate_id"].iloc[0])
        why = curate.explain(c, cid)
        mine = stopped[stopped["prompt_id"] == pid]
        assert f"Stopped early in this prompt's group ({len(mine)})" in why
        r = next(mine.itertuples())
        assert (f"variant {int(r.variant_idx)}, seed {int(r.seed)}: stopped at step {step} of "
                f"{steps}, predicted composite {r.composite:+.3f}") in why
        table = curate.refresh("kept", 1, None, {}, [], [], "kept / not kept", {},
                               *values)[-1]
        assert len(table) == n and set(table["could be kept now"]) == {"yes"}
        message, _ = curate.finish_stopped(*values)
        assert f"finishing {n} stopped candidate" in message
        snap = JOBS.wait(JOBS.latest("generate", str(run)).id, timeout=600)
    assert snap.status == "done", snap
    with RunStore(run) as store:
        assert store.stopped_df().empty
    with bound(ctx):
        _, _, levels, _, _ = curate.counts(None, *values)
        assert "stopped early" not in levels
        message, _ = curate.finish_stopped(*values)
        assert "Nothing to finish: no candidate was stopped early" in message


# ------------------------------------------------------------------------ two processes, kill -9


@pytest.mark.slow
def test_two_processes_with_early_rejection_store_each_candidate_once_after_a_kill(
        tmp_path, tiny_model_dir):
    from test_scaleout import ENV, _kill_when, _launcher, _run

    run = tmp_path / "run"
    progress = tmp_path / "progress.json"
    sets = [x for o in tiny_overrides(tiny_model_dir, **{
        **EARLY, "generation.seeds_per_prompt": 4, "generation.num_inference_steps": 20,
        # DDIM: the sampler this test's counts were set for (after the kill, the references'
        # first steps run again for calibration; a solver that stops fewer can spend more)
        "generation.scheduler": "ddim", "generation.batch_size": 2}) for x in ("--set", o)]
    assert _run([sys.executable, "-m", "craft.cli", "prompts", "--run-dir", str(run),
                 *sets]).returncode == 0
    cmd = [*_launcher(2), "generate", "--run-dir", str(run)]
    launcher = subprocess.Popen([*cmd, "--progress-file", str(progress)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _kill_when(launcher, progress, "generate", 24, rank=1)  # past the 16 references
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and seen["done"] >= 24
    with RunStore(run) as store:
        at_kill = len(store.candidates_df()) + len(store.stopped_df())
    assert at_kill < 48
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "candidates stopped early; the plain sampler would have spent" in again.stdout
    with RunStore(run) as store:
        cands, stopped = store.candidates_df(), store.stopped_df()
        keys = [*zip(cands.prompt_id, cands.variant_id, cands.seed),
                *zip(stopped.prompt_id, stopped.variant_id, stopped.seed)]
        assert len(keys) == len(set(keys)) == 4 * 3 * 4  # every planned key once
        assert len(stopped) > 0 and (stopped.variant_idx > 0).all()
        files = {p for p in (run / "images").rglob("*") if p.is_file()}
        assert len(files) == len(cands)  # no image of a stopped candidate, no orphan
        cost = store.generation_cost()
        assert cost["candidates"] == len(cands) and cost["stopped"] == len(stopped)
        assert cost["evaluations"] < cost["plain_evaluations"] == 48 * 20 * 2


def test_a_finish_stopped_call_parses_back_from_its_command_line():
    from craft.cli.main import build_parser
    from craft.stages.calls import StageCall

    for call in (StageCall("generate", finish_stopped="keepable"),
                 StageCall("generate", finish_stopped="all"), StageCall("generate")):
        args = build_parser().parse_args([*call.argv(), "--run-dir", "/r"])
        assert StageCall.from_args(args) == call
    with pytest.raises(ValueError, match="keepable"):
        StageCall("generate", finish_stopped="some")


def test_references_made_before_are_rerun_part_way_to_calibrate(tmp_path, tiny_model_dir,
                                                                 tiny_pipe_copy, caplog):
    """A run whose original prompts' images were made before (plain generation, or a killed
    call): the early check re-runs their first steps to score them part-way, and counts it."""
    import logging

    from craft.stages.engine import prepare_prompts

    only_refs = tiny_config(tiny_model_dir, **{**EARLY, "prompts.num_variants": 0,
                                               "generation.early_reject": "false"})
    cfg = tiny_config(tiny_model_dir, **EARLY)
    with RunStore(tmp_path / "run") as store:
        prepare_prompts(store, only_refs)
        generate_candidates(store, only_refs, pipe=tiny_pipe_copy)
        refs = store.candidates_df()
        assert (refs.variant_idx == 0).all() and len(refs) == 8
        prepare_prompts(store, cfg)
        with caplog.at_level(logging.INFO, logger="craft.stages.generation"):
            generate_candidates(store, cfg, pipe=tiny_pipe_copy)
        assert "calibrated on 8 reference images" in caplog.text
        ids = ",".join(str(int(i)) for i in refs["id"])
        spent = {r[0] for r in store._query(f"SELECT evaluations FROM candidates WHERE id IN "
                                            f"({ids})")}
        # each reference: 4 steps, then 2 more for the calibration, 2 passes each (guidance)
        assert spent == {4 * 2 + 2 * 2}
