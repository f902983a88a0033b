"""Offline behaviour of the real configs, through the command line as a user meets it.

A config naming a model or reward weights that are not on this machine must stop ``craft run``
before any work: exit code 2, one line on stderr (no traceback) naming what is missing, where
it looked and how to provide it. The commands run as ``python -m craft.cli`` (the form
``accelerate launch -m craft.cli`` uses) with an empty Hugging Face cache and no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from craft.run.config import PROJECT_ROOT, load_config

# Any attempt to open a network connection in the child fails loudly.
NO_NETWORK = ("import socket\n"
              "def _refuse(*a, **k):\n"
              "    raise SystemExit('network access attempted')\n"
              "socket.socket.connect = _refuse\n"
              "socket.getaddrinfo = _refuse\n")


def craft(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"),
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    code = NO_NETWORK + ("import runpy, sys\nsys.argv = ['craft', *sys.argv[1:]]\n"
                         "runpy.run_module('craft.cli', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("craft: error: "), proc.stderr
    return lines[0]


def assert_no_work(run_dir: Path) -> None:
    """Nothing was generated: no image written, no prompt expanded."""
    assert not list(run_dir.rglob("*.png"))
    if (run_dir / "store.sqlite").exists():
        from craft.run.store import RunStore

        with RunStore(run_dir) as store:
            assert store.variants_df("train").empty


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory, tiny_sdxl_pipe) -> str:
    out = tmp_path_factory.mktemp("tiny-sdxl-dir") / "model"
    tiny_sdxl_pipe.save_pretrained(out, safe_serialization=True)
    return str(out)


def test_real_configs_validate_with_the_papers_settings(capsys):
    from craft.cli.main import main

    for name, steps, micro in (("sd15", 120, 16), ("sdxl", 200, 4)):
        path = PROJECT_ROOT / "configs" / f"{name}.yaml"
        assert main(["config", "show", str(path)]) == 0
        cfg = load_config(path)
        assert cfg.model.family == name
        assert cfg.rewards.names == ("hpsv21", "pickscore", "aes")
        assert cfg.rewards.roles == {"h": "hpsv21", "p": "pickscore", "a": "aes"}
        assert "imagereward" in cfg.rewards.eval_names
        assert cfg.filter.weights == {"hpsv21": 0.4, "pickscore": 0.4, "aes": 0.2}
        assert (cfg.filter.level, cfg.filter.top_k) == ("hpa", 100)
        assert (cfg.train.lr, cfg.train.effective_batch, cfg.train.steps) == (5e-5, 128, steps)
        assert cfg.train.micro_batch == micro and not cfg.train.lora
        assert cfg.prompts.source == "data/hpdv2_train.json" and cfg.prompts.num_variants == 4
    assert load_config(PROJECT_ROOT / "configs" / "sdxl.yaml").model.gradient_checkpointing
    assert "pretrained: stabilityai/stable-diffusion-xl-base-1.0" in capsys.readouterr().out


def test_missing_base_model_fails_fast_with_one_teaching_line(tmp_path):
    proc = craft(["run", str(PROJECT_ROOT / "configs" / "sdxl.yaml"), "--run-dir",
                  str(tmp_path / "run")], tmp_path)
    line = one_line_error(proc)
    for part in ("model.pretrained='stabilityai/stable-diffusion-xl-base-1.0'",
                 str(tmp_path / "empty-hf-cache"), str(tmp_path / "stabilityai"),
                 "`hf download stabilityai/stable-diffusion-xl-base-1.0`",
                 "--set model.pretrained=/path/to/"):
        assert part in line, part
    assert_no_work(tmp_path / "run")


def test_missing_reward_weights_fail_fast_with_one_teaching_line(tmp_path, tiny_sdxl_dir):
    proc = craft(["run", str(PROJECT_ROOT / "configs" / "sdxl.yaml"), "--run-dir",
                  str(tmp_path / "run"), "--set", f"model.pretrained={tiny_sdxl_dir}"], tmp_path)
    line = one_line_error(proc)
    for part in ("hpsv21", "HPS_v2.1_compressed.pt", str(tmp_path / "empty-hf-cache"),
                 "hf download xswu/HPSv2", "--set rewards.paths.hpsv21="):
        assert part in line, part
    assert_no_work(tmp_path / "run")


def test_single_file_without_its_config_fails_fast(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"  # two SD1.x keys are enough to tell
    save_file({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight":
               torch.zeros(77, 8),
               "model.diffusion_model.output_blocks.11.0.skip_connection.weight":
               torch.zeros(8, 16, 1, 1)}, str(ckpt))
    proc = craft(["generate", "--config", str(PROJECT_ROOT / "configs" / "sd15.yaml"),
                  "--run-dir", str(tmp_path / "run"), "--set", f"model.pretrained={ckpt}"],
                 tmp_path)
    line = one_line_error(proc)
    for part in ("single-file checkpoint", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 '--include "*.json" "*.txt"', "--set model.single_file_config="):
        assert part in line, part


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_training_options_this_machine_cannot_run_fail_before_generation(tmp_path,
                                                                        tiny_sdxl_dir):
    proc = craft(["run", "--run-dir", str(tmp_path / "run"), "--set",
                  f"model.pretrained={tiny_sdxl_dir}", "--set", "model.family=auto",
                  "--set", "train.use_8bit_adam=true"], tmp_path)
    line = one_line_error(proc)
    assert "train.use_8bit_adam=true needs" in line and "use_8bit_adam=false" in line
    assert_no_work(tmp_path / "run")
