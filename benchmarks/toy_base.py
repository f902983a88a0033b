"""Measure the shipped toy base model: prompt following, and how much room it leaves CRAFT.

For N (prompt, seed) pairs it renders the plain prompt, the full rich rewrite, and the plain
prompt plus each single rich word, all with the same seed, and scores every image against the
plain prompt. Writes benchmarks/toy_base.md and benchmarks/toy_base_grid.png.

    .venv/bin/python benchmarks/toy_base.py [--model assets/toy-base] [--pairs 240]
    .venv/bin/python benchmarks/toy_base.py --model assets/toy-flow --name toy_base_flow

The same bar holds for both toy bases (the UNet one and the flow-matching MMDiT one): plain
prompts give the right object and background colour >= 60 % of the time, and rich captions are
ahead on the aesthetic reward by >= 10 standard errors (craft/toyworld/train_base.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from craft.stages.generation import SamplingParams, generate_images  # noqa: E402
from craft.toyworld.grammar import (PALETTE, Scene, all_plain_prompts, caption,  # noqa: E402
                                    parse_caption, rich_caption)
from craft.toyworld.rewards import TOY_REWARDS, analyse, components  # noqa: E402

WORDS = {"size": "large", "sharpness": "sharp", "position": "in the center", "texture": "plain"}
# What each single word should move, and the direction that counts as "as asked".
WORD_METRIC = {"size": ("radius", "object radius (px)"),
               "sharpness": ("edge_contrast", "edge contrast (0-1)"),
               "position": ("centre_offset", "distance from centre (px)"),
               "texture": ("background_std", "background std (RGB)")}
POSITION_PROBES = ("in the top left", "on the right", "at the bottom")
_NAMES = list(PALETTE)
_PAL = np.array(list(PALETTE.values()), dtype=np.float32)


def position_caption(plain: str, position: str) -> str:
    p = parse_caption(plain)
    return caption(Scene(p["colour"], p["shape"], p["background"], position=position),
                   ["position"])


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PAL - np.asarray(rgb, np.float32), axis=1)))]


def measure(images, plain_prompts) -> dict[str, np.ndarray]:
    arrs = [np.asarray(im) for im in images]
    out = {name: fn(arrs, plain_prompts) for name, fn in TOY_REWARDS.items()}
    rows = [analyse(a) for a in arrs]
    for field in ("radius", "edge_contrast", "centre_offset", "background_std", "centroid_dx",
                  "centroid_dy"):
        out[field] = np.array([getattr(r, field) for r in rows])
    parsed = [parse_caption(p) for p in plain_prompts]
    out["object_colour_ok"] = np.array([r.present and nearest_colour(r.object_rgb) == p["colour"]
                                        for r, p in zip(rows, parsed)], float)
    out["background_colour_ok"] = np.array([nearest_colour(r.background_rgb) == p["background"]
                                            for r, p in zip(rows, parsed)], float)
    comps = [components(a, p) for a, p in zip(arrs, plain_prompts)]
    out["shape_match"] = np.array([c["shape"] for c in comps])
    return out


def mean_se(x) -> str:
    x = np.asarray(x, float)
    return f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f}"


def grid(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], path: Path, scale=3):
    n = len(rows[0][1])
    cell = 32 * scale
    label_w = 330
    W = label_w + 2 * n * cell + 20
    H = 24 + len(rows) * (cell + 4)
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    d.text((label_w, 4), "plain prompt (seeds 0..)", fill="black")
    d.text((label_w + n * cell + 20, 4), "full rich rewrite (same seeds)", fill="black")
    for r, (label, plain, rich) in enumerate(rows):
        y = 24 + r * (cell + 4)
        d.text((4, y + cell // 2 - 6), label, fill="black")
        for i, im in enumerate(plain):
            canvas.paste(im.resize((cell, cell), Image.NEAREST), (label_w + i * cell, y))
        for i, im in enumerate(rich):
            canvas.paste(im.resize((cell, cell), Image.NEAREST),
                         (label_w + n * cell + 20 + i * cell, y))
    canvas.save(path)


def bar_line(P: dict, R: dict) -> str:
    """The prompt-following bar every toy base must pass, checked on these numbers."""
    d = R["toy_aesthetic"] - P["toy_aesthetic"]
    z = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    checks = [(P["object_colour_ok"].mean() >= 0.6, "object colour >= 60 %"),
              (P["background_colour_ok"].mean() >= 0.6, "background colour >= 60 %"),
              (z >= 10, f"rich ahead on toy_aesthetic by >= 10 SE ({z:.1f})")]
    verdict = "**passes**" if all(ok for ok, _ in checks) else "**fails**"
    return (f"- the bar (plain prompts): {verdict}: " +
            "; ".join(f"{what} {'yes' if ok else 'NO'}" for ok, what in checks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "assets" / "toy-base"))
    ap.add_argument("--pairs", type=int, default=240)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="toy_base",
                    help="output stem: NAME.md and NAME_grid.png under --out")
    ap.add_argument("--no-position", action="store_true",
                    help="skip the position-phrase probes (3 of the 9 conditions)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from craft.run.distributed import setup_process

    setup_process()  # flush denormals (the rule lives there)
    from craft.models.loading import load_pipeline
    from craft.models.families import family_of

    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    sampler = type(pipe.scheduler).__name__.replace("Scheduler", "")
    params = SamplingParams(num_inference_steps=args.steps, guidance_scale=args.guidance)
    plains = all_plain_prompts()
    plain = [plains[i % len(plains)] for i in range(args.pairs)]
    seeds = [1000 + i for i in range(args.pairs)]
    conditions = {"plain": plain, "rich": [rich_caption(p) for p in plain]}
    for attr, word in WORDS.items():
        conditions[f"+{word}"] = [rich_caption(p, [attr]) for p in plain]
    probes = () if args.no_position else POSITION_PROBES
    for pos in probes:
        conditions[pos] = [position_caption(p, pos) for p in plain]
    t0 = time.time()
    images, results = {}, {}
    for name, prompts in conditions.items():
        images[name] = [im for _, b in generate_images(pipe, prompts, seeds, params, 64)
                        for im in b]
        results[name] = measure(images[name], plain)
    elapsed = time.time() - t0
    n_images = sum(len(v) for v in images.values())

    P, R = results["plain"], results["rich"]
    lines = [
        "# Toy base model: prompt following and room for alignment",
        "",
        f"Model `{Path(args.model).name}` ({type(pipe).__name__}, family {family_of(pipe)}); "
        f"{args.pairs} (plain prompt, seed) pairs cycling over all "
        f"{len(plains)} plain prompts, seeds 1000–{999 + args.pairs}; {sampler} {args.steps} "
        f"steps, guidance {args.guidance}; every image scored against its **plain** prompt. "
        f"{n_images} images in {elapsed:.0f} s on {platform.processor() or platform.machine()} "
        f"({args.threads} threads). Reproduce: `.venv/bin/python benchmarks/toy_base.py"
        f"{'' if args.name == 'toy_base' else f' --model {args.model} --name {args.name}'}`.",
        "",
        "## Prompt following on plain prompts",
        "",
        f"- right object colour (nearest palette colour of the segmented object): "
        f"**{100 * P['object_colour_ok'].mean():.1f} %** (rich prompts: "
        f"{100 * R['object_colour_ok'].mean():.1f} %)",
        f"- right background colour: **{100 * P['background_colour_ok'].mean():.1f} %** "
        f"(rich: {100 * R['background_colour_ok'].mean():.1f} %)",
        f"- shape match (toy classifier probability of the prompt's shape): "
        f"{mean_se(P['shape_match'])} (rich: {mean_se(R['shape_match'])})",
        "",
        bar_line(P, R),
        "",
        "## Every toy reward, plain vs full rich rewrite (mean ± standard error, shared seeds)",
        "",
        "| reward | plain | rich | paired diff (rich − plain) | diff / SE |",
        "|---|---|---|---|---|",
    ]
    for name in TOY_REWARDS:
        d = R[name] - P[name]
        se = d.std(ddof=1) / np.sqrt(len(d))
        lines.append(f"| {name} | {mean_se(P[name])} | {mean_se(R[name])} | "
                     f"{d.mean():+.3f} ± {se:.3f} | {d.mean() / se:+.1f} |")
    lines += [
        "",
        "## Effect of each rich word alone (plain vs plain + word, shared seeds)",
        "",
        "| word | measured | plain | plain + word | paired diff | diff / SE | toy_aesthetic diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for attr, word in WORDS.items():
        metric, label = WORD_METRIC[attr]
        W = results[f"+{word}"]
        d = W[metric] - P[metric]
        se = d.std(ddof=1) / np.sqrt(len(d))
        da = W["toy_aesthetic"] - P["toy_aesthetic"]
        lines.append(f"| \"{word}\" | {label} | {mean_se(P[metric])} | {mean_se(W[metric])} | "
                     f"{d.mean():+.3f} ± {se:.3f} | {d.mean() / se:+.1f} | "
                     f"{da.mean():+.3f} ± {da.std(ddof=1) / np.sqrt(len(da)):.3f} |")
    lines += [
        "",
        "## Position phrases (plain vs plain + phrase, shared seeds)",
        "",
        "Signed centroid of the object relative to the image centre (pixels; x right, y down). "
        "A phrase that binds moves the centroid its way.",
        "",
        "| phrase | mean dx | mean dy | paired Δdx | paired Δdy |",
        "|---|---|---|---|---|",
        f"| (plain) | {mean_se(P['centroid_dx'])} | {mean_se(P['centroid_dy'])} | | |",
    ]
    for pos in probes:
        W = results[pos]
        ddx, ddy = W["centroid_dx"] - P["centroid_dx"], W["centroid_dy"] - P["centroid_dy"]
        lines.append(f"| \"{pos}\" | {mean_se(W['centroid_dx'])} | {mean_se(W['centroid_dy'])} | "
                     f"{mean_se(ddx)} | {mean_se(ddy)} |")
    lines += ["", "## Samples", "",
              f"![plain vs rich]({args.name}_grid.png)", "",
              "Each row: one plain prompt, 6 seeds; left the plain prompt, right its full rich "
              "rewrite with the same seeds (nearest-neighbour upscaled ×3).", ""]
    out = Path(args.out)
    (out / f"{args.name}.md").write_text("\n".join(lines))
    rows = []
    for k in range(12):
        idx = [k * 13 % args.pairs]
        p = plain[idx[0]]
        ims = [im for _, b in generate_images(pipe, [p] * 6, list(range(6)), params) for im in b]
        rich = [im for _, b in generate_images(pipe, [rich_caption(p)] * 6, list(range(6)), params)
                for im in b]
        rows.append((p, ims, rich))
    grid(rows, out / f"{args.name}_grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
