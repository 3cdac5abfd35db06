"""The engineers' report: T/report.html, a static page that opens from disk in any browser.

It shows the run (model, sets, accuracies, the per-layer clustering summary and why the layer was
chosen, the k plot), every root-cause cluster (RCC) of the selected layer as a card (size, ICD,
majority scenario, purity and characterising parameters where metadata.csv exists, thumbnails with the
input-level LRP heatmap overlaid, the RCC's unsafe-set images) and the retraining comparison (table and
chart). Images are referenced by relative path, so the page stays small: the thumbnails are the cluster
step's overlays (T/<Layer>/RCCxx/<file>_heatmap.png), the chart is T/Report/comparison.png. Every
figure is read from the steps' output files through their readers; the report computes none of its own
and writes nothing into a step's folders.
"""
from __future__ import annotations

import html
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import assignModule
import clusterModule
import descriptors
import heatmapModule
import retrainModule
import testModule
from clustering import MAX_OUTPUT_ALIGNMENT
from heatmapModule import OVERLAY_TILE as TILE
from Helper import CasePaths, RunContext, atomic_path, resolve_input_size

log = logging.getLogger("hudd")

THUMBNAILS_PER_RCC = 12     # larger RCCs show a sample and link to their folder
UNSAFE_PER_RCC = 8
REPORT_FILE = "report.html"
ASSETS = "Report"           # T/Report/: the report's own pictures (the retraining chart)


def report_path(paths: CasePaths) -> Path:
    return paths.t_dir / REPORT_FILE


# --------------------------------------------------------------------------------------------
# What the page shows, read from the steps' files through their readers
# --------------------------------------------------------------------------------------------

@dataclass
class ReportData:
    layer: str
    summary: pd.DataFrame          # per layer: k, wicd, silhouette, selected (, purity, coverage)
    labels: pd.DataFrame           # selected layer: image, expected, predicted, rcc, sub_rcc (, scenario)
    stats: pd.DataFrame            # per top-level RCC: size, sub_rccs, icd (, majority_scenario, purity)
    sub_stats: pd.DataFrame        # per sub-cluster: rcc, size, icd (, majority_scenario, purity)
    parameters: pd.DataFrame | None  # per RCC: characterising parameters
    described: pd.DataFrame | None   # per RCC and descriptor: effect size, rank, sentence (no metadata needed)
    unsafe: pd.DataFrame | None    # image, rcc, distance, rank
    retrain: dict[str, dict]       # mode -> runs, scenarios, rcc tables
    sets: dict[str, dict]          # set folder -> images, wrong, accuracy (the test step's summary)
    errors: int                    # error-inducing test images explained


def read_data(ctx: RunContext) -> ReportData:
    layer = clusterModule.selected_layer(ctx.paths)
    return ReportData(layer=layer, summary=clusterModule.read_summary(ctx.paths),
                      labels=clusterModule.read_labels(ctx.paths, layer),
                      stats=clusterModule.read_rcc_stats(ctx.paths, layer),
                      sub_stats=clusterModule.read_sub_rcc_stats(ctx.paths, layer),
                      parameters=clusterModule.read_characterising_parameters(ctx.paths, layer),
                      described=clusterModule.read_rcc_descriptors(ctx.paths, layer),
                      unsafe=assignModule.read_assignments(ctx.paths) if unsafe_set_current(ctx) else None,
                      retrain={mode: retrainModule.read_tables(ctx.paths, mode)
                               for mode in retrainModule.current_modes(ctx)},
                      sets=testModule.STEP.summary(ctx)["sets"], errors=len(heatmapModule.read_index(ctx.paths)))


def unsafe_set_current(ctx: RunContext) -> bool:
    return assignModule.STEP.recorded_fingerprint(ctx) is not None


def clusters_current(ctx: RunContext) -> bool:
    return clusterModule.has_run(ctx.paths) and clusterModule.STEP.recorded_fingerprint(ctx) is not None


def wrong_test_images(ctx: RunContext) -> int | None:
    """Error-inducing test images in the test step's results; None before it ran."""
    if not testModule.result_path(ctx.paths, "test").is_file():
        return None
    return int(testModule.read_results(ctx.paths, "test")["result"].eq("Wrong").sum())


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left} tr.sel td{background:#fff6d5;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #bbb;border-radius:6px;padding:10px;width:640px;background:#fafafa}
.card h3{margin:0 0 6px 0;font-size:16px} .meta{font-size:13px;margin:2px 0}
.grid{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}
figure{margin:0;font-size:11px;text-align:center} figure img{display:block;image-rendering:pixelated}
.unsafe img{width:64px;height:64px} .muted{color:#777} .pos{color:#0a0} .neg{color:#c00}
td.strip figure{display:inline-block;margin-right:3px} .sub{margin:6px 0 0 8px} details{margin-top:6px}
ul.apart{margin:2px 0 2px 0;padding-left:18px;font-size:13px} p.legend{font-size:13px;color:#444}
"""


def esc(value) -> str:
    return html.escape(str(value))


def rel(path: Path, base: Path) -> str:
    """`path` as a link from `base`: relative (the page opens from disk anywhere) and URL-quoted, since
    users' class and file names may hold what a URL or an attribute reads otherwise ('#', '%', quotes)."""
    return urllib.parse.quote(Path(path).relative_to(base).as_posix())


def sets_table(sets: dict[str, dict]) -> str:
    rows = "".join(
        f"<tr><td class=l>{esc(name)}</td><td>{r['images']}</td>"
        + (f"<td data-accuracy='{r['accuracy']:.4f}'>{r['accuracy']:.2f}%</td><td>{r['wrong']}</td>"
           if "accuracy" in r else "<td class=muted>unlabelled</td><td></td>") + "</tr>"
        for name, r in sets.items())
    return f"<table><tr><th class=l>set</th><th>images</th><th>accuracy</th><th>wrong</th></tr>{rows}</table>"


def left_out_note(ctx: RunContext) -> str:
    """The images --skip-bad-images left out as unreadable, per set (the tables count only the others)."""
    left_out = {key: images for key, images in ctx.left_out.items() if images}
    if not left_out:
        return ""
    listed = "; ".join(f"{esc(ctx.sets()[key].name)} {len(images)}: "
                       + ", ".join(f"<code>{esc(image)}</code>" for image in images[:5])
                       + (f" and {len(images) - 5} more" if len(images) > 5 else "")
                       for key, images in left_out.items())
    return (f"<p id=left-out>Left out as unreadable (<code>--skip-bad-images</code>), in no table or step below: "
            f"{listed}. Fix or remove them and run again to include them.</p>")


def run_section(ctx: RunContext, data: ReportData) -> str:
    s = ctx.settings
    why = ("the smallest weighted intra-cluster distance (WICD)" if s.layer_criterion == "wicd"
           else "the best silhouette") + (" among the layers but the input, the one before the output and those "
                                           f"whose RCCs repeat the explained output (output_alignment above "
                                           f"{MAX_OUTPUT_ALIGNMENT}), where another layer is left")
    selected = data.summary[data.summary["layer"] == data.layer]
    if "output_alignment" in selected and (selected["output_alignment"] > MAX_OUTPUT_ALIGNMENT).any():
        why += "; here every layer was above it, so none was passed over for it"
    columns = [c for c in LAYER_COLUMNS if c in data.summary]
    layer_rows = "".join(
        f"<tr class='{'sel' if row['layer'] == data.layer else ''}'>"
        + "".join(f"<td>{format_cell(row[c])}</td>" for c in columns) + "</tr>"
        for _, row in data.summary.iterrows())
    errors = data.errors
    knee = clusterModule.knee_plot(ctx.paths, data.layer)
    # No plot where the layer had a single choice of k (one to three error images): say so, link nothing.
    knee_figure = (f'<p><img src="{rel(knee, ctx.paths.t_dir)}" alt="choice of k for {esc(data.layer)}" width=640></p>'
                   if knee.is_file() else "<p>No plot of the choice of k: with so few error images there was one choice.</p>")
    return f"""
<h2>The run</h2>
<p>Model <b>{esc(ctx.model_path.name)}</b> ({esc(s.arch)}), case <code>{esc(ctx.paths.root)}</code>.
<b id=errors data-value={errors}>{errors}</b> error-inducing test images explained with the
<b>{esc(s.rules)}</b> LRP rules, each explaining {esc(ctx.task.explained_words[0])} (setting <code>explain</code>).</p>
{sets_table(data.sets)}
{left_out_note(ctx)}
{scenario_table(ctx)}
<h3>Layer selection</h3>
<p>Clustered: the <b>{esc(s.features)}</b> of the error images (setting <code>features</code>). Selected layer:
<b id=layer>{esc(data.layer)}</b>, the layer with {why} (setting <code>layer_criterion</code>); per layer at most
{s.max_rccs} top-level RCCs (<code>max_rccs</code>, k by <code>k_criterion</code> {esc(s.k_criterion)}), each split
into sub-clusters (sub_k: the best silhouette among finer cuts).</p>
<table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{layer_rows}</table>
{measures_legend(columns)}
{undefined_measures_note(data.summary)}
{knee_figure}"""


def sign_class(value: float) -> str:
    """CSS class of a gain: green above zero, red below, plain at zero (as printed, one decimal)."""
    return "pos" if round(value, 1) > 0 else "neg" if round(value, 1) < 0 else ""


def format_cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.4g}"   # undefined (purity with no RCC of two images, ...)
    return esc(value)


# The layer table's columns, where summary.csv has them (purity and coverage only where metadata exists)
LAYER_COLUMNS = ("layer", "k", "sub_k", "median_size", "noise", "wicd", "silhouette", "output_alignment",
                 *clusterModule.QUALITY_MEASURES)
# What each column of the layer table measures (clusterModule's summary.csv; design.md's measures).
MEASURE_WORDS = {
    "k": "top-level RCCs",
    "sub_k": "sub-clusters in all",
    "median_size": "images in the median top-level RCC",
    "noise": "images in no RCC (HDBSCAN's noise group)",
    "wicd": "weighted intra-cluster distance of the top level (smaller: tighter RCCs)",
    "silhouette": "mean silhouette of the top level (above 0.5: a reasonable structure)",
    "output_alignment": "how far the RCCs repeat the output explained (0 independent, 1 the same grouping)",
    "purity": "mean share of each RCC's most common scenario, over the RCCs of 2+ images",
    "coverage": "share of the rare conditions (5+ error images) that are the most common scenario of some RCC",
    "purity_10": "purity of the 10 largest RCCs, what a reader has seen after ten cards",
    "coverage_10": "coverage of the 10 largest RCCs",
}


def measures_legend(columns: list[str]) -> str:
    """One line naming what the layer table's measured columns are."""
    shown = [f"<b>{c}</b>: {MEASURE_WORDS[c]}" for c in columns if c in MEASURE_WORDS]
    return f"<p class=legend>{'; '.join(shown)}.</p>" if shown else ""


def undefined_measures_note(summary: pd.DataFrame) -> str:
    """Why a purity or coverage cell of the layer table shows –, where one does."""
    measures = [c for c in clusterModule.QUALITY_MEASURES if c in summary]
    if not measures or not summary[measures].isna().to_numpy().any():
        return ""
    return ("<p>–: undefined here; purity needs an RCC of two or more images, coverage a rare "
            "condition with five or more error images.</p>")


def scenario_table(ctx: RunContext) -> str:
    table = testModule.read_scenario_accuracy(ctx.paths)
    if table is None:
        return ""
    pivot = table.pivot(index="scenario", columns="set", values="accuracy")
    sets = [c for c in ("TrainingSet", "TestSet", "ImprovementSet") if c in pivot.columns]
    def cell(value: float) -> str:  # a scenario a set does not have (a cause absent from training) is no number
        return "<td>–</td>" if pd.isna(value) else f"<td>{value:.1f}%</td>"
    rows = "".join(f"<tr><td class=l>{esc(name)}</td>" + "".join(cell(pivot.loc[name, c]) for c in sets)
                   + "</tr>" for name in pivot.index)
    return ("<p>Accuracy per scenario (from metadata.csv; –: the set has no image of it):</p><table><tr>"
            "<th class=l>scenario</th>" + "".join(f"<th>{c}</th>" for c in sets) + f"</tr>{rows}</table>")


def thumbnails(ctx: RunContext, data: ReportData, members: pd.DataFrame, count: int, height: int = TILE) -> str:
    """Up to `count` overlay tiles (image | where the model looked) of an RCC's or sub-cluster's members."""
    figures, (wide, tall) = [], heatmapModule.overlay_size(*resolve_input_size(ctx.settings), tile=height)
    for item in shown_first(members).head(count).itertuples():
        overlay = clusterModule.overlay_file(ctx.paths, data.layer, item.rcc, item.image, item.expected)
        caption = f"{esc(item.expected)} → {esc(item.predicted)}"
        figures.append(f"<figure><img loading=lazy src='{rel(overlay, ctx.paths.t_dir)}' "
                       f"width={2 * wide + 2 * height // TILE} height={tall} alt='{caption}'>"
                       + (f"<figcaption>{caption}</figcaption>" if height == TILE else "") + "</figure>")
    return "".join(figures)


def shown_first(members: pd.DataFrame) -> pd.DataFrame:
    """Members in the order their tiles are shown: the most typical member of each sub-cluster (the
    smallest mean distance to the other members), largest sub-cluster first, then each one's second most
    typical, and so on. So the first tiles show what the group is and how it varies, not the images of
    the first class folder (the rows' order). A clustering without the distances keeps the rows' order."""
    if "mean_distance_in_sub_rcc" not in members:
        return members
    ranked = members.sort_values("mean_distance_in_sub_rcc", kind="stable")
    turn = ranked.groupby("sub_rcc", sort=False).cumcount()
    size_rank = ranked["sub_rcc"].map(lambda name: int(name.rsplit(".", 1)[1]))  # RCC01.1 is RCC01's largest
    return ranked.assign(_turn=turn, _size_rank=size_rank).sort_values(["_turn", "_size_rank"], kind="stable")


def in_rcc(names: pd.Series, rcc: str) -> pd.Series:
    """Which of the names (top-level RCCs or sub-clusters, as the assignment level gives them) belong to `rcc`."""
    return (names == rcc) | names.str.startswith(rcc + ".")


def described(rcc: pd.Series, data: ReportData) -> str:
    """An RCC in a few words: its majority scenario and purity, or the parameters that characterise it."""
    if "majority_scenario" in rcc and isinstance(rcc["majority_scenario"], str):
        return f"<b class=scenario>{esc(rcc['majority_scenario'])}</b> (purity <span class=purity>{rcc['purity']:.2f}</span>)"
    if data.parameters is not None:
        params = data.parameters[data.parameters["rcc"] == rcc["rcc"]].nlargest(2, "variance_reduction_%")
        return ", ".join(f"{esc(p['parameter'])} {p['min']:.3g}..{p['max']:.3g}" for _, p in params.iterrows())
    return ""


def rcc_summary(ctx: RunContext, data: ReportData) -> str:
    """Every top-level RCC on one screen, largest first: one line per RCC of 2+ images, with what a reader
    takes in at a glance (what its members share where metadata says, and what sets it apart from its
    images and relevance); the RCCs of one image together on the last line."""
    stats = data.stats.sort_values(["size", "rcc"], ascending=[False, True])
    singles = stats[stats["rcc"].isin(clusterModule.single_image_rccs(stats))]
    groups = stats[~stats["rcc"].isin(singles["rcc"])]
    apart = data.described is not None
    shared = {r["rcc"]: described(r, data) for _, r in stats.iterrows()}
    metadata = any(shared.values())   # without metadata the column would stay empty
    rows = "".join(
        f"<tr data-top-rcc='{esc(r['rcc'])}'><td class=l><a href='#{esc(r['rcc'])}'>{esc(r['rcc'])}</a></td>"
        f"<td>{int(r['size'])}</td><td>{int(r['sub_rccs'])}</td>"
        + (f"<td class=l>{shared[r['rcc']]}</td>" if metadata else "")
        + (f"<td class='l headline' data-headline='{esc(r['rcc'])}'>{esc(rcc_headline(data.described, r['rcc']))}"
           "</td>" if apart else "")
        + f"<td class='l strip'>{thumbnails(ctx, data, data.labels[data.labels['rcc'] == r['rcc']], 4, height=40)}"
        "</td></tr>" for _, r in groups.iterrows())
    if len(singles):
        rows += singles_row(ctx, data, singles, metadata, apart)
    counts = (f"{len(groups)} root-cause clusters and {len(singles)} single images" if len(singles)
              else f"{len(stats)} root-cause clusters")
    return (f"<h2>The root causes at a glance</h2><p>{counts} of {esc(data.layer)}, largest "
            "first; each opens below with its sub-clusters.</p><table id=rcc-summary><tr><th class=l>RCC</th>"
            "<th>images</th><th>sub-clusters</th>" + ("<th class=l>what they share</th>" if metadata else "")
            + ("<th class=l>what sets it apart</th>" if apart else "")
            + f"<th class=l>examples</th></tr>{rows}</table>")


def singles_row(ctx: RunContext, data: ReportData, singles: pd.DataFrame, metadata: bool, apart: bool) -> str:
    """The summary's last line: the RCCs of one image, each tile linking to its card. No sentence says what
    sets one image apart: compared with the others, one image always differs in something."""
    names = list(singles["rcc"])
    tiles = "".join(f"<a href='#{esc(name)}' data-top-rcc='{esc(name)}'>"
                    f"{thumbnails(ctx, data, data.labels[data.labels['rcc'] == name], 1, height=40)}</a>"
                    for name in names)
    scenarios = ""
    if metadata and "majority_scenario" in singles:
        counts = singles["majority_scenario"].value_counts()
        scenarios = ", ".join(f"{esc(scenario)} {count}" for scenario, count in counts.items())
    return (f"<tr class=singles data-single-images='{esc(' '.join(names))}'><td class=l>"
            f"<a href='#{esc(names[0])}'>{esc(names[0])}</a>-<a href='#{esc(names[-1])}'>{esc(names[-1])}</a></td>"
            f"<td>{len(names)}</td><td></td>" + (f"<td class=l>{scenarios}</td>" if metadata else "")
            + (f"<td class='l headline muted'>{SINGLE_IMAGE}</td>" if apart else "")
            + f"<td class='l strip'>{tiles}</td></tr>")


SINGLE_IMAGE = "single images: each resembles no other error image closely enough to share an RCC"
SINGLE_CARD = "a single image: it resembles no other error image closely enough to share an RCC, so no group to characterise"


def rcc_cards(ctx: RunContext, data: ReportData) -> str:
    stats = data.stats.sort_values(["size", "rcc"], ascending=[False, True])
    fixed = {mode: tables["rcc"] for mode, tables in data.retrain.items() if "rcc" in tables}
    cards = []
    for _, rcc in stats.iterrows():
        name = rcc["rcc"]
        members = data.labels[data.labels["rcc"] == name]
        meta = [f"size <b class=size>{int(rcc['size'])}</b>", f"ICD {rcc['icd']:.3f}"]
        if "majority_scenario" in rcc:
            meta.append(f"majority scenario {described(rcc, data)}")
        lines = [f"<div class=meta>{' · '.join(meta)}</div>"]
        lines.append(descriptor_lines(data.described, name) if int(rcc["size"]) > 1 or name == clusterModule.NOISE
                     else f"<div class='meta muted apart'>{SINGLE_CARD}</div>")
        if data.parameters is not None:
            params = data.parameters[data.parameters["rcc"] == name].nlargest(4, "variance_reduction_%")
            if len(params):
                lines.append("<div class=meta>characterised by: " + ", ".join(
                    f"{esc(p['parameter'])} {p['min']:.3g}..{p['max']:.3g} (variance -{p['variance_reduction_%']:.0f}%)"
                    for _, p in params.iterrows()) + "</div>")
        if fixed:
            cells = ", ".join(f"{mode} {t.loc[in_rcc(t['rcc'], name), 'mean_fixed'].sum():.1f}" for mode, t in fixed.items())
            lines.append(f"<div class=meta>errors fixed by retraining (mean of runs): {cells}</div>")
        more = len(members) - THUMBNAILS_PER_RCC
        folder = rel(clusterModule.rcc_folder(ctx.paths, data.layer, name), ctx.paths.t_dir) + "/"
        lines.append(f"<div class=grid>{thumbnails(ctx, data, members, THUMBNAILS_PER_RCC)}</div>")
        lines.append(f"<div class=meta><a href='{folder}'>all {len(members)} images</a>"
                     + (f" ({more} more than shown)" if more > 0 else "") + "</div>")
        lines.append(sub_clusters(ctx, data, name))
        lines.append(unsafe_strip(ctx, data, name))
        cards.append(f"<div class=card id='{esc(name)}' data-rcc='{esc(name)}' data-size='{int(rcc['size'])}'>"
                     f"<h3>{esc(name)}</h3>{''.join(lines)}</div>")
    explained, caption = ctx.task.explained_words
    return (f"<h2>Root-cause clusters of {esc(data.layer)}</h2><p>{len(stats)} RCCs, largest first. Each thumbnail: "
            f"the image, then where the model looked (input-level LRP relevance of {explained}: red "
            f"for evidence for it, blue against). Caption: {caption}. What sets an RCC apart compares its images "
            "with the correct test images, and its relevance with the other error images (the median member; "
            "δ: Cliff's delta).</p>"
            f"<div class=cards>{''.join(cards)}</div>")


def descriptor_lines(described: pd.DataFrame | None, rcc: str) -> str:
    """What sets an RCC apart, from its images and relevance alone (the cluster step's sentences)."""
    if described is None:
        return ""
    if rcc == clusterModule.NOISE:
        return ("<div class='meta muted apart'>the images the clustering left out (noise): no root cause to "
                "characterise</div>")
    said = described[(described["rcc"] == rcc) & (described["sentence"] != "")].sort_values("rank")
    if not len(said):
        return (f"<div class='meta muted apart'>what sets it apart: {NOTHING_STANDS_OUT} "
                f"(|Cliff's delta| under {descriptors.LARGE_EFFECT})</div>")
    items = "".join(f"<li data-descriptor='{esc(row.descriptor)}' data-delta='{row.delta:.4f}'>{esc(row.sentence)}"
                    f" <span class=muted>(δ {row.delta:+.2f})</span></li>" for row in said.itertuples())
    return ("<div class='meta apart'>what sets it apart (from its images and relevance):"
            f"<ul class=apart>{items}</ul></div>")


NOTHING_STANDS_OUT = "no image or relevance descriptor differs much"


def rcc_headline(described: pd.DataFrame | None, rcc: str) -> str:
    """One short line per top-level RCC for the summary: its first descriptor sentence, or that none
    stands out (an empty cell would read as missing); "" without descriptors."""
    if described is None:
        return ""
    if rcc == clusterModule.NOISE:
        return "the images the clustering left out: no root cause"
    return descriptors.headline(described, rcc) or NOTHING_STANDS_OUT


def sub_clusters(ctx: RunContext, data: ReportData, rcc: str) -> str:
    """The RCC's sub-clusters, folded: size, majority scenario, a few thumbnails, the folder."""
    subs = data.sub_stats[data.sub_stats["rcc"] == rcc].sort_values(["size", "sub_rcc"], ascending=[False, True])
    parts = []
    for _, sub in subs.iterrows():
        members = data.labels[data.labels["sub_rcc"] == sub["sub_rcc"]]
        folder = rel(clusterModule.rcc_folder(ctx.paths, data.layer, rcc, sub["sub_rcc"]), ctx.paths.t_dir) + "/"
        what = (f" · {esc(sub['majority_scenario'])} ({sub['purity']:.2f})" if "majority_scenario" in sub else "")
        parts.append(f"<div class=sub data-sub-rcc='{esc(sub['sub_rcc'])}'><div class=meta><a href='{folder}'>"
                     f"{esc(sub['sub_rcc'])}</a>: {int(sub['size'])} images{what}</div>"
                     f"<div class=grid>{thumbnails(ctx, data, members, 6, height=48)}</div></div>")
    return (f"<details><summary>{len(subs)} sub-clusters</summary>{''.join(parts)}</details>" if parts else "")


def unsafe_strip(ctx: RunContext, data: ReportData, rcc: str) -> str:
    if data.unsafe is None:
        return ""
    chosen = data.unsafe[in_rcc(data.unsafe["rcc"], rcc)]
    if not len(chosen):
        return "<div class='meta muted'>no unsafe-set images (RCCs of one image get none)</div>"
    images = []
    for item in chosen.head(UNSAFE_PER_RCC).itertuples():
        copy = assignModule.unsafe_copy(ctx.paths, item.rcc, item.image)
        images.append(f"<img loading=lazy src='{rel(copy, ctx.paths.t_dir)}' title='distance {item.distance:.3f}' "
                      f"alt='{esc(Path(item.image).name)}'>")
    folder = rel(assignModule.unsafe_dir(ctx.paths), ctx.paths.t_dir)
    return (f"<div class=meta>unsafe set: <span class=unsafe-count>{len(chosen)}</span> improvement images "
            f"(<a href='{esc(folder)}/'>folder</a>, one sub-folder per group they are assigned to)</div>"
            f"<div class='grid unsafe'>{''.join(images)}</div>")


def how_picked(ctx: RunContext) -> str:
    """How the assignment step chose the unsafe set, read from its files (a contrast the step could not
    compute, with no test image right, fell back to ClosestU and wrote no contrast.csv)."""
    if (assignModule.unsafe_dir(ctx.paths) / assignModule.CONTRAST_FILE).is_file():
        return ("<span id=pick data-pick=contrast>the improvement images nearest the test errors relative to the "
                "test images the model gets right</span> (<code>assign_pick</code> contrast)")
    return ("<span id=pick data-pick=closest>the improvement images closest to each RCC, up to its quota</span> "
            "(<code>assign_pick</code> closest, the original's ClosestU)")


def retrain_section(ctx: RunContext, data: ReportData) -> str:
    if not data.retrain:
        to_label = assignModule.to_label_path(ctx.paths)
        labelling = (f" The improvement set has no labels: first fill the label column(s) of "
                     f"<a href='{esc(rel(to_label, ctx.paths.t_dir))}'>UnsafeSet/to_label.csv</a> (the unsafe set's "
                     f"images) and save it as <code>DataSets/ImprovementLabels.csv</code>."
                     if to_label.is_file() and unsafe_set_current(ctx) and not ctx.paths.improvement_labels.is_file()
                     else "")
        earlier = (" on the current unsafe set and test set (the tables in T/Retrain are an earlier run's)"
                   if retrainModule.modes_run(ctx.paths) else " yet")
        return (f"<h2>Retraining</h2><p class=muted>Not run{earlier}: <code>python HUDD.py -o CASE -mode HUDD</code> "
                f"(and BL1, BL2, BL3) retrains at one labelling budget.{labelling}</p>")
    original = data.sets["TestSet"]["accuracy"]
    table = retrainModule.comparison(ctx.paths, list(data.retrain))
    rows = [retrain_row(row, original, "HUDD" in set(table["mode"])) for row in table.itertuples()]
    chart = comparison_chart(ctx, data, original)
    scenario_rows = scenario_gain_rows(data)
    return f"""
<h2>Retraining: HUDD vs the baselines at one labelling budget</h2>
<p>Original test accuracy <b>{original:.2f}%</b>. Every mode trains on the same number of distinct improvement
images and on as many samples. HUDD: its unsafe set, {how_picked(ctx)}. BL1: random misclassified improvement
images (finding them needs every improvement image labelled); BL2: random ones; BL3: the ones the model is
least sure of (lowest margin).
Labels needed: what an engineer labels to run the mode. p and A12: HUDD's runs against the mode's (two-sided
Mann-Whitney U; A12 above 0.5: HUDD ahead), where HUDD and the mode have {retrainModule.STATISTICS_MIN_RUNS} runs or
more (n/a where either has one: one run each is one comparison of two accuracies, not a test).{few_runs_words(table)}</p>
<table id=retrain><tr><th class=l>mode</th><th>labelled</th><th>labels needed</th><th>training samples</th><th>runs</th>
<th>accuracy (mean)</th><th>min–max</th><th>gain (points)</th><th>gain per 100 labels</th><th>improved</th>
<th>worsened</th><th>p (vs HUDD)</th><th>A12 (HUDD)</th></tr>
{''.join(rows)}</table>
{scenario_rows}
{f'<p><img src="{rel(chart, ctx.paths.t_dir)}" alt="accuracy gain per mode" width=720></p>' if chart else ''}
"""


def few_runs_words(table: pd.DataFrame) -> str:
    note = retrainModule.few_runs_note(table)
    return f" <span class=few-runs>{esc(note[0].upper() + note[1:])}.</span>" if note else ""


def retrain_row(row, original: float, hudd_ran: bool) -> str:
    """One mode's row of the comparison (retrainModule.comparison)."""
    stats = ("<td></td><td></td>" if row.mode == "HUDD" or not hudd_ran else
             "<td class=p-value>n/a</td><td class=a12>n/a</td>" if np.isnan(row.a12_HUDD) else
             f"<td class=p-value data-value='{row.p_value_vs_HUDD:.6f}'>{row.p_value_vs_HUDD:.3f}</td>"
             f"<td class=a12 data-value='{row.a12_HUDD:.6f}'>{row.a12_HUDD:.2f}</td>")
    return (f"<tr data-mode={row.mode}><td class=l>{row.mode}</td><td>{row.labelled}</td>"
            f"<td class=labels-needed data-value='{row.labels_needed}'>{row.labels_needed}</td>"
            f"<td>{row.bag}</td><td>{row.runs}</td>"
            f"<td class=acc data-value='{row.accuracy:.4f}'>{row.accuracy:.2f}%</td>"
            f"<td>{row.accuracy_min:.2f}–{row.accuracy_max:.2f}%</td>"
            f"<td class='gain {sign_class(row.gain)}' data-value='{row.gain:.4f}'>{row.gain:+.2f}</td>"
            f"<td class=per-label data-value='{row.gain_per_100_labels:.6f}'>{row.gain_per_100_labels:+.2f}</td>"
            f"<td>{row.improved:.1f}</td><td>{row.worsened:.1f}</td>{stats}</tr>")


def scenario_gain_rows(data: ReportData) -> str:
    tables = {m: t["scenarios"].set_index("scenario")["gain"] for m, t in data.retrain.items() if "scenarios" in t}
    if not tables:
        return ""
    names = list(next(iter(tables.values())).index)
    body = "".join(f"<tr><td class=l>{m}</td>" + "".join(
        f"<td class='{sign_class(g)}'>{g:+.1f}</td>" for g in gains.reindex(names)) + "</tr>"
        for m, gains in tables.items())
    return ("<p>Gain per scenario (accuracy points, mean of the runs):</p><table id=scenario-gains><tr><th class=l>mode</th>"
            + "".join(f"<th>{esc(n)}</th>" for n in names) + f"</tr>{body}</table>")


def comparison_chart(ctx: RunContext, data: ReportData, original: float) -> Path | None:
    """T/Report/comparison.png: gain per mode, overall and per scenario (grouped bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {"overall": {m: t["runs"]["accuracy"].mean() - original for m, t in data.retrain.items()}}
    for mode, tables in data.retrain.items():
        if "scenarios" in tables:
            for row in tables["scenarios"].itertuples():
                groups.setdefault(row.scenario, {})[mode] = row.gain
    modes = list(data.retrain)
    figure, axes = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(modes)
    for number, mode in enumerate(modes):
        values = [groups[g].get(mode, np.nan) for g in groups]
        axes.bar(np.arange(len(groups)) + number * width - 0.4 + width / 2, values, width, label=mode)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(np.arange(len(groups)), list(groups))
    axes.set_ylabel("test accuracy gain (points)")
    axes.set_title("Retraining at one labelling budget: gain over the original model")
    axes.legend()
    figure.tight_layout()
    path = ctx.paths.t_dir / ASSETS / "comparison.png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path


def no_errors_page(ctx: RunContext) -> str:
    """The model gets every test image right: nothing to explain; the sets' accuracies."""
    sets = testModule.STEP.summary(ctx)["sets"]
    return (f"<h2>No root causes to show</h2><p id=no-errors>Model <b>{esc(ctx.model_path.name)}</b> gets every one of "
            f"the {sets['TestSet']['images']} test images right, so there are no error-inducing images to explain, "
            "cluster or retrain for. Add test images of the conditions you worry about and run again.</p>"
            + ("<p class=muted id=stale>The heatmaps, RCC folders and tables under T/ are an earlier run's, on other "
               "errors: they do not describe this one.</p>" if clusterModule.has_run(ctx.paths) else "")
            + f"<h2>The run</h2>{sets_table(sets)}{left_out_note(ctx)}{scenario_table(ctx)}")


def write_report(ctx: RunContext) -> Path | None:
    """Writes T/report.html from the outputs on disk: the root causes and what follows from them, or
    the page saying that the test set has no errors; None where there are no current clusters yet."""
    if wrong_test_images(ctx) == 0:
        body = no_errors_page(ctx)
    elif clusters_current(ctx):
        data = read_data(ctx)
        body = f"{rcc_summary(ctx, data)}{run_section(ctx, data)}{retrain_section(ctx, data)}{rcc_cards(ctx, data)}"
    else:
        return None
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>HUDD report: {esc(ctx.paths.root.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>HUDD report</h1>"
            f"<p class=muted>Root causes of the model's errors, found by clustering LRP heatmaps.</p>{body}"
            "</body></html>")
    path = report_path(ctx.paths)
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path
