"""A Hugging Face model card (README.md) for every model a run publishes.

diffusers' training scripts leave a card beside every trained model; a model shared from here
should say as much: what it was trained from and on (method, kept set or pairs, rewards and
their weights, steps, batch, learning rate) and how it compares with its base on held-out
prompts (rewards with 95 % intervals, win rates, diversity, the drift warnings), with a grid of
base and tuned images on the same seeds. The card is written when training finishes
(:func:`write_card` from craft.stages.engine) and rewritten when an evaluation of the model lands, so
it never shows numbers from another model. The evaluation's numbers are also in the YAML
metadata (``craft_evaluation``), so tools read them without parsing the tables.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

CARD = "README.md"
GRID = "samples.png"

# Licenses of the bases this project ships configs for (their model cards), by hub id prefix.
LICENSES = {
    "stable-diffusion-v1-5/": ("creativeml-openrail-m", None),
    "runwayml/stable-diffusion-v1-5": ("creativeml-openrail-m", None),
    "stabilityai/stable-diffusion-xl": ("openrail++", None),
    "stabilityai/stable-diffusion-3": ("other", "stabilityai-ai-community"),
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None),
}
FAMILY_TAGS = {"sd15": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"],
               "sd3": ["sd3", "stable-diffusion-3"], "flux": ["flux"], "toy": ["craft-toy-world"]}
def _hub_id(base: str) -> str | None:
    """``base`` when it reads as a hub repository id (org/name), else None (a local folder)."""
    parts = str(base).split("/")
    if len(parts) != 2 or base.startswith((".", "/", "~")) or Path(base).exists():
        return None
    return base


def metadata(record: dict) -> dict:
    """The card's YAML metadata (the Hub's fields, plus what this project adds)."""
    cfg = record.get("config", {})
    family = cfg.get("model", {}).get("family", "")
    base = str(record.get("base") or cfg.get("model", {}).get("pretrained", ""))
    meta: dict = {}
    hub = _hub_id(base)
    if hub and family != "toy":
        meta["base_model"] = hub
    lic = next((v for k, v in LICENSES.items() if base.startswith(k)), None)
    if lic:
        meta["license"] = lic[0]
        if lic[1]:
            meta["license_name"] = lic[1]
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = (["text-to-image", "diffusers", "craft", "diffusers-training"]
                    + FAMILY_TAGS.get(family, []) + (["lora"] if record.get("lora") else [])
                    + [f"method-{record.get('method', 'craft')}"])
    return meta


def evaluation_rows(evaluation, label: str) -> list[dict]:
    """This model's rows of an evaluation: reward, base and tuned means, the paired
    difference with its standard error and 95 % interval, the win rate."""
    s = evaluation.summary
    rows = []
    for reward in dict.fromkeys(s["reward"]):
        mine = s[(s["model"] == label) & (s["reward"] == reward)]
        base = s[(s["model"] == evaluation.models[0]) & (s["reward"] == reward)]
        if mine.empty or base.empty:
            continue
        m, b = mine.iloc[0], base.iloc[0]
        diff, se = float(m["diff"]), float(m["diff_se"])
        rows.append({"reward": str(reward), "base": float(b["mean"]), "tuned": float(m["mean"]),
                     "diff": diff, "diff_se": se, "ci95": [diff - 1.96 * se, diff + 1.96 * se],
                     "win_rate": float(m["win_rate"]), "n": int(m["n"])})
    return rows


def _training_lines(record: dict, extra: dict | None) -> list[str]:
    cfg = record.get("config", {})
    t, f, r = cfg.get("train", {}), cfg.get("filter", {}), cfg.get("rewards", {})
    from craft.methods.registry import get_method

    method = get_method(record.get("method", "craft"))
    lines = [f"- **Method:** {method.title}"
             + (f", LoRA rank {record.get('lora_rank')}" if record.get("lora") else
                ", full fine-tuning")]
    lines += method.card_lines(cfg, record, extra or {})
    weights = f.get("weights") or {}
    lines.append("- **Rewards:** " + ", ".join(
        f"{n} (weight {weights[n]:g})" if n in weights else n for n in r.get("names", [])))
    lines.append(f"- **Schedule:** {record.get('steps')} steps x batch "
                 f"{t.get('effective_batch')} (micro-batch {t.get('micro_batch')}), lr "
                 f"{t.get('lr')}, EMA {t.get('ema_decay')}, seed {t.get('seed')}")
    lines.append(f"- **Base:** `{record.get('base')}`")
    return lines


def card_text(record: dict, label: str, evaluation=None, extra: dict | None = None,
              grid: str | None = None) -> str:
    """The card for a model whose training record (craft_train.json) is ``record``."""
    meta = metadata(record)
    rows = evaluation_rows(evaluation, label) if evaluation is not None else []
    if rows:
        meta["craft_evaluation"] = {"name": evaluation.name, "base": evaluation.models[0],
                                    "model": label, "rows": rows,
                                    "warnings": [w for w in evaluation.warnings
                                                 if w.startswith(f"{label}:")]}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = ["---", front.rstrip(), "---", "", f"# {label}", "",
             f"A text-to-image model fine-tuned with CRAFT Studio from `{record.get('base')}`.",
             "", "## Training", "", *_training_lines(record, extra), ""]
    if record.get("lora"):
        lines += ["Load the adapters onto the base: `pipe = DiffusionPipeline.from_pretrained("
                  f"\"{record.get('base')}\"); pipe.load_lora_weights(\"PATH\")`.", ""]
    else:
        lines += ["Load it with `DiffusionPipeline.from_pretrained(\"PATH\")`.", ""]
    lines += ["## Evaluation against the base", ""]
    if not rows:
        lines += ["Not evaluated yet (`craft evaluate` writes its results here).", ""]
    else:
        ev = evaluation
        lines += [f"Evaluation `{ev.name}`: held-out prompts, the same seeds for base and tuned, "
                  f"{rows[0]['n']} paired images per reward. Δ = tuned − base, paired, with its "
                  "95 % interval; win % = share of pairs the tuned image scores higher"
                  + (f"; diversity = {ev.diversity_metric} across the seeds of a prompt (its "
                     "win % = share of prompts more diverse than the base)"
                     if ev.diversity_metric else "") + ".", "",
                  "| reward | base | tuned | Δ [95 % interval] | win % |",
                  "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['reward']} | {r['base']:.4f} | {r['tuned']:.4f} | "
                         f"{r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | "
                         f"{100 * r['win_rate']:.1f} |")
        warns = meta["craft_evaluation"]["warnings"]
        lines += ["", "Drift warnings: " + ("none" if not warns else ""), *[f"- {w}"
                                                                         for w in warns], ""]
        if grid:
            lines += [f"![base and tuned on the same seeds]({grid})", "",
                      "Each row one held-out prompt; blocks: "
                      + ", ".join(ev.models) + "; the same seeds in each block.", ""]
    lines += ["## Limitations", "",
              "The rewards are proxies for preference: a model tuned on them can gain on them "
              "and lose what they do not measure (diversity across seeds, held-out rewards). "
              "The table above is on held-out prompts; look at the images too.", ""]
    return "\n".join(lines)


def write_card(model_dir: str | Path, label: str | None = None, evaluation=None,
               extra: dict | None = None) -> Path | None:
    """Write ``model_dir``/README.md from its craft_train.json (and ``evaluation``, copying its
    grid beside it). A folder without a training record is left alone (None)."""
    from craft.run.fsutil import write_text_atomic
    from craft.models.lora import TRAIN_RECORD

    d = Path(model_dir)
    try:
        record = json.loads((d / TRAIN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    label = label or str(record.get("run_name", d.name))
    grid = None
    if evaluation is not None and evaluation.grid_path and Path(evaluation.grid_path).is_file():
        shutil.copyfile(evaluation.grid_path, d / GRID)
        grid = GRID
    path = d / CARD
    write_text_atomic(path, card_text(record, label, evaluation, extra, grid))
    return path


def read_card(path: str | Path) -> tuple[dict, str]:
    """(metadata, body) of a card: what the Hub parses."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


__all__ = ["CARD", "card_text", "evaluation_rows", "metadata", "read_card", "write_card"]
