"""Write a kept set as a Hugging Face ``imagefolder``: the handoff to any other trainer or viewer
(``datasets.load_dataset("imagefolder", data_dir=...)``).

Layout: ``images/c0000042.png`` per kept candidate, ``metadata.jsonl`` with the original prompt
as ``text`` (what CRAFT trains on) and every score, the composite R, the advantage A, the
training weight and any manual override, and ``filter_settings.json`` with the settings that
made the selection. A zip of the folder sits beside it. The folder appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from craft import CraftError

EXPORTS_DIR = "exports"


def _num(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def export_imagefolder(kept: pd.DataFrame, run_dir: str | Path, rewards: Sequence[str],
                       settings: Mapping[str, Any], name: str | None = None
                       ) -> tuple[Path, Path]:
    """Write ``kept`` (the rows of a kept-set selection, craft.stages.selection.select: image_path,
    prompt, variant, ids, rewards, composite, advantage, weight[, override]) under
    RUN/exports/NAME; returns (folder, zip)."""
    from craft.run.fsutil import atomic_dir

    if kept.empty:
        raise CraftError("nothing is kept with these settings; loosen the level, margin or "
                         "top-K before exporting")
    name = name or time.strftime("kept-%Y%m%d-%H%M%S")
    folder = Path(run_dir) / EXPORTS_DIR / name
    rows = kept.sort_values(["composite", "candidate_id"], ascending=[False, True],
                            kind="stable")
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for row in rows.itertuples():
            rel = f"images/c{int(row.candidate_id):07d}.png"
            shutil.copyfile(row.image_path, tmp / rel)
            override = getattr(row, "override", None)
            lines.append(json.dumps({
                "file_name": rel, "text": row.prompt, "variant": row.variant,
                "variant_idx": int(row.variant_idx), "seed": int(row.seed),
                "candidate_id": int(row.candidate_id), "prompt_id": int(row.prompt_id),
                **{r: _num(getattr(row, r)) for r in rewards},
                "composite": _num(row.composite), "advantage": _num(row.advantage),
                "weight": _num(row.weight),
                "override": None if override is None or pd.isna(override) else str(override)}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "filter_settings.json").write_text(json.dumps(dict(settings), indent=1,
                                                             default=list))
    archive = folder.with_suffix(".zip")
    tmp_zip = archive.with_name(f".tmp-{archive.name}")
    with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent))
    tmp_zip.replace(archive)
    return folder, archive


PAIRS_FILE = "data/train-00000-of-00001.parquet"


def export_pairs(pairs: pd.DataFrame, frame: pd.DataFrame, run_dir: str | Path,
                 settings: Mapping[str, Any], name: str | None = None) -> Path:
    """Write DPO pairs (craft.methods.dpo.build_pairs over ``frame``'s candidates) in Pick-a-Pic's
    layout, which diffusers' ``train_diffusion_dpo.py`` and other DPO trainers read: one
    parquet row per pair with ``caption`` (the original prompt), ``jpg_0`` / ``jpg_1`` (the two
    images' bytes, inline; PNG bytes, as stored: every reader opens them with PIL), ``label_0``
    / ``label_1`` (1 = preferred), plus the ids, composites and gap. The winner sits on side 0
    of even pairs and side 1 of odd ones, so no trainer can learn a side. Under
    RUN/exports/NAME/ (``datasets.load_dataset(folder)`` finds ``data/``), with
    ``pair_settings.json``; returns the folder."""
    from craft.run.fsutil import atomic_dir

    if pairs.empty:
        raise CraftError("no DPO pairs with these settings; lower dpo.margin or generate more "
                         "seeds before exporting pairs")
    name = name or time.strftime("pairs-%Y%m%d-%H%M%S")
    folder = Path(run_dir) / EXPORTS_DIR / name
    by_id = frame.set_index("candidate_id")
    rows = []
    for j, p in enumerate(pairs.itertuples()):
        win, lose = by_id.loc[int(p.win_id)], by_id.loc[int(p.lose_id)]
        sides = (win, lose) if j % 2 == 0 else (lose, win)
        ids = (int(p.win_id), int(p.lose_id)) if j % 2 == 0 else (int(p.lose_id), int(p.win_id))
        rows.append({"caption": win["prompt"],
                     "jpg_0": Path(sides[0]["image_path"]).read_bytes(),
                     "jpg_1": Path(sides[1]["image_path"]).read_bytes(),
                     "label_0": 1.0 if j % 2 == 0 else 0.0, "label_1": 0.0 if j % 2 == 0 else 1.0,
                     "prompt_id": int(p.prompt_id), "candidate_id_0": ids[0],
                     "candidate_id_1": ids[1], "composite_0": _num(sides[0]["composite"]),
                     "composite_1": _num(sides[1]["composite"]), "gap": _num(p.gap)})
    with atomic_dir(folder) as tmp:
        (tmp / PAIRS_FILE).parent.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(tmp / PAIRS_FILE, index=False)
        (tmp / "pair_settings.json").write_text(json.dumps(dict(settings), indent=1,
                                                           default=list))
    return folder


__all__ = ["EXPORTS_DIR", "PAIRS_FILE", "export_imagefolder", "export_pairs"]
