"""The stage commands on the tiny model: `craft run` end to end (a real subprocess), each stage
on its own, and user errors that end in one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from craft.cli.main import main
from craft.stages.evaluation import stored_evaluation
from craft.stages.model_card import read_card
from craft.run.store import RunStore


def _sets(model_dir, **extra) -> list[str]:
    return [x for o in tiny_overrides(model_dir, **extra) for x in ("--set", o)]


def _load_and_generate(final: Path):
    from diffusers import StableDiffusionPipeline

    from craft.stages.generation import SamplingParams, generate_images

    pipe = StableDiffusionPipeline.from_pretrained(final)
    [(_, images)] = list(generate_images(pipe, ["a red circle on a blue background"], [3],
                                         SamplingParams(num_inference_steps=2)))
    return images[0]


def test_craft_run_end_to_end(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "craft.cli", "run", "--run-dir", str(run),
                           *_sets(tiny_model_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    # The evaluation table: every eval reward and the composite, base and tuned columns.
    for word in ("composite", "toy_fidelity", "toy_heldout", "base mean±se", "craft win%"):
        assert word in out, (word, out)
    assert "tuned pipeline:" in out and "side-by-side grid:" in out
    assert "Traceback" not in proc.stderr
    final = run / "final"
    assert (final / "model_index.json").exists()
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert _load_and_generate(final).size == (16, 16)
    with RunStore(run) as store:
        assert len(store.candidates_df()) == 4 * 3 * 2
        assert store.train_runs_df()["status"].tolist() == ["done"]
        assert len(store.evaluations_df()) == 1
        ev = stored_evaluation(store, int(store.evaluations_df()["id"].iloc[0]))
    # The published model's card, parsed back: its numbers are the evaluation record's.
    for folder in (final, run / "train" / "craft" / "final"):
        meta, body = read_card(folder / "README.md")
        assert meta["library_name"] == "diffusers" and "craft" in meta["tags"]
        assert "base_model" not in meta  # a local folder is not a hub id
        rec = meta["craft_evaluation"]
        assert rec["model"] == "craft" and rec["base"] == "base"
        s = ev.summary.set_index(["model", "reward"])
        assert {r["reward"] for r in rec["rows"]} == set(s.loc["craft"].index)
        for r in rec["rows"]:
            assert r["diff"] == pytest.approx(s.loc[("craft", r["reward"]), "diff"], abs=1e-12)
            assert r["win_rate"] == pytest.approx(s.loc[("craft", r["reward"]), "win_rate"])
            assert r["base"] == pytest.approx(s.loc[("base", r["reward"]), "mean"])
            lo, hi = r["ci95"]
            assert lo < r["diff"] < hi or r["diff_se"] == 0
            assert f"| {r['reward']} | {r['base']:.4f} | {r['tuned']:.4f} |" in body
        assert "2 steps x batch" in body and "kept images" in body
        assert (folder / "samples.png").is_file() and "](samples.png)" in body


def test_each_stage_command_in_turn(tmp_path, tiny_model_dir, capsys):
    run = str(tmp_path / "run")
    assert main(["prompts", "--run-dir", run, *_sets(tiny_model_dir)]) == 0
    assert "variants written for 4 prompts (V=2)" in capsys.readouterr().out
    # Later commands use the config stored by the first one (no --set needed).
    assert main(["generate", "--run-dir", run]) == 0
    assert "generated 24 new candidates; 24 in the run" in capsys.readouterr().out
    assert main(["generate", "--run-dir", run]) == 0
    assert "generated 0 new candidates; 24 in the run" in capsys.readouterr().out
    assert main(["score", "--run-dir", run]) == 0
    assert "wrote 72 scores" in capsys.readouterr().out  # 24 candidates x 3 training rewards
    assert main(["score", "--run-dir", run]) == 0
    assert "wrote 0 scores" in capsys.readouterr().out  # cached
    assert main(["filter", "--run-dir", run]) == 0
    assert "saved as selection 'craft'" in capsys.readouterr().out
    assert main(["train", "--run-dir", run]) == 0
    assert "training done after 2 steps" in capsys.readouterr().out
    assert main(["evaluate", "--run-dir", run]) == 0
    out = capsys.readouterr().out
    assert "craft win%" in out and "side-by-side grid" in out
    assert _load_and_generate(Path(run) / "train" / "craft" / "final").size == (16, 16)
    assert _load_and_generate(Path(run) / "final").size == (16, 16)  # published


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("craft: error: "), err
    assert "Traceback" not in err
    assert len([line for line in lines if line.startswith("craft: error")]) == 1
    return lines[-1]


@pytest.mark.parametrize("command", ["generate", "run", "train"])
def test_missing_model_path_is_a_one_line_user_error(tmp_path, capsys, command):
    missing = str(tmp_path / "no-such-model")
    code = main([command, "--run-dir", str(tmp_path / "run"), "--set",
                 f"model.pretrained={missing}"])
    assert code == 2
    line = _one_line_error(capsys)
    assert "model.pretrained" in line and "no-such-model" in line


def test_generate_without_prompts_is_a_one_line_user_error(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "empty-run"
    assert main(["generate", "--run-dir", str(run), *_sets(tiny_model_dir)]) == 2
    line = _one_line_error(capsys)
    assert "no prompts yet" in line and "craft prompts" in line


def test_train_and_evaluate_before_their_inputs_exist(tmp_path, tiny_model_dir, capsys):
    run = str(tmp_path / "run")
    assert main(["prompts", "--run-dir", run, *_sets(tiny_model_dir)]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", run]) == 2
    assert "craft generate" in _one_line_error(capsys)
    assert main(["evaluate", "--run-dir", run]) == 2  # RUN/final does not exist yet
    assert "final" in _one_line_error(capsys)


def test_filter_with_a_per_prompt_cap_changes_the_runs_own_config(tmp_path, tiny_model_dir,
                                                                  capsys):
    """--per-prompt-cap (and --set alone) changes the run's stored config, not the defaults;
    the kept set then draws at most N images from any one prompt."""
    run = str(tmp_path / "run")
    assert main(["prompts", "--run-dir", run, *_sets(tiny_model_dir)]) == 0
    assert main(["generate", "--run-dir", run]) == 0
    assert main(["score", "--run-dir", run]) == 0
    capsys.readouterr()
    assert main(["filter", "--run-dir", run, "--per-prompt-cap", "1"]) == 0
    out = capsys.readouterr().out
    assert "at most 1 per prompt" in out and "at most 1 from one" in out
    from craft.run.handle import run_config

    cfg, _ = run_config(run)
    assert cfg.filter.per_prompt_cap == 1
    assert cfg.model.pretrained == tiny_model_dir  # the run's model, not the toy default
    with RunStore(run) as store:
        items = store.selection_items_df(int(store.selections_df()["id"].iloc[-1]))
        cands = store.candidates_df().set_index("id")
        assert cands.loc[items["candidate_id"], "prompt_id"].value_counts().max() == 1


def test_online_craft_runs_two_rounds_and_keeps_them_apart(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    args = ["run", "--run-dir", str(run), *_sets(tiny_model_dir, **{
        "train.rounds": 2, "train.steps": 4, "train.checkpoint_every": 0})]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "craft.r2 win%" in out  # the evaluated model is the last round's
    with RunStore(run) as store:
        runs = store.train_runs_df().set_index("name")
        assert runs["status"].to_dict() == {"craft.r1": "done", "craft.r2": "done"}
        cands = store.candidates_df()
        r1_final = str(run / "train" / "craft.r1" / "final")
        assert set(cands["model"]) == {tiny_model_dir, r1_final}
        by_model = cands.groupby("model").size()
        assert by_model[tiny_model_dir] == by_model[r1_final] == 4 * 3 * 2
        # round 2's seeds are new noise, its selection only its own candidates
        s1 = set(cands[cands.model == tiny_model_dir].seed)
        assert not s1 & set(cands[cands.model == r1_final].seed)
        sel = store.selections_df().set_index("name")
        items = store.selection_items_df(int(sel.loc["train:craft.r2", "id"]))
        own = set(cands[cands.model == r1_final]["id"])
        assert len(items) and set(items["candidate_id"]) <= own
        cfg2 = json.loads(runs.loc["craft.r2", "config_json"])
        assert cfg2["train"]["steps"] == 2 and cfg2["model"]["pretrained"] == r1_final
    meta = json.loads((run / "final" / "craft_train.json").read_text())
    assert meta["run_name"] == "craft.r2"
    # a rerun finds both rounds finished: nothing is added
    assert main(args) == 0
    with RunStore(run) as store:
        assert len(store.train_runs_df()) == 2 and len(store.candidates_df()) == 2 * 24
        assert len(store.evaluations_df()) == 1


def test_a_run_built_from_two_prompt_sources_keeps_both_in_its_config(tmp_path, tiny_model_dir,
                                                                      capsys):
    """12 toy prompts, then 3 from a CSV: the run's config names one file holding all 15, so
    `craft run` on the run plans the same prompts (it used to name only the CSV)."""
    from craft.stages.prompts import load_prompts
    from craft.run.handle import run_config

    run = tmp_path / "run"
    csv = tmp_path / "more.csv"
    csv.write_text("prompt\na blue square on a red background\na red circle on a "
                   "green background\na white triangle on a black background\n")
    assert main(["prompts", "--run-dir", str(run), *_sets(tiny_model_dir, **{
        "prompts.max_prompts": 12})]) == 0
    assert main(["prompts", "--run-dir", str(run), "--set", f"prompts.source={csv}",
                 "--set", "prompts.max_prompts=null"]) == 0
    capsys.readouterr()
    with RunStore(run) as store:
        stored = store.prompts_df()
        stored = list(stored.loc[stored["split"] == "train", "text"])
    assert len(stored) == 15
    cfg, _ = run_config(run)
    assert cfg.prompts.source == str(run / "prompts" / "train.jsonl")
    assert load_prompts(cfg.prompts.source, cfg.prompts.format, cfg.prompts.column,
                        cfg.prompts.max_prompts).prompts == stored
    # running the prompts stage again with the run's own config adds nothing
    assert main(["prompts", "--run-dir", str(run)]) == 0
    with RunStore(run) as store:
        assert (store.prompts_df()["split"] == "train").sum() == 15


def test_run_layout_orders_by_number_and_lists_tuned_models_newest_first(tmp_path):
    """checkpoint-10 comes after checkpoint-9 (not by text); half-written folders ('.tmp-…')
    and stray names are not training outputs; Compare's list is the engine's, newest first."""
    import os

    from craft.models.checkpoints import STATE_FILE
    from craft.models.lora import LORA_WEIGHTS
    from craft.run.layout import (checkpoint_dirs, checkpoint_step, preview_dir, preview_dirs,
                                  train_dir, training_dirs)
    from craft.stages.engine import tuned_models

    out = train_dir(tmp_path, "craft-1")
    for step in (10, 9, 100):
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_bytes(b"")
        (d / LORA_WEIGHTS).write_bytes(b"")
        os.utime(d / STATE_FILE, (1000 + step, 1000 + step))
    (out / "checkpoint-x").mkdir()
    (tmp_path / "train" / ".tmp-craft-2").mkdir()
    assert [checkpoint_step(p) for p in checkpoint_dirs(out)] == [9, 10, 100]
    assert checkpoint_step(out / "checkpoint-x") is None
    assert training_dirs(tmp_path) == [out]
    for step in (20, 3):
        preview_dir(out, step).mkdir(parents=True)
    assert [s for s, _ in preview_dirs(out)] == [3, 20]
    assert [label for label, _ in tuned_models(tmp_path)] == [
        "craft-1 · checkpoint-100", "craft-1 · checkpoint-10", "craft-1 · checkpoint-9"]


_SMALL = ["--set", "prompts.max_prompts=4", "--set", "prompts.max_eval_prompts=2",
          "--set", "prompts.num_variants=1"]


def _bad_sources(tmp_path) -> list[tuple[Path, str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02PK\x00" * 50)
    table = tmp_path / "table.csv"
    table.write_text("title,year\nfoo,1999\nbar,2001\n")
    return [(empty, "has no usable prompts"), (binary, "looks binary"),
            (table, "has no prompt column")]


def test_a_refused_prompt_source_leaves_the_runs_config_byte_for_byte(tmp_path, capsys):
    """`craft prompts` with a source it refuses exits 2 naming the problem, and RUN/config.yaml
    is what it was (the source used to be written into it as prompts.source first)."""
    run = tmp_path / "run"
    assert main(["prompts", "--run-dir", str(run), *_SMALL]) == 0
    config = run / "config.yaml"
    before = config.read_bytes()
    with RunStore(run) as store:
        stored_before = store.get_config()
        prompts_before = len(store.prompts_df())
    capsys.readouterr()
    for bad, problem in _bad_sources(tmp_path):
        for extra in ([], ["--set", "prompts.num_variants=2"]):
            assert main(["prompts", "--run-dir", str(run), "--set",
                         f"prompts.source={bad}", *extra]) == 2
            line = _one_line_error(capsys)
            assert problem in line and bad.name in line, line
            assert config.read_bytes() == before, (bad, extra)
    assert main(["run", "--run-dir", str(run), "--set",
                 f"prompts.source={tmp_path / 'table.csv'}"]) == 2
    assert "has no prompt column" in _one_line_error(capsys)
    assert config.read_bytes() == before
    with RunStore(run) as store:
        assert store.get_config() == stored_before
        assert len(store.prompts_df()) == prompts_before
    # a new run refused on its first command gets no config at all
    fresh = tmp_path / "fresh"
    assert main(["prompts", "--run-dir", str(fresh), *_SMALL, "--set",
                 f"prompts.source={tmp_path / 'empty.txt'}"]) == 2
    assert "has no usable prompts" in _one_line_error(capsys)
    assert not (fresh / "config.yaml").exists()


def test_a_source_added_later_is_read_in_its_own_format(tmp_path, capsys):
    """A run whose sources are recorded in RUN/prompts/train.jsonl (and whose config says
    format: jsonl, as older runs do): a .txt added with --set prompts.source is read as text,
    not as JSON; a format given with it is still obeyed."""
    from craft.run.handle import run_config

    run = tmp_path / "run"
    csv = tmp_path / "more.csv"
    csv.write_text("prompt\na blue square on a red background\n"
                   "a white triangle on a black background\n")
    txt = tmp_path / "more.txt"
    txt.write_text("a green circle on a white background\n# a comment\n"
                   "a red square on a yellow background\n")
    assert main(["prompts", "--run-dir", str(run), *_SMALL]) == 0
    assert main(["prompts", "--run-dir", str(run), "--set", f"prompts.source={csv}"]) == 0
    cfg, _ = run_config(run)
    assert cfg.prompts.source == str(run / "prompts" / "train.jsonl")
    assert (cfg.prompts.format, cfg.prompts.column) == ("auto", None)
    # an older run recorded its sources with the format of the recording file
    assert main(["prompts", "--run-dir", str(run), "--set", "prompts.format=jsonl",
                 "--set", "prompts.column=prompt"]) == 0
    assert run_config(run)[0].prompts.format == "jsonl"
    capsys.readouterr()
    assert main(["prompts", "--run-dir", str(run), "--set", f"prompts.source={txt}"]) == 0
    with RunStore(run) as store:
        df = store.prompts_df()
        train = list(df.loc[df["split"] == "train", "text"])
    assert len(train) == 4 + 2 + 2
    assert train[-2:] == ["a green circle on a white background",
                          "a red square on a yellow background"]
    cfg, _ = run_config(run)
    assert cfg.prompts.source == str(run / "prompts" / "train.jsonl")
    # a format passed with the new source is the one used: the .txt read as jsonl is refused
    assert main(["prompts", "--run-dir", str(run), "--set", f"prompts.source={txt}",
                 "--set", "prompts.format=jsonl"]) == 2
    assert "invalid json" in _one_line_error(capsys)
