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
    """Write ``kept`` (rows of :func:`craft.stages.training_set`: image_path, prompt, variant,
    ids, rewards, composite, advantage, weight[, override]) under RUN/exports/NAME; returns
    (folder, zip)."""
    from craft.fsutil import atomic_dir

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


__all__ = ["EXPORTS_DIR", "export_imagefolder"]
