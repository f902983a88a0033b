"""The shipped multi-process commands, run for real on CPU: ``accelerate launch --multi_gpu
--num_processes 2 -m craft.cli run`` (one machine), the same as two "machines" (two launchers,
machine ranks 0 and 1, main process at 127.0.0.1), and a run whose rank is SIGKILLed
mid-generation and mid-training, then resumed by the same command.

What every run must show: exit 0 on every process; every planned candidate stored once; every
score once; the same kept set on every process (each records its digest); one finished
training run; one evaluation; RUN/final loads. And a 2-process run equals a 1-process run:
same candidates (bitwise: batch size 1 makes every image's computation the same), same scores,
same kept set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from craft.run.store import RunStore

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(model_dir: str, **extra) -> list[str]:
    # batch size 1: every image is computed alone, so any sharding gives bitwise the same images
    base = {"generation.batch_size": 1, "eval.batch_size": 1, "train.steps": 4,
            "train.checkpoint_every": 2}
    return [x for o in tiny_overrides(model_dir, **{**base, **extra}) for x in ("--set", o)]


def _launcher(processes: int, machines: int = 1, machine_rank: int = 0,
              port: int | None = None) -> list[str]:
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port or _port()), "--monitor_interval", "0.5"]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return [*cmd, "-m", "craft.cli"]


def _run(cmd: list[str], timeout: int = 600, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _craft_run(run: Path, sets: list[str]) -> list[str]:
    return ["run", "--run-dir", str(run), *sets]


def _state(run: Path) -> dict:
    """What a finished run holds, keyed by content (ids differ between runs)."""
    with RunStore(run) as store:
        c = store.candidates_df()
        key = {int(r.id): (r.prompt, r.variant, int(r.seed)) for r in c.itertuples()}
        scores = store.scores_df(wide=False)
        runs = store.train_runs_df()
        sel = store.selections_df().set_index("id")
        kept = [key[i] for i in store.selection_items_df(int(runs["selection_id"].iloc[0]))[
            "candidate_id"]] if len(runs) and runs["selection_id"].notna().all() else []
        recorded = json.loads(sel.loc[int(runs["selection_id"].iloc[0]), "settings_json"]) \
            if kept else {}
        metrics = store.metrics_df(int(runs["id"].iloc[0])) if len(runs) else None
        return {
            "keys": [key[i] for i in c["id"]],
            "images": {key[int(r.id)]: Path(r.image_path).read_bytes() for r in c.itertuples()},
            "score_rows": [(key[int(r.candidate_id)], r.reward) for r in scores.itertuples()],
            "scores": {(key[int(r.candidate_id)], r.reward): r.value for r in scores.itertuples()},
            "rewards": sorted(set(scores["reward"])),
            "runs": runs[["name", "status"]].values.tolist(),
            "kept": sorted(kept), "selection": recorded,
            "steps": None if metrics is None else metrics["step"].tolist(),
            "evaluations": len(store.evaluations_df()),
        }


def _check_complete(state: dict, cfg_prompts=4, variants=2, seeds=2, rewards=3, steps=4,
                    processes: int = 2) -> None:
    n = cfg_prompts * (1 + variants) * seeds
    assert len(state["keys"]) == n and len(set(state["keys"])) == n  # every candidate once
    assert len(state["score_rows"]) == n * rewards  # every score once
    assert len(set(state["score_rows"])) == n * rewards
    assert state["runs"] == [["craft", "done"]]  # one finished training run
    assert state["steps"] == list(range(1, steps + 1))
    assert state["evaluations"] == 1
    sel = state["selection"]
    assert sel["processes"] == processes and len(sel["digest_by_process"]) == processes
    assert len(set(sel["digest_by_process"])) == 1, "the kept set differs between processes"
    assert state["kept"]


def _final_loads(run: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run / "final")
    assert pipe.unet is not None


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """The same run on one process (plain `craft run`), for comparison."""
    run = tmp_path_factory.mktemp("one") / "run"
    proc = _run([sys.executable, "-m", "craft.cli", *_craft_run(run, _sets(tiny_model_dir))])
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {**_state(run), "run_dir": run}


def test_shipped_command_on_two_processes(tmp_path, tiny_model_dir, one_process):
    run = tmp_path / "run"
    proc = _run([*_launcher(2), *_craft_run(run, _sets(tiny_model_dir))])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("craft win%") == 1  # only the main process prints the table
    assert "[rank 1]" not in proc.stderr or "ERROR" not in proc.stderr
    state = _state(run)
    _check_complete(state)
    _final_loads(run)
    # Two processes make exactly what one process makes.
    assert sorted(state["keys"]) == sorted(one_process["keys"])
    assert state["images"] == one_process["images"]
    assert state["scores"] == one_process["scores"]
    assert state["kept"] == one_process["kept"]
    assert one_process["selection"]["kept_digest"] == state["selection"]["kept_digest"]
    # A rerun of the finished run adds nothing: no second training run, no second evaluation.
    again = _run([*_launcher(2), *_craft_run(run, [])])
    assert again.returncode == 0, again.stderr[-6000:]
    after = _state(run)
    assert after["runs"] == [["craft", "done"]] and after["evaluations"] == 1
    assert after["keys"] == state["keys"]


def test_two_machines_on_one_host(tmp_path, tiny_model_dir, one_process):
    """Two launchers as two machines (machine ranks 0 and 1): only the global main process
    (machine 0) opens the store; machine 1's process sends its rows to it."""
    run, port = tmp_path / "run", _port()
    args = _craft_run(run, _sets(tiny_model_dir))
    procs = [subprocess.Popen([*_launcher(2, machines=2, machine_rank=m, port=port), *args],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-6000:]
    assert outs[0][0].count("craft win%") == 1 and "craft win%" not in outs[1][0]
    state = _state(run)
    _check_complete(state)
    _final_loads(run)
    assert state["images"] == one_process["images"]
    assert state["scores"] == one_process["scores"]
    assert state["kept"] == one_process["kept"]


def test_a_flow_model_with_online_rounds_and_the_controls_on_two_processes(
        tmp_path, tiny_flow_model_dir):
    """The SD3-architecture flow model through the shipped 2-process command, with the stages'
    newer parts on: its own flow sampler, the flow-matching loss, data parallel, two online
    rounds, the near-duplicate rule (embedded on the main process) and the anchor penalty.
    Every candidate and score once, one kept set on both processes in each round, one
    evaluation, a complete StableDiffusion3Pipeline at RUN/final."""
    run = tmp_path / "run"
    sets = _sets(tiny_flow_model_dir, **{
        "model.family": "sd3", "generation.scheduler": "default", "train.rounds": 2,
        "train.anchor_weight": 0.5, "filter.dedup_threshold": 0.9})
    proc = _run([*_launcher(2), *_craft_run(run, sets)])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("craft.r2 win%") == 1 and "diversity" in proc.stdout
    with RunStore(run) as store:
        runs = store.train_runs_df().set_index("name")
        assert runs["status"].to_dict() == {"craft.r1": "done", "craft.r2": "done"}
        c = store.candidates_df()
        keys = list(zip(c["model"], c["prompt"], c["variant"], c["seed"]))
        assert len(keys) == len(set(keys)) == 2 * 4 * 3 * 2  # both rounds' pools, once each
        scores = store.scores_df().reindex(c["id"])
        assert scores.shape[1] == 3 and scores.notna().all().all()  # every score once
        sel = store.selections_df().set_index("id")
        for name in ("craft.r1", "craft.r2"):
            rec = json.loads(sel.loc[int(runs.loc[name, "selection_id"]), "settings_json"])
            assert rec["dedup_threshold"] == 0.9 and rec["processes"] == 2
            assert len(set(rec["digest_by_process"])) == 1
        assert len(store.evaluations_df()) == 1
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(run / "final")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert list(run.glob("train/craft.r2/checkpoint-*/transformer/config.json"))


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "craft.cli" in " ".join(
                    child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_when(launcher, progress: Path, stage: str, at: int, rank: int) -> dict:
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        try:
            p = json.loads(progress.read_text())
        except (OSError, ValueError):
            p = {}
        if p.get("stage") == stage and at <= p.get("done", 0) < p.get("total", 0):
            pid = _rank_pid(launcher, rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return p
        time.sleep(0.02)
    raise AssertionError(f"the launch never reached {stage} {at} (rc {launcher.poll()})")


def test_killed_ranks_leave_a_run_the_same_command_resumes(tmp_path, tiny_model_dir):
    """Rank 1 SIGKILLed mid-generation, then (in the resuming command) rank 0 mid-training:
    each time the store is consistent right after the kill and the same command goes on; the
    finished run is complete (every candidate and score once, every step logged once)."""
    run = tmp_path / "run"
    progress = tmp_path / "progress.json"
    # Long enough to be caught mid-stage: 4 prompts x 3 x 4 seeds at 20 steps; 24 train steps.
    sets = _sets(tiny_model_dir, **{"generation.seeds_per_prompt": 4,
                                    "generation.num_inference_steps": 20, "train.steps": 24,
                                    "train.checkpoint_every": 4})
    cmd = [*_launcher(2), *_craft_run(run, sets)]
    for stage, at, rank in (("generate", 6, 1), ("train", 8, 0)):
        progress.unlink(missing_ok=True)
        launcher = subprocess.Popen([*cmd, "--progress-file", str(progress)], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = _kill_when(launcher, progress, stage, at, rank)
        launcher.communicate(timeout=120)
        assert launcher.returncode != 0  # the launcher stops the others and fails
        assert seen["done"] >= at
        with RunStore(run) as store:  # a consistent store right after the kill
            if stage == "generate":
                assert len(store.candidates_df()) < 4 * 3 * 4
            else:
                assert len(store.candidates_df()) == 4 * 3 * 4
                assert store.train_runs_df()["status"].tolist() == ["failed"]
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-6000:]
    state = _state(run)
    _check_complete(state, seeds=4, steps=24)
    _final_loads(run)


def test_a_batch_two_processes_cannot_split_fails_before_any_work(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    sets = _sets(tiny_model_dir, **{"train.effective_batch": 2, "train.micro_batch": 2})
    proc = _run([*_launcher(2), *_craft_run(run, sets)])
    assert proc.returncode != 0
    assert "multiple of 4" in proc.stderr and "micro_batch (2) x processes (2)" in proc.stderr
    assert not list(run.glob("images/*/*.png"))  # nothing was generated


def _train_cmd(run: Path, model_dir: str, method: str, name: str, **extra) -> list[str]:
    sets = [x for o in tiny_overrides(model_dir, **{
        "train.steps": 6, "train.checkpoint_every": 2, "grpo.prompts_per_step": 2,
        "grpo.group_size": 4, "grpo.num_inference_steps": 3, "grpo.updates": 2,
        "train.micro_batch": 4, "train.effective_batch": 8, **extra}) for x in ("--set", o)]
    return [*_launcher(2), "train", "--run-dir", str(run), "--method", method, "--name", name,
            *sets]


def test_dpo_and_grpo_on_two_processes_and_grpo_resumes_after_kill_9(tmp_path, tiny_model_dir,
                                                                     one_process):
    """DPO and GRPO through the shipped `craft train --method` on two processes, on a copy of
    the one-process run's pool (SFT is CRAFT's loop with weight 1: the craft runs here cover
    it); GRPO's rank 0 is SIGKILLed mid-training and the same command finishes it: every
    round's samples stored once, every step logged once."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_process["run_dir"], run)
    proc = _run(_train_cmd(run, tiny_model_dir, "dpo", "dpo", **{
        "dpo.pairs": "above_margin", "train.report_to": "tensorboard,wandb"}),
        env={**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the trackers under two processes: the main process alone logs, every step once
    from test_trackers import tensorboard_events

    trackers = run / "train" / "dpo" / "trackers"
    events = list((trackers / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # one writing process
    loss = tensorboard_events(trackers / "tensorboard")["scalars"]["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 7))
    assert len(list((trackers / "wandb" / "wandb").glob("offline-run-*"))) == 1
    with RunStore(run) as store:
        rec = store.train_run_by_name("dpo")
        sel = json.loads(store.selections_df().set_index("id").loc[
            int(rec["selection_id"]), "settings_json"])
        assert rec["status"] == "done" and sel["method"] == "dpo" and sel["n_pairs"] > 0
        assert sel["processes"] == 2 and len(set(sel["digest_by_process"])) == 1
        assert store.metrics_df(int(rec["id"]))["dpo_accuracy"].notna().all()
    progress = tmp_path / "progress.json"
    cmd = _train_cmd(run, tiny_model_dir, "grpo", "grpo")
    launcher = subprocess.Popen([*cmd, "--progress-file", str(progress)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(launcher, progress, "train", 3, 0)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-6000:]
    with RunStore(run) as store:
        runs = store.train_runs_df().groupby("name").tail(1).set_index("name")
        assert runs["status"].to_dict() == {"craft": "done", "dpo": "done", "grpo": "done"}
        m = store.metrics_df(int(runs.loc["grpo", "id"]))
        assert m["step"].tolist() == list(range(1, 7)) and m["ratio"].notna().all()
        sampled = store.candidates_df(model="grpo:grpo")
        assert len(sampled) == 3 * 2 * 4  # 3 rounds x 2 prompts x 4 images, each once
        assert len(store.scores_df(["toy_fidelity"]).reindex(sampled["id"]).dropna()) == len(
            sampled)
    assert (run / "train" / "grpo" / "final" / "model_index.json").is_file()


def test_a_served_reward_scores_each_process_share_on_two_processes(tmp_path, one_process):
    """`craft score` on two processes with a reward served by `craft serve-rewards`' server
    (here in the test process, over loopback): each process sends its share of the candidates,
    every candidate is scored once, and the values equal the in-process reward's."""
    import shutil

    from craft.rewards.server import RewardServer
    from craft.rewards import load_reward

    run = tmp_path / "run"
    shutil.copytree(one_process["run_dir"], run)
    reward = load_reward("toy_fidelity")
    srv = RewardServer({"toy_fidelity": reward}, token="t0k").start()
    try:
        remote = {"served_fidelity": {"url": srv.url, "reward": "toy_fidelity",
                                      "token_env": "CRAFT_TEST_TOKEN"},
                  "served_raw": {"url": srv.url, "reward": "toy_fidelity",
                                 "token_env": "CRAFT_TEST_TOKEN", "encoding": "raw"}}
        proc = _run([*_launcher(2), "score", "--run-dir", str(run), "--set",
                     f"rewards.remote={json.dumps(remote)}", "--set",
                     "rewards.names=[toy_fidelity,toy_selection,toy_aesthetic,served_fidelity,"
                     "served_raw]"],
                    env={**ENV, "CRAFT_TEST_TOKEN": "t0k"})
        assert proc.returncode == 0, proc.stderr[-6000:]
        assert srv.requests >= 2  # both processes' shares went through the server
    finally:
        srv.stop()
    with RunStore(run) as store:
        s = store.scores_df(["toy_fidelity", "served_fidelity", "served_raw"])
        rows = store.scores_df(["served_fidelity"], wide=False)
    assert len(rows) == len(rows["candidate_id"].unique()) == len(s)  # each scored once
    for served in ("served_fidelity", "served_raw"):  # PNG and raw pixels
        assert np.array_equal(s[served].to_numpy(), s["toy_fidelity"].to_numpy(),
                              equal_nan=True)
