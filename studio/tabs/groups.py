"""Groups: one original prompt's group at a time (its candidates, the original prompt's images
marked, reward / composite / advantage bars, pass or fail per level) and a sortable table of all
groups. It uses the Curate tab's current filter settings, so both tabs always agree."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.context import RunContext
from studio.tabs.curate_views import grid_items, groups_table, level_pass_table
from studio.grid import ThumbGrid, item_value
from studio.plots import empty_figure, group_bars
from studio.ui import MAX_TABLE_ROWS, Tab, short_name

# what the all-groups table can be ordered by (largest first; prompt_id ascending)
SORT_COLUMNS = ["kept", "gain_R", "best_R", "reference_R", "kept share %", "candidates",
                "prompt_id"]


def prompt_choices(ctx: RunContext, first_ids=None) -> list[tuple[str, int]]:
    """The prompts to pick a group from: ``first_ids`` first (the groups table's order), at
    most MAX_TABLE_ROWS (a longer list in the page slows every event)."""
    df = ctx.frame()
    if df.empty:
        return []
    first = df.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    order = list(dict.fromkeys([*(first_ids or []), *first.index]))[:MAX_TABLE_ROWS]
    return [(f"#{pid} {first[pid]}", int(pid)) for pid in order]


def group_view(curation, prompt_id: int, rewards: list[str], adv_mode: str = "clamp",
               tau: float = 1.0):
    """One group: header, grid, bars and a table whose last columns show how each image's
    advantage A becomes its training weight (0 when it is not trained on). The weights are the
    selection's (craft.stages.selection.select: what ``craft train`` uses; sft: 1 each, DPO: 1
    per image in a pair); ``adv_mode`` / ``tau`` only weigh a bare curation's kept set."""
    from studio.tabs.curate_views import training_weights_by_id

    weights = training_weights_by_id(curation, adv_mode, tau)
    sel = curation.selection
    if sel is not None:
        adv_mode = "pairs" if sel.pairs is not None else sel.record.get("weighting", adv_mode)
    f = curation.frame
    g = f[f["prompt_id"] == prompt_id].sort_values(["variant_idx", "seed"], kind="stable")
    seeds = g["seed_idx"] if "seed_idx" in g else g["seed"]
    if g.empty:
        raise ValueError(f"prompt {prompt_id} has no scored candidates")
    levels = level_pass_table(g, curation.settings)
    labels = [("★" if v == 0 else f"v{v}") + f" s{s}" for v, s in zip(g["variant_idx"], seeds)]
    short = {r: short_name(r) for r in rewards}
    items = grid_items(curation, g["candidate_id"].tolist(), rewards)
    for item, label, (_, lv) in zip(items, labels, levels.iterrows()):
        marks = " ".join(f"{k}{'✓' if v else '✗'}" for k, v in lv.items())
        item["short"] = f"{label} · {item['short']}"
        item["title"] = f"{label} · {marks}\n{item['title']}"
    gallery = item_value(items)
    cols = [f"norm_{r}" for r in rewards if f"norm_{r}" in g] + ["composite", "advantage"]
    names = [f"{short[r]} (norm.)" for r in rewards if f"norm_{r}" in g] + ["composite R",
                                                                            "advantage A"]
    fig = group_bars(g, labels, cols, names)
    table = pd.DataFrame({"candidate": labels, "seed": g["seed"].to_numpy(),
                          "candidate id": g["candidate_id"].to_numpy(),
                          "variant text": g["variant"].to_numpy()})
    for r in rewards:
        if r in g:
            table[short[r]] = g[r].round(3).to_numpy()
            if f"beats_{r}" in g:
                table[f"beats ref on {short[r]}"] = g[f"beats_{r}"].to_numpy()
    table["R"] = g["composite"].round(3).to_numpy()
    for col in levels:
        table[f"pass {col}"] = levels[col].to_numpy()
    table["kept"] = g["kept"].to_numpy()
    table["A"] = g["advantage"].round(3).to_numpy()
    table["training weight"] = weights.reindex(g["candidate_id"]).fillna(0.0).round(3).to_numpy()
    ref = g[g["variant_idx"] == 0]
    head = (f"**{_md(g['prompt'].iloc[0])}** · {len(g)} candidates "
            f"({len(ref)} from the original prompt, ★) · reference R "
            f"{ref['composite'].mean():+.3f} · kept {int(g['kept'].sum())}")
    why = group_why(curation, g)
    head += ("<br>A = (R − the group's mean R) / (the group's std of R + ε), over the whole "
             "group; " + (WEIGHT_RULES["pairs"] if adv_mode == "pairs" else
                          f"a kept image's training weight comes from its A "
                          f"({WEIGHT_RULES[adv_mode]}, normalised to mean 1 over the kept set); "
                          "an image that is not kept weighs 0."))
    return head + (f"<br>{why}" if why else ""), gallery, fig, table


WEIGHT_RULES = {"clamp": "max(A, 0)", "raw": "A itself, possibly negative",
                "softmax": "softmax(A / τ)", "uniform": "1 whatever A: plain SFT",
                "pairs": "DPO trains on winner/loser pairs of the whole group, not on the kept "
                         "set: each image in a pair has training weight 1, any other 0."}


def group_why(curation, g: pd.DataFrame) -> str:
    """Why a group with passing candidates keeps fewer of them (or none): the global cut-off,
    the per-prompt cap, the reference rule or hand exclusions."""
    s, cutoff = curation.settings, curation.result.cutoff
    passing = g[g["passes"]]
    not_kept = passing[~passing["kept"]]
    if not_kept.empty:
        return ""
    parts = []
    refs = int((not_kept["variant_idx"] == 0).sum()) if not s.include_reference else 0
    by_hand = int((not_kept["override"] == "exclude").sum())
    capped = int(not_kept["capped"].sum()) if "capped" in not_kept else 0
    below = len(not_kept) - refs - by_hand - capped
    if below > 0 and cutoff is not None:
        best = not_kept.loc[~not_kept["capped"] & (not_kept["override"] != "exclude"),
                            "composite"].max()
        parts.append(f"{below} are below the global cut-off R ≥ {cutoff:+.3f} of the top "
                     f"K = {s.top_k} over all prompts (the best of them has R {best:+.3f})")
    if capped:
        parts.append(f"{capped} are over the per-prompt cap of {s.per_prompt_cap}")
    if refs:
        parts.append(f"{refs} are original-prompt images, which may not be kept")
    if by_hand:
        parts.append(f"{by_hand} are excluded by hand")
    return (f"{len(passing)} pass level {s.level}, {int(passing['kept'].sum())} kept: "
            + "; ".join(parts) + ".")


def _md(text: str) -> str:
    import html

    return html.escape(str(text), quote=False)


class GroupsTab(Tab):
    def __init__(self, ctx: RunContext, curate_tab, ui=None):
        self.curate = curate_tab
        gr.Markdown("A **group** is every candidate of one original prompt: S images from the "
                    "prompt itself (★, the reference) and S from each variant. Advantages are "
                    "computed within the group. Filter settings come from the Curate tab.")
        with gr.Row():
            self.prompt = gr.Dropdown([], label="Prompt", elem_id="groups-prompt", scale=4,
                                      filterable=True)
            self.refresh_btn = gr.Button("Refresh", scale=0, min_width=120)
        self.head = gr.Markdown(elem_id="groups-head")
        self.gallery = ThumbGrid(elem_id="groups-gallery")
        self.bars = gr.Plot(label="Rewards, composite and advantage", elem_id="groups-bars")
        self.table = gr.Dataframe(label="Pass / fail per level", interactive=False,
                                  max_height=360, elem_id="groups-table")
        with gr.Row():
            gr.Markdown("### All groups (a row opens the group)")
            self.sort_by = gr.Dropdown(SORT_COLUMNS, value="kept", label="sort by",
                                       elem_id="groups-sort", scale=0, min_width=180)
        self.all_groups = gr.Dataframe(interactive=False, max_height=420,
                                       elem_id="groups-all")

    def show(self, prompt_id, *values):
        if prompt_id is None:
            return "Pick a prompt.", item_value([]), empty_figure("pick a prompt"), None
        a = self.ctx.cfg.advantage
        return group_view(self.curate.run(values), int(prompt_id), self.curate.rewards,
                          a.mode, a.tau)

    def wire(self, app) -> None:
        controls = self.curate.controls
        outs = [self.head, self.gallery, self.bars, self.table]
        app.on(self.prompt.input, self.show, [self.prompt, *controls], outs, message=self.head)

        def on_row(evt: gr.SelectData, table):
            row = evt.index[0] if evt.index else None
            if row is None or row < 0 or row >= len(table):  # a header, not a row
                return gr.skip()
            return int(table.iloc[row]["prompt_id"])

        app.then(app.on(self.all_groups.select, on_row, self.all_groups, self.prompt),
                 self.show, [self.prompt, *controls], outs, message=self.head)
        app.on(self.refresh_btn.click, self.refresh, self.refresh_inputs, self.refresh_outputs,
               message=self.head)
        app.on(self.sort_by.input, self.refresh, self.refresh_inputs, self.refresh_outputs,
               message=self.head)

    @property
    def refresh_inputs(self) -> list:
        return [self.prompt, self.sort_by, self.curate.seen, *self.curate.controls]

    @property
    def refresh_outputs(self) -> list:
        return [self.prompt, self.all_groups, self.head, self.gallery, self.bars, self.table]

    def refresh(self, prompt_id, sort_by, seen, *values) -> list:
        ctx = self.ctx
        values = self.curate.page_values(seen, values)  # before a reload's settings: the run's
        table = None
        if not ctx.frame().empty:  # nothing scored yet: nothing to group
            table = groups_table(self.curate.run(values))
            table = table.sort_values(sort_by or "kept", ascending=sort_by == "prompt_id",
                                      kind="stable")
        choices = prompt_choices(self.ctx, [] if table is None else table["prompt_id"].tolist())
        ids = [v for _, v in choices]
        if prompt_id not in ids:
            prompt_id = ids[0] if ids else None
        shown = table
        if table is not None:
            n = len(table)
            label = (f"All groups: the {MAX_TABLE_ROWS} with the most kept images, of {n}"
                     if n > MAX_TABLE_ROWS else f"All {n} groups")
            shown = gr.update(value=table.head(MAX_TABLE_ROWS), label=label)
        return [gr.update(choices=choices, value=prompt_id), shown,
                *self.show(prompt_id, *values)]


__all__ = ["GroupsTab", "group_view", "prompt_choices"]
