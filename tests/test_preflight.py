"""`craft config check`: every piece a run will read, listed at once, found or missing."""

from __future__ import annotations

import pytest

import reward_fixtures as rf
from craft.cli.main import main
from craft.run.config import PROJECT_ROOT


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CRAFT_LLM_API_KEY", raising=False)


def lines(out: str) -> dict[str, str]:
    """{item: 'ok' | 'MISSING'} from the report."""
    rows = {}
    for line in out.splitlines()[:-1]:
        status, rest = line.split(None, 1)
        rows[rest.split("  ")[0].strip()] = status
    return rows


def test_the_toy_world_is_ready(capsys):
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert set(lines(out).values()) == {"ok"}
    assert "reward toy_heldout (evaluation only)" in out and out.rstrip().endswith(
        "12 of 12 ready; `craft run` will find everything it reads")
    assert "memory plan (1 x H100)" in out and "every stage fits 1 x 79.1 GiB" in out


def test_the_memory_plan_line_names_what_does_not_fit_and_the_change(capsys):
    assert main(["config", "check", "--gpu-memory", "1.05", "--no-plan"]) == 0
    capsys.readouterr()
    assert main(["config", "check", "--gpu-memory", "1.05"]) == 2
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "memory plan" in x)
    assert line.startswith("MISSING") and "training: one step needs" in line
    assert "the cheapest change that fits every stage: --set " in line


def test_a_real_config_on_a_bare_machine_lists_every_missing_piece(capsys):
    assert main(["config", "check", str(PROJECT_ROOT / "configs" / "sdxl.yaml"),
                 "--no-plan"]) == 2
    out = capsys.readouterr().out
    status = lines(out)
    assert status == {
        "model": "MISSING", "training prompts": "MISSING", "evaluation prompts": "MISSING",
        "expander llm_http": "MISSING", "reward hpsv21 (filter, role h)": "MISSING",
        "reward pickscore (filter, role p)": "MISSING", "reward aes (filter, role a)": "MISSING",
        "reward imagereward (evaluation only)": "MISSING", "training options": "ok",
        "diversity encoder dinov2 (evaluation)": "MISSING"}
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in out
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in out
    assert "CRAFT_LLM_API_KEY is not set" in out
    assert out.rstrip().endswith("1 of 10 ready; fix the 9 MISSING line(s) before `craft run`")


def test_found_pieces_say_where(capsys, tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "train.txt").write_text("a photo of a cat\na photo of a dog\na photo of a cat\n")
    (tmp_path / "eval.txt").write_text("a photo of a bird\n")
    clip = rf.write_tiny_clip(tmp_path / "pickscore", with_processor=False)
    monkeypatch.setenv("CRAFT_LLM_API_KEY", "k")
    args = ["config", "check", "--no-plan", "--set", f"model.pretrained={tiny_model_dir}",
            "--set", f"prompts.source={tmp_path / 'train.txt'}",
            "--set", f"prompts.eval_source={tmp_path / 'eval.txt'}",
            "--set", "prompts.expander=llm_http",
            "--set", "prompts.expander_url=https://llm.example/v1",
            "--set", "rewards.eval_names=[toy_heldout, pickscore]",
            "--set", f"rewards.paths={{pickscore: {clip}}}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"-> {tiny_model_dir}" in out
    assert "2 prompts from" in out and "(1 skipped: duplicate)" in out and "1 prompts from" in out
    pick = next(x for x in out.splitlines() if "reward pickscore (evaluation only)" in x)
    assert pick.startswith("ok") and pick.endswith(f"model {clip}")  # processor: shipped files
    assert "HTTP endpoint https://llm.example/v1 (not contacted" in out


def test_a_local_llm_expander_folder_is_checked(capsys, tmp_path):
    assert main(["config", "check", "--set", "prompts.expander=llm_local",
                 "--set", f"prompts.expander_model={tmp_path / 'nope'}"]) == 2
    out = capsys.readouterr().out
    assert lines(out)["expander llm_local"] == "MISSING"
    assert "config.json missing" in out and "prompts.expander=template" in out
