"""Walk the toy world through the studio in headless Chromium and save a screenshot of every tab
under docs/ (the README's "The studio" section shows them), at 1400 px wide and, as
``studio-<tab>-1024.png``, at 1024 px (a laptop screen).

    .venv/bin/python scripts/studio_screenshots.py [--run-dir /tmp/studio-shots] [--model PATH]

Everything is done through the page, as a user would: the first open, load the toy prompts, generate, score,
curate, open a group, train (CRAFT, then Diffusion-DPO and online GRPO on the same pool: shots
studio-train-dpo / studio-train-grpo), compare all three with the base. Settings are a reduced version of configs/toy.yaml so
the walk takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SETTINGS = [
    "prompts.max_prompts=24", "prompts.max_eval_prompts=12", "prompts.num_variants=4",
    "generation.seeds_per_prompt=4", "filter.top_k=100",
    "train.steps=150", "train.checkpoint_every=50", "train.preview_every=25",
    "eval.num_prompts=12", "eval.seeds_per_prompt=4",
]
JOB_MS = 1_800_000


def scroll_through(page) -> None:
    height = page.evaluate("document.body.scrollHeight")
    for y in range(0, height + 1000, 800):
        page.evaluate(f"window.scrollTo(0, {y})")
        time.sleep(0.3)
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="/tmp/studio-shots")
    ap.add_argument("--model", default=str(ROOT / "assets" / "toy-base"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    from craft.run.distributed import setup_process

    setup_process()  # flush denormals (the rule lives there)
    from playwright.sync_api import sync_playwright

    from studio.app import build_app, launch

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    app = build_app(run_dir, overrides=[*SETTINGS, f"model.pretrained={args.model}",
                                        *args.overrides])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, block=False, quiet=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Compare").wait_for()

        def tab(name: str) -> None:
            button = page.get_by_role("tab", name=name, exact=True)
            page.evaluate("window.scrollTo(0, 0)")
            try:
                button.click(timeout=15_000)
            except Exception:  # a page still reflowing below (plots, tables) never reads as
                button.click(force=True)  # "stable" to playwright; the tab itself is there
            time.sleep(2.5)

        def done(kind: str) -> None:
            page.wait_for_selector(f"#{kind}-job-bar .job-bar[data-status='done']", timeout=JOB_MS)
            time.sleep(2.5)

        def start_and_wait(kind: str, button: str) -> None:
            """Start a job and wait for *it* (the bar still shows the last job as done)."""
            page.click(button)
            page.wait_for_selector(f"#{kind}-job-bar .job-bar[data-status='running']",
                                   timeout=JOB_MS)
            done(kind)

        def shot(name: str) -> None:
            for width, suffix in ((1400, ""), (1024, "-1024")):
                page.set_viewport_size({"width": width, "height": 1000})
                scroll_through(page)  # galleries load their images lazily, when seen
                path = out / f"studio-{name.lower()}{suffix}.png"
                page.screenshot(path=str(path), full_page=True)
                print(f"wrote {path}", file=sys.stderr)
            page.set_viewport_size({"width": 1400, "height": 1000})

        t0 = time.time()
        page.wait_for_selector("#loop")
        shot("Open")  # what a first visit sees: the whole loop in one click, what each tab is for
        page.click("#prompts-preview")
        time.sleep(2)
        page.click("#prompts-add")
        done("prompts")
        shot("Prompts")
        tab("Generate")
        page.click("#gen-start")
        done("generate")
        shot("Generate")
        tab("Score")
        page.click("#score-start")
        done("score")
        shot("Score")
        tab("Curate")
        page.wait_for_function("() => document.querySelectorAll('#curate-grid img').length")
        page.locator("#curate-grid .tg-item").nth(2).click()  # its "why" shows below the grid
        page.get_by_text("Map of the pool: image embeddings in 2-D").click()
        page.click("#curate-map-start")
        done("map")
        time.sleep(2)
        shot("Curate")
        tab("Groups")
        page.locator("#groups-all .virtual-row [role=gridcell]").nth(1).click()
        time.sleep(3)
        shot("Groups")
        tab("Train")
        page.click("#train-start")
        done("train")
        time.sleep(2)
        shot("Train")
        page.locator("#train-method").get_by_text("dpo", exact=True).click()
        page.wait_for_selector("#train-will:has-text('pairs')")
        start_and_wait("train", "#train-start")
        time.sleep(2)
        shot("Train-dpo")  # its pairs side by side
        page.locator("#train-method").get_by_text("grpo", exact=True).click()
        page.wait_for_selector("#train-grpo-group-size", state="visible")
        page.fill("#train-steps input", "40")
        page.locator("#train-steps input").blur()
        page.wait_for_selector("#train-will:has-text('Start will sample')")
        start_and_wait("train", "#train-start")
        time.sleep(2)
        shot("Train-grpo")  # the groups it sampled
        tab("Compare")
        page.wait_for_selector(  # the newest model is chosen first
            "#compare-tuned .token:has-text('grpo-1 · final')")
        for label in ("craft-1 · final", "dpo-1 · final"):
            page.click("#compare-tuned input")
            page.get_by_role("option", name=label, exact=True).click()
        page.keyboard.press("Escape")
        page.click("#compare-start")
        done("compare")
        shot("Compare")
        print(f"walk took {time.time() - t0:.0f}s", file=sys.stderr)
        browser.close()
    app.demo.close()


if __name__ == "__main__":
    main()
