"""The studio in a real browser: headless Debian Chromium driven by Playwright's Python package
(the flags are in tests/test_studio_browser.py's fixture; never `playwright install`). One studio serves the whole module and the tests walk
the toy world through every tab in order: load the toy prompts, generate, score, move a weight
slider and watch the kept count change, open a group, train a few steps and watch loss points
appear, cancel a second run, compare base and tuned; plus settings round-trip, a bad upload,
and what the server refuses to serve.

Settings are tiny (4 prompts, V=2, S=2, 4 denoising steps, 3 training steps) so the module runs
in well under the 4-minute budget on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
JOB_TIMEOUT_MS = 120_000

if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

TINY = [
    "prompts.max_prompts=4", "prompts.max_eval_prompts=2", "prompts.num_variants=2",
    "generation.seeds_per_prompt=2", "generation.num_inference_steps=4",
    "generation.batch_size=24", "generation.early_reject=false", "filter.top_k=10",
    "train.steps=3", "train.effective_batch=4", "train.micro_batch=4",
    "train.checkpoint_every=2", "train.preview_every=2",
    "train.preview_prompts=[a red circle on a blue background, "
    "a green square on a white background]",
    "eval.num_prompts=2", "eval.seeds_per_prompt=2", "eval.num_inference_steps=4",
    "eval.batch_size=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_model(tmp_path_factory) -> str:
    """The shipped toy base model, or (before it is trained) a random-weight model of exactly
    its architecture, built from config: the studio's wiring does not depend on image quality."""
    from craft.run.config import PROJECT_ROOT

    shipped = PROJECT_ROOT / "assets" / "toy-base"
    if (shipped / "model_index.json").exists():
        return str(shipped)
    import torch

    from craft.toyworld import model as toy

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("toy-random")
    tok = toy.load_tokenizer(toy.write_tokenizer(out / "tok"))
    pipe = toy.assemble_pipeline(toy.build_vae(), toy.build_text_encoder(tok), tok,
                                 toy.build_unet())
    pipe.save_pretrained(out / "model")
    return str(out / "model")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from studio.app import build_app, launch

    model = toy_model(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("studio") / "run"
    app = build_app(run_dir, overrides=[*TINY, f"model.pretrained={model}"])
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.demo.close()


@pytest.fixture(scope="module")
def page(studio):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        # Gradio's Dataframe is a virtualised grid: count rows by its aria-rowcount.
        pg.add_init_script("window.ROWS = id => { const g = document.querySelector("
                           "'#' + id + ' [role=grid]'); "
                           "return g ? Number(g.getAttribute('aria-rowcount')) - 1 : 0; };")
        pg.goto(studio[1])
        pg.wait_for_selector("#run-info")
        pg.get_by_role("tab", name="Compare").wait_for()
        yield pg
        browser.close()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def wait_job(page, kind: str, status: str = "done", timeout: int = JOB_TIMEOUT_MS,
             title: str | None = None) -> None:
    """Wait until the job panel of ``kind`` shows a finished job (titled ``title``, if given);
    fail with its log if it finished otherwise."""
    if title is not None:
        page.wait_for_selector(f"#{kind}-job-status:has-text({json.dumps(title)})",
                               timeout=timeout)
    finished = ", ".join(f"#{kind}-job-bar .job-bar[data-status='{s}']"
                         for s in ("done", "failed", "cancelled"))
    page.wait_for_selector(finished, timeout=timeout)
    got = page.get_attribute(f"#{kind}-job-bar .job-bar", "data-status")
    if got != status:
        log = page.input_value(f"#{kind}-job-log textarea")
        status_line = page.inner_text(f"#{kind}-job-status")
        raise AssertionError(f"{kind} job ended {got!r}, expected {status!r}: {status_line}\n"
                             f"{log}")


def fill(page, elem_id: str, value: str) -> None:
    """Type into a Textbox (a textarea) or a Number (an input) by its elem_id."""
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def chosen_models(page) -> list[str]:
    """The tuned models Compare has chosen (its multiselect's tokens)."""
    return [t.strip() for t in page.locator("#compare-tuned .token span").all_inner_texts()]


def choose_models(page, labels: list[str]) -> None:
    """Make Compare's multiselect hold exactly ``labels``."""
    for label in chosen_models(page):
        if label not in labels:
            page.locator(f"#compare-tuned .token:has-text('{label}') .token-remove").click()
    for label in labels:
        if label not in chosen_models(page):
            page.click("#compare-tuned input")
            page.get_by_role("option", name=label, exact=True).click()
    page.keyboard.press("Escape")
    assert sorted(chosen_models(page)) == sorted(labels)


def table_rows(page, elem_id: str) -> int:
    return page.evaluate(f"() => ROWS('{elem_id}')")


# ------------------------------------------------------------------------------ the walk


def test_tabs_are_named_as_the_loop(page):
    names = [t.inner_text().strip() for t in page.get_by_role("tab").all()]
    assert names[:7] == ["Prompts", "Generate", "Score", "Curate", "Groups", "Train", "Compare"]


def test_prompts_load_the_toy_set(page, studio):
    tab(page, "Prompts")
    page.click("#prompts-preview")
    page.wait_for_function(
        "() => ROWS('prompts-preview-table') > 0")
    page.click("#prompts-add")
    wait_job(page, "prompts")
    page.wait_for_function("() => ROWS('prompts-stored') >= 6")  # 4 training + 2 held-out prompts
    counts = studio[0].ctx.counts()
    assert counts["prompts"] == 4 and counts["eval_prompts"] == 2 and counts["variants"] == 8


def test_bad_upload_shows_an_error_and_loses_nothing(page, studio, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,colour\n1,red\n2,blue\n")
    page.get_by_label("Upload a file").check()
    page.set_input_files("#prompts-upload input[type=file]", str(bad))
    page.wait_for_selector("#prompts-message .studio-error", timeout=30_000)
    assert "column" in page.inner_text("#prompts-message").lower()
    assert studio[0].ctx.counts()["prompts"] == 4  # the run's prompts are untouched


def test_pasted_prompts_are_previewed(page, studio):
    page.get_by_label("Paste text").check()
    fill(page, "prompts-paste", "a red circle on a blue background\n\n"
                                "a green square on a white background\n"
                                "a red circle on a blue background\n")
    page.get_by_role("button", name="Use pasted text").click()
    page.wait_for_selector("#prompts-message:has-text('1 duplicate')")
    assert table_rows(page, "prompts-preview-table") == 2
    assert "pasted-" in page.input_value("#prompts-source textarea")
    assert studio[0].ctx.counts()["prompts"] == 4  # previewed, not added


def test_generate_in_the_background(page, studio):
    tab(page, "Generate")
    page.click("#gen-start")
    wait_job(page, "generate")
    page.wait_for_function("() => document.querySelectorAll('#gen-gallery img').length > 0")
    assert studio[0].ctx.counts()["candidates"] == 4 * 3 * 2  # prompts x (1+V) x S


def test_score_shows_histograms_and_correlations(page, studio):
    tab(page, "Score")
    page.click("#score-start")
    wait_job(page, "score")
    page.wait_for_function("() => ROWS('score-table') >= 3")
    page.wait_for_selector("#score-hists .js-plotly-plot")
    page.wait_for_selector("#score-corr .js-plotly-plot")


def kept_number(page) -> int:
    return int(page.inner_text("#kept-number"))


def wait_kept(page, js_condition: str) -> None:
    """Wait until ``js_condition`` holds for n, the displayed kept count."""
    page.wait_for_function("() => { const e = document.querySelector('#kept-number'); "
                           "if (!e || e.innerText === '') return false; "
                           f"const n = Number(e.innerText); return {js_condition}; }}")


def release(page, elem_id: str, value: str) -> None:
    """Set a slider and let go of it (the range input's pointerup is Gradio's release)."""
    slider = page.locator(f"#{elem_id} input[type=range]")
    slider.fill(value)
    slider.dispatch_event("pointerup")


def test_curate_sliders_change_what_is_kept(page, studio):
    tab(page, "Curate")
    page.wait_for_selector("#kept-number")
    page.wait_for_function("() => document.querySelectorAll('#curate-grid img').length > 0")
    before = kept_number(page)  # I_hpa, top-K 10
    assert 0 < before <= 10
    # top-K moves the count
    page.get_by_label("none (keep every scorable)").check()
    wait_kept(page, "n === 10")
    release(page, "curate-topk", "3")
    wait_kept(page, "n === 3")
    page.get_by_label("I_hpa (h, p and a; strictest)").check()
    release(page, "curate-topk", "10")
    wait_kept(page, f"n === {before}")
    # a weight moves the composite: the cut-off, the captions and the weighted count follow
    line = page.inner_text("#curate-kept")
    captions = page.inner_text("#curate-grid")
    release(page, "curate-weight-toy_fidelity", "0")
    page.wait_for_function(f"() => document.querySelector('#curate-kept').innerText !== "
                           f"{json.dumps(line)}")
    page.wait_for_function(f"() => document.querySelector('#curate-grid').innerText !== "
                           f"{json.dumps(captions)}")
    page.wait_for_selector("#curate-hist .js-plotly-plot")
    # the margin moves the count
    release(page, "curate-margin", "2")
    wait_kept(page, f"n < {before}")
    release(page, "curate-margin", "0")
    wait_kept(page, f"n === {before}")


def test_curate_select_exclude_and_undo(page, studio):
    """A click selects (and explains) an image; Exclude excludes it by hand; the view of hand
    exclusions shows it; Undo restores the automatic choice."""
    ctx = studio[0].ctx
    page.wait_for_function("() => document.querySelectorAll('#curate-grid img').length > 0")
    before = kept_number(page)
    first = page.locator("#curate-grid .tg-item").first
    cid = int(first.get_attribute("data-id"))
    first.click()
    page.wait_for_selector(f"#curate-why:has-text('#{cid}')")
    assert ctx.store.overrides() == {}  # selecting changes nothing
    page.click("#curate-exclude")
    wait_kept(page, f"n === {before - 1}")
    assert ctx.store.overrides() == {cid: "exclude"}
    page.get_by_label("excluded by hand").check()
    page.wait_for_function("() => document.querySelectorAll('#curate-grid img').length == 1")
    page.click("#curate-undo")
    wait_kept(page, f"n === {before}")
    assert ctx.store.overrides() == {}
    page.get_by_label("kept", exact=True).check()


def test_curate_export_writes_an_imagefolder(page, studio):
    page.click("#curate-export")
    page.wait_for_selector("#curate-message:has-text('exported')")
    exports = sorted((studio[0].ctx.run_dir / "exports").glob("kept-*/metadata.jsonl"))
    rows = [json.loads(x) for x in exports[-1].read_text().splitlines()]
    assert len(rows) == kept_number(page)
    assert all((exports[-1].parent / r["file_name"]).exists() for r in rows)
    assert {"text", "composite", "advantage", "weight", "toy_fidelity"} <= set(rows[0])


def test_groups_open_a_group(page, studio):
    tab(page, "Groups")
    page.wait_for_function("() => ROWS('groups-all') == 4")
    page.locator("#groups-all .virtual-row [role=gridcell]").nth(2 * 10 + 1).click()
    page.wait_for_function("() => document.querySelectorAll('#groups-gallery img').length == 6")
    assert "★ ref" in page.inner_text("#groups-gallery")  # the original prompt's images
    page.wait_for_selector("#groups-bars .js-plotly-plot")
    assert table_rows(page, "groups-table") == 6
    assert "pass I_hpa" in page.inner_text("#groups-table")


def loss_points(page) -> int:
    return page.evaluate("""() => {
        const plot = document.querySelector('#train-loss .js-plotly-plot');
        if (!plot || !plot.data || !plot.data.length) return 0;
        return plot.data[0].x.length;
    }""")


def test_train_a_few_steps_and_watch_the_loss(page, studio):
    tab(page, "Train")
    fill(page, "train-name", "tiny")
    page.click("#train-start")
    page.wait_for_function("() => { const p = document.querySelector('#train-loss "
                           ".js-plotly-plot'); return p && p.data && p.data.length && "
                           "p.data[0].x.length >= 1; }", timeout=JOB_TIMEOUT_MS)
    wait_job(page, "train", title="Train tiny")
    page.wait_for_function("() => { const p = document.querySelector('#train-loss "
                           ".js-plotly-plot'); return p && p.data[0].x.length === 3; }")
    assert loss_points(page) == 3
    page.wait_for_function("() => document.querySelectorAll('#train-previews img').length >= 2")
    final = studio[0].ctx.run_dir / "train" / "tiny" / "final" / "model_index.json"
    assert final.exists()
    # the runs table says what the run trained on: its kept count and selection settings
    page.wait_for_function("() => document.querySelector('#train-runs').innerText"
                           ".includes('hpa, K 10')")
    runs = studio[0].ctx.store.train_runs_df()
    row = runs[runs["name"] == "tiny"].iloc[0]
    items = studio[0].ctx.store.selection_items_df(int(row["selection_id"]))
    assert len(items) > 0 and items["weight"].notna().all()


def test_cancel_a_second_run(page, studio):
    ctx = studio[0].ctx
    fill(page, "train-steps", "400")
    page.get_by_text("More hyper-parameters").click()
    fill(page, "train-checkpoint-every", "0")
    fill(page, "train-preview-every", "0")
    fill(page, "train-name", "long")
    page.click("#train-start")
    page.wait_for_selector("#train-job-status:has-text('Train long'):has-text(': running')")
    page.wait_for_function("() => { const p = document.querySelector('#train-loss "
                           ".js-plotly-plot'); return p && p.data && p.data.length && "
                           "p.layout.title.text.includes('long') && p.data[0].x.length >= 2; }",
                           timeout=JOB_TIMEOUT_MS)
    page.click("#train-cancel")
    wait_job(page, "train", status="cancelled", title="Train long")
    runs = ctx.store.train_runs_df()
    last = runs[runs["name"] == "long"].iloc[-1]
    assert last["status"] == "cancelled"
    steps = int(ctx.store.metrics_df(int(last["id"]))["step"].max())
    assert 2 <= steps < 400
    ckpt = ctx.run_dir / "train" / "long" / f"checkpoint-{steps}" / "unet"
    assert ckpt.is_dir(), "a cancelled run leaves a loadable checkpoint"
    page.wait_for_function("() => document.querySelector('#train-runs').innerText"
                           ".includes('cancelled')")
    # resume it: training goes on from the checkpoint's step, then cancel it again
    page.click("#train-resume-name input")
    page.get_by_role("option", name="long", exact=True).click()
    page.click("#train-resume")
    page.wait_for_selector("#train-job-status:has-text('Resume long'):has-text(': running')")
    page.wait_for_function("() => { const p = document.querySelector('#train-loss "
                           f".js-plotly-plot'); return p && Math.max(...p.data[0].x) > {steps}; }}",
                           timeout=JOB_TIMEOUT_MS)
    page.click("#train-cancel")
    wait_job(page, "train", status="cancelled", title="Resume long")
    runs = ctx.store.train_runs_df()
    resumed = runs[runs["name"] == "long"]
    assert len(resumed) == 1, "a resumed run keeps its one row (listed once)"
    metrics = ctx.store.metrics_df(int(resumed["id"].iloc[0]))
    assert resumed["status"].iloc[0] == "cancelled"
    assert metrics["step"].tolist() == list(range(1, int(metrics["step"].max()) + 1))
    assert int(metrics["step"].max()) > steps


def test_two_process_training_from_the_page(page, studio):
    """processes = 2 runs `accelerate launch --num_processes 2 -m craft.cli train` from the
    page: its progress shows, Cancel stops the subprocesses at a step with a checkpoint, Resume
    continues it (one training run, one row) to the end and publishes RUN/final."""
    ctx = studio[0].ctx
    fill(page, "train-steps", "48")
    fill(page, "train-micro-batch", "2")  # effective batch 4 = 2 per process x 2 processes
    fill(page, "train-checkpoint-every", "10")
    fill(page, "train-name", "multi")
    fill(page, "train-processes", "2")
    page.click("#train-start")
    page.wait_for_selector("#train-job-status:has-text('Train multi (2 processes)'):has-text(': running')")
    page.wait_for_selector("#train-job-status:has-text('/48 step')", timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("() => { const p = document.querySelector('#train-loss "
                           ".js-plotly-plot'); return p && p.data && p.data.length && "
                           "p.layout.title.text.includes('multi') && p.data[0].x.length >= 12; }",
                           timeout=JOB_TIMEOUT_MS)
    log = page.input_value("#train-job-log textarea")
    assert "accelerate launch --multi_gpu --num_processes 2" in log.replace("\n", " ")
    page.click("#train-cancel")
    wait_job(page, "train", status="cancelled", title="Train multi (2 processes)")
    runs = ctx.store.train_runs_df()
    row = runs[runs["name"] == "multi"]
    assert row["status"].tolist() == ["cancelled"]
    steps = int(ctx.store.metrics_df(int(row["id"].iloc[0]))["step"].max())
    assert 12 <= steps < 48
    assert (ctx.run_dir / "train" / "multi" / f"checkpoint-{steps}" / "unet").is_dir()
    page.wait_for_function("() => document.querySelector('#train-runs').innerText"
                           ".includes('cancelled')")
    page.click("#train-resume-name input")
    page.get_by_role("option", name="multi", exact=True).click()
    page.click("#train-resume")
    page.wait_for_selector("#train-job-status:has-text('Resume multi (2 processes)'):has-text(': running')")
    wait_job(page, "train", status="done", title="Resume multi (2 processes)")
    runs = ctx.store.train_runs_df()
    row = runs[runs["name"] == "multi"]
    assert row["status"].tolist() == ["done"]
    metrics = ctx.store.metrics_df(int(row["id"].iloc[0]))
    assert metrics["step"].tolist() == list(range(1, 49))
    sel = json.loads(ctx.store.selections_df().set_index("id").loc[
        int(row["selection_id"].iloc[0]), "settings_json"])
    assert sel["processes"] == 2 and len(set(sel["digest_by_process"])) == 1
    final = json.loads((ctx.run_dir / "final" / "craft_train.json").read_text())
    assert final["run_name"] == "multi" and final["steps"] == 48
    fill(page, "train-processes", "1")
    fill(page, "train-micro-batch", "4")


def test_compare_base_and_tuned(page, studio):
    tab(page, "Compare")
    page.wait_for_selector("#compare-tuned .token")  # the newest model, chosen by default
    choose_models(page, ["tiny · final"])
    page.click("#compare-start")
    wait_job(page, "compare")
    page.wait_for_function("() => ROWS('compare-wins') "
                           ">= 4")
    text = page.inner_text("#compare-wins")
    assert "toy_heldout (held out)" in text and "win rate" in text
    assert "diversity across seeds" in text  # the price of alignment, beside the rewards
    page.wait_for_selector("#compare-head:has-text('Diversity across seeds')")
    page.wait_for_selector("#compare-head:has-text('Kept set of tiny')")
    page.wait_for_function("() => document.querySelectorAll('#compare-pairs img').length == 4")
    page.wait_for_selector("#compare-bars .js-plotly-plot")
    assert studio[0].ctx.counts()["evaluations"] == 1


def train_and_show(page, name: str, images: int) -> None:
    """Start a training run named ``name``, wait for it, and for ``images`` images of what it
    trained on."""
    fill(page, "train-name", name)
    page.click("#train-start")
    wait_job(page, "train", title=f"Train {name}")
    page.wait_for_function("() => document.querySelectorAll('#train-trained-on img').length "
                           f">= {images}")


def test_dpo_and_grpo_from_train_then_three_methods_in_compare(page, studio):
    """The baselines from the Train tab: a DPO run (its pairs shown side by side) and an online
    GRPO run (the groups it sampled shown), then CRAFT, DPO and GRPO against the base in one
    Compare, on the same seeds."""
    ctx = studio[0].ctx
    tab(page, "Train")
    page.locator("#train-method").get_by_text("dpo", exact=True).click()
    page.wait_for_selector("#train-dpo-beta", state="visible")
    page.wait_for_selector("#train-will:has-text('pairs')")
    fill(page, "train-steps", "4")
    fill(page, "train-dpo-beta", "500")
    train_and_show(page, "dpo-1", 2)
    assert "winner" in page.inner_text("#train-trained-on")
    page.wait_for_selector("#train-runs:has-text('DPO:')")
    page.locator("#train-method").get_by_text("grpo", exact=True).click()
    page.wait_for_selector("#train-grpo-group-size", state="visible")
    for key, value in (("prompts-per-step", "2"), ("group-size", "4"),
                       ("num-inference-steps", "3"), ("updates", "2")):
        fill(page, f"train-grpo-{key}", value)
    page.locator("#train-grpo-updates input").blur()
    page.wait_for_selector("#train-will:has-text('2 prompts × 4 images')")
    train_and_show(page, "grpo-1", 4)
    assert "round" in page.inner_text("#train-trained-on")
    assert len(ctx.store.candidates_df(model="grpo:grpo-1")) == 2 * 2 * 4  # 2 rounds
    tab(page, "Compare")
    page.click("button:has-text('↻')")
    choose_models(page, ["tiny · final", "dpo-1 · final", "grpo-1 · final"])
    page.click("#compare-start")
    wait_job(page, "compare")
    page.wait_for_selector("#compare-wins:has-text('grpo-1')")
    text = page.inner_text("#compare-wins")
    assert "tiny" in text and "dpo-1" in text and "diversity across seeds" in text
    page.wait_for_function("() => document.querySelectorAll('#compare-pairs img').length == 4")
    tab(page, "Train")  # back to CRAFT for the tests that follow
    page.locator("#train-method").get_by_text("craft", exact=True).click()


def test_settings_round_trip(page, studio, tmp_path):
    from craft.run.config import load_config

    tab(page, "Train")
    fill(page, "train-steps", "400")  # set here: the test does not depend on earlier ones
    fill(page, "train-lr", "0.00042")
    page.locator("#train-lr input").first.blur()
    page.get_by_text("Settings: save as / load from").click()
    page.click("#settings-save")
    page.wait_for_selector("#settings-message:has-text('saved to')")
    saved = studio[0].ctx.run_dir / "studio-settings.yaml"
    cfg = load_config(saved)  # what `craft run --config` reads
    assert cfg.train.lr == pytest.approx(0.00042) and cfg.train.steps == 400
    assert cfg.filter.weights["toy_fidelity"] == 0.0
    # load a different one: the controls follow
    other = tmp_path / "other.yaml"
    other.write_text(saved.read_text().replace("steps: 400", "steps: 77"))
    page.set_input_files("#settings-load input[type=file]", str(other))
    page.wait_for_selector("#settings-message:has-text('loaded')")
    page.wait_for_function("() => document.querySelector('#train-steps input').value === '77'")
    # what these settings need: the toy world has everything
    page.click("#settings-check")
    page.wait_for_selector("#settings-message:has-text('of 12 ready')")
    assert page.locator("#settings-message table tr").count() == 13  # header + 12 items


def open_run(page, path) -> None:
    box = page.locator("#run-dir textarea, #run-dir input").first
    box.fill(str(path))
    box.press("Enter")
    page.click("#run-open")


def test_run_selector_creates_and_reopens_runs(page, studio, tmp_path):
    app = studio[0]
    original = app.ctx.run_dir
    open_run(page, tmp_path / "second")
    page.wait_for_selector("#run-info:has-text('second')")
    assert "0 candidates" in page.inner_text("#run-info")
    assert (tmp_path / "second" / "store.sqlite").exists()
    open_run(page, original)
    page.wait_for_selector(f"#run-info:has-text('{original.name}')")
    page.wait_for_selector("#run-info:has-text('24 candidates')")
    assert app.ctx.run_dir == original


def test_server_serves_only_the_run_and_assets(studio):
    app, url = studio
    image = app.ctx.store.candidates_df()["image_path"].iloc[0]
    ok = urllib.request.urlopen(f"{url}gradio_api/file={image}")
    assert ok.status == 200
    for path in ("/etc/passwd", str(Path(__file__).resolve())):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={path}")
        assert e.value.code == 403


def test_auth_guards_pages_and_files(tmp_path):
    import http.cookiejar

    from craft.run.store import RunStore
    from studio.app import build_app, launch
    from studio_sample_data import populate

    with RunStore(tmp_path / "run") as store:
        populate(store, n_prompts=1, num_variants=0, seeds=1, eval_prompts=0)
    app = build_app(tmp_path / "run")
    port = _free_port()
    launch(app, port=port, auth=("ada", "s3cret"), block=False, quiet=True)
    try:
        assert app.demo.server_name == "127.0.0.1"
        url = f"http://127.0.0.1:{port}/"
        image = app.ctx.store.candidates_df()["image_path"].iloc[0]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={image}")
        assert e.value.code in (401, 403)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{url}login", data=b"username=ada&password=wrong")
        opener.open(f"{url}login", data=b"username=ada&password=s3cret")
        assert opener.open(f"{url}gradio_api/file={image}").status == 200
    finally:
        app.demo.close()


def test_uploads_are_size_limited(studio):
    _, url = studio
    boundary = "craftboundary"
    payload = b"a red circle on a blue background\n" * (21 * 1024 * 1024 // 34 + 1)  # > 20 MB
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.txt\"\r\nContent-Type: text/plain\r\n\r\n").encode() + payload + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 413


def test_online_rounds_from_the_page(page, studio):
    """Two rounds of online CRAFT as one job: the second generates with the first's model.
    Last in the module: it adds a second model's candidates to the run."""
    ctx = studio[0].ctx
    tab(page, "Train")
    fill(page, "train-steps", "4")
    fill(page, "train-rounds", "2")
    fill(page, "train-name", "online")
    page.locator("#train-rounds input").press("Enter")
    page.click("#train-start")
    page.wait_for_selector("#train-message:has-text('2 rounds')")
    wait_job(page, "train", title="Train online (2 rounds)")
    runs = ctx.store.train_runs_df().set_index("name")
    assert runs.loc["online.r1", "status"] == runs.loc["online.r2", "status"] == "done"
    r1 = str(ctx.run_dir / "train" / "online.r1" / "final")
    cands = ctx.store.candidates_df()
    assert (cands["model"] == r1).sum() == (cands["model"] == ctx.cfg.model.pretrained).sum()
    page.wait_for_function("() => document.querySelector('#train-runs').innerText"
                           ".includes('online.r2')")
    fill(page, "train-rounds", "1")
    page.locator("#train-rounds input").press("Enter")
    page.wait_for_function("() => document.querySelector('#train-rounds input').value === '1'")
