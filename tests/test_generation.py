"""Candidate generation: seeded per image, batch-invariant, text encoded once, resumable.

The kill test runs the real ``craft generate`` in a subprocess, SIGKILLs it while batches are
being written, reruns it, and compares the result with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, tiny_overrides
from craft.stages.generation import (SamplingParams, candidate_seed, generate_candidates,
                              generate_images, images_to_array, plan_candidates)
from craft.run.store import RunStore

MAX_PIXEL_DIFF = 2  # out of 255


def _all_images(pipe, prompts, seeds, params, batch_size):
    return [im for _, batch in generate_images(pipe, prompts, seeds, params, batch_size)
            for im in batch]


# ------------------------------------------------------------------------ pure generation


def test_batched_candidate_regenerates_alone(tiny_pipe):
    """An image generated inside a batch of mixed prompts and seeds is, regenerated on its own
    (batch of 1) or in a different batch, the same image within 2/255 per pixel."""
    prompts = ["a red circle on a blue background", "a green square on a white background",
               "a large sharp red circle centred on a plain blue background",
               "a red circle on a blue background", "a yellow triangle on a black background",
               "a green square on a white background"]
    seeds = [11, 5, 11, 12, 99, 1234567]
    params = SamplingParams(num_inference_steps=4, guidance_scale=3.0)
    batched = images_to_array(_all_images(tiny_pipe, prompts, seeds, params, batch_size=6))
    assert batched.shape == (6, 16, 16, 3)
    for i in (0, 3, 4):
        alone = images_to_array(_all_images(tiny_pipe, [prompts[i]], [seeds[i]], params, 1))[0]
        diff = np.abs(alone.astype(int) - batched[i].astype(int)).max()
        assert diff <= MAX_PIXEL_DIFF, f"image {i} differs by {diff}/255 when generated alone"
    # A different batch split (4 + 2) gives the same images too.
    split = images_to_array(_all_images(tiny_pipe, prompts, seeds, params, batch_size=4))
    assert np.abs(split.astype(int) - batched.astype(int)).max() <= MAX_PIXEL_DIFF
    # ... and the comparison is not vacuous: the seed and the prompt each change the image.
    assert np.abs(batched[0].astype(int) - batched[3].astype(int)).max() > 10  # seed 11 vs 12
    assert np.abs(batched[0].astype(int) - batched[2].astype(int)).max() > 10  # prompt


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_same_images_as_the_pipelines_own_call(family, tiny_pipe, tiny_sdxl_pipe):
    """Our batched path (shared text encodings, per-image generators) makes exactly the images
    of ``pipe(prompt, num_images_per_prompt=G, generator=[...])``, SDXL's zero unconditional
    embedding included; and SDXL images are batch-invariant too."""
    import torch

    from craft.stages.generation import generators_for

    pipe = tiny_pipe if family == "sd15" else tiny_sdxl_pipe
    params = SamplingParams(num_inference_steps=3, guidance_scale=3.0)
    texts, seeds = ["a red circle on a blue background", "a green square"], [4, 9]
    ours = images_to_array(_all_images(pipe, [t for t in texts for _ in seeds],
                                       seeds * len(texts), params, batch_size=4))
    theirs = []
    with torch.no_grad():
        for t in texts:
            theirs += pipe(t, num_images_per_prompt=2, generator=generators_for(seeds),
                           num_inference_steps=3, guidance_scale=3.0).images
    theirs = images_to_array(theirs)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= MAX_PIXEL_DIFF
    alone = images_to_array(_all_images(pipe, [texts[1]], [seeds[0]], params, 1))[0]
    assert np.abs(alone.astype(int) - ours[2].astype(int)).max() <= MAX_PIXEL_DIFF


def test_generate_images_validates_arguments(tiny_pipe):
    with pytest.raises(ValueError, match="one seed per"):
        next(generate_images(tiny_pipe, ["a", "b"], [1]))
    with pytest.raises(ValueError, match="batch_size"):
        next(generate_images(tiny_pipe, ["a"], [1], batch_size=0))


def test_generate_images_progress_and_stop(tiny_pipe):
    params = SamplingParams(num_inference_steps=2)
    seen = []
    calls = iter(range(100))
    out = list(generate_images(tiny_pipe, ["a red circle on a blue background"] * 5,
                               list(range(5)), params, batch_size=2,
                               progress=lambda d, t: seen.append((d, t)),
                               should_stop=lambda: next(calls) >= 2))
    assert [sl for sl, _ in out] == [slice(0, 2), slice(2, 4)]
    assert seen == [(2, 5), (4, 5)]


# ------------------------------------------------------------------------ store-backed stage


@pytest.fixture
def prompted_run(tmp_path, tiny_model_dir):
    """A run store with 4 training prompts x (1 + 2 variants), ready for generation."""
    from craft.stages.engine import prepare_prompts

    cfg = tiny_config(tiny_model_dir)
    store = RunStore(tmp_path / "run")
    prepare_prompts(store, cfg)
    yield store, cfg
    store.close()


def test_generate_candidates_resumes_encodes_once_and_shares_seeds(prompted_run, tiny_pipe_copy,
                                                                   monkeypatch):
    store, cfg = prompted_run
    pipe = tiny_pipe_copy
    encoded: list[str] = []
    original = pipe.encode_prompt

    def counting_encode(prompt, *args, **kwargs):
        if prompt is not None:  # the pipeline passes precomputed embeddings through with None
            encoded.extend([prompt] if isinstance(prompt, str) else prompt)
        return original(prompt, *args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", counting_encode)
    plan = plan_candidates(store, cfg)
    V, S = cfg.prompts.num_variants, cfg.generation.seeds_per_prompt
    assert len(plan) == 4 * (1 + V) * S == 24
    progress = []
    n = generate_candidates(store, cfg, pipe=pipe, progress=lambda d, t: progress.append((d, t)))
    assert n == len(plan)
    assert progress == [(0, 24), (8, 24), (16, 24), (24, 24)]  # a start, then three batches

    # Each distinct text went through the text encoder exactly once (none twice, none missed).
    texts = {t for *_, t in plan}
    assert Counter(encoded) == Counter(texts)

    # Resumable: everything is stored, so a second call generates nothing (and loads nothing).
    assert generate_candidates(store, cfg, pipe=None) == 0

    df = store.candidates_df(model=cfg.model.pretrained, split="train")
    assert len(df) == 24
    assert not df.duplicated(["prompt_id", "variant_id", "seed"]).any()
    # Seeds: shared by the original and every variant of a group, different across groups.
    seed_sets = {}
    for pid, g in df.groupby("prompt_id"):
        per_variant = {tuple(sorted(s["seed"])) for _, s in g.groupby("variant_id")}
        assert len(per_variant) == 1, f"prompt {pid}: variants use different seeds"
        seed_sets[pid] = set(per_variant.pop())
        prompt = g["prompt"].iloc[0]
        assert seed_sets[pid] == {candidate_seed(cfg.generation.seed, prompt, s)
                                  for s in range(S)}
    all_seeds = [s for ss in seed_sets.values() for s in ss]
    assert len(all_seeds) == len(set(all_seeds)) == 4 * S

    # Any stored candidate regenerates exactly from its row: variant text + seed + params.
    row = df[df["variant_idx"] == 1].iloc[0]
    params = SamplingParams.from_record(__import__("json").loads(row["params_json"]))
    again = images_to_array(_all_images(pipe, [row["variant"]], [int(row["seed"])], params, 1))
    stored = images_to_array([store.load_image(int(row["id"]))])
    assert np.abs(again.astype(int) - stored.astype(int)).max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"),
                                       ("default", "DDIMScheduler")])
def test_generation_uses_the_configured_scheduler(prompted_run, tiny_pipe_copy, name, cls):
    store, cfg = prompted_run
    cfg = tiny_config(cfg.model.pretrained, **{"generation.scheduler": name,
                                                "prompts.max_prompts": 1,
                                                "prompts.num_variants": 0})
    generate_candidates(store, cfg, pipe=tiny_pipe_copy)
    assert type(tiny_pipe_copy.scheduler).__name__ == cls
    # The noise schedule is the model's own, whatever the sampler.
    assert tiny_pipe_copy.scheduler.config.beta_schedule == "scaled_linear"


def test_candidate_seed_is_stable_and_distinct():
    assert candidate_seed(0, "a red circle", 0) == candidate_seed(0, "a red circle", 0)
    seeds = {candidate_seed(b, p, s) for b in (0, 1) for p in ("a", "b", "c") for s in range(4)}
    assert len(seeds) == 24
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_generate_candidates_stop_then_resume(prompted_run, tiny_pipe):
    """Stopping between batches keeps what was written; the rerun writes only the rest."""
    store, cfg = prompted_run
    calls = iter(range(100))
    first = generate_candidates(store, cfg, pipe=tiny_pipe, should_stop=lambda: next(calls) >= 1)
    assert first == cfg.generation.batch_size
    second = generate_candidates(store, cfg, pipe=tiny_pipe)
    assert first + second == len(plan_candidates(store, cfg))
    keys = store.candidates_df()[["prompt_id", "variant_id", "seed"]]
    assert not keys.duplicated().any()


# ------------------------------------------------------------------------ kill -9 and rerun


def _craft(*args: str) -> list[str]:
    return [sys.executable, "-m", "craft.cli", *args]


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM candidates").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _keys_and_images(run: Path) -> dict[tuple[str, int, int], np.ndarray]:
    with RunStore(run) as store:
        df = store.candidates_df()
        keys = list(zip(df["prompt"], df["variant_idx"], df["seed"]))
        assert len(keys) == len(set(keys)), "a (prompt, variant, seed) appears twice"
        return {k: images_to_array([store.load_image(int(i))])[0] for k, i in zip(keys, df["id"])}


def test_kill_9_during_generate_then_rerun_matches_uninterrupted(tmp_path, tiny_model_dir):
    from craft.cli.main import main

    # 6 prompts x (1 + 2 variants) x 2 seeds = 36 candidates in batches of 3 (12 batches), with
    # enough denoising steps that a batch takes a while: the kill lands between two batches or
    # in the middle of one.
    sets = ["--set", "prompts.max_prompts=6", "--set", "generation.batch_size=3",
            "--set", "generation.num_inference_steps=20"]
    overrides = [x for o in tiny_overrides(tiny_model_dir) for x in ("--set", o)] + sets
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for run in (killed, clean):
        assert main(["prompts", "--run-dir", str(run), *overrides]) == 0
    # The uninterrupted reference, in this process (same code path as the CLI subprocess).
    assert main(["generate", "--run-dir", str(clean)]) == 0
    total = _count(clean / "store.sqlite")
    assert total == 36

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_craft("generate", "--run-dir", str(killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    seen = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = _count(killed / "store.sqlite")
            if seen > 0:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    at_kill = _count(killed / "store.sqlite")
    assert 0 < seen <= at_kill < total, f"kill landed at {at_kill}/{total}; not mid-run"

    rerun = subprocess.run(_craft("generate", "--run-dir", str(killed)), env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"generated {total - at_kill} new candidates; {total} in the run" in rerun.stdout

    got, want = _keys_and_images(killed), _keys_and_images(clean)
    assert len(got) == len(want) == total
    assert set(got) == set(want)
    worst = max(np.abs(got[k].astype(int) - want[k].astype(int)).max() for k in want)
    assert worst <= MAX_PIXEL_DIFF
    # No leftovers: every image file in the run belongs to exactly one row.
    files = {p for p in (killed / "images").rglob("*") if p.is_file()}
    assert len(files) == total and not any(p.name.startswith(".tmp") for p in files)


# ------------------------------------------------------------------------ the shipped model

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "toy-base"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(),
                    reason="assets/toy-base is not built here (craft toy train-base)")
def test_shipped_toy_base_generates_batch_invariantly():
    from craft.models.loading import load_pipeline

    pipe = load_pipeline(SHIPPED, family="toy", dtype="float32", device="cpu")
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the toy latents, not copied
    prompts = ["a red circle on a blue background",
               "a large sharp yellow triangle centred on a plain black background"]
    params = SamplingParams(num_inference_steps=10)
    batched = images_to_array(_all_images(pipe, prompts, [1, 2], params, batch_size=2))
    assert batched.shape == (2, 32, 32, 3)
    alone = images_to_array(_all_images(pipe, prompts[1:], [2], params, batch_size=1))
    assert np.abs(alone[0].astype(int) - batched[1].astype(int)).max() <= MAX_PIXEL_DIFF
