"""reportModule: T/report.html parses, every image it references exists, its numbers are the CSVs',
the overlays show relevance in the right colours, and (where Chromium is installed) it renders."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import reportModule
import Helper
import retrainModule
from helpers import assert_clean_error, context, hudd


class PageParser(HTMLParser):
    """Collects image sources, links, elements with data-* attributes, and the text of the page."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.data, self.text = [], [], [], []
        self.open_tags = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if any(k.startswith("data-") for k in attrs) or "id" in attrs:
            self.data.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def linked_file(reference: str) -> str | None:
    """The file a link or image source opens, read as a browser reads it (the fragment and the query
    split off, the path percent-decoded); None for a link to an element of the page itself."""
    parts = urllib.parse.urlsplit(reference)
    if not parts.path:
        assert parts.fragment, reference
        return None
    assert not parts.fragment and not parts.query, f"{reference}: a file name read as part of the URL"
    return urllib.parse.unquote(parts.path)


def element_ids(page: PageParser) -> set[str]:
    return {attrs["id"] for _tag, attrs in page.data if "id" in attrs}


def selected_layer(case: Path) -> str:
    summary = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv")
    return summary.loc[summary["selected"], "layer"].iloc[0]


def test_every_pipeline_run_writes_the_report_and_says_where(retrained_case):
    case, results = retrained_case
    report = case / "T" / "report.html"
    assert report.is_file()
    assert f"report: {report}" in results["BL2"].stdout


def test_every_referenced_file_exists(retrained_case):
    case, _ = retrained_case
    page = parse(case / "T" / "report.html")
    assert page.sources and page.links
    ids = {attrs["id"] for _tag, attrs in page.data if "id" in attrs}
    for reference in page.sources + page.links:
        assert not reference.startswith(("/", "http")), reference   # relative: the page opens from disk anywhere
        target = linked_file(reference)
        if target is None:                                          # the summary's links to the cards
            assert reference[1:] in ids, reference
        else:
            assert (case / "T" / target).exists(), reference


def test_the_numbers_are_those_of_the_output_files(retrained_case):
    case, _ = retrained_case
    page = parse(case / "T" / "report.html")
    layer = selected_layer(case)
    stats = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_stats.csv").set_index("rcc")["size"]
    cards = {attrs["data-rcc"]: int(attrs["data-size"]) for tag, attrs in page.data if "data-rcc" in attrs}
    assert cards == stats.to_dict()                     # every RCC of the selected layer, with its size
    at_a_glance = [attrs["data-top-rcc"] for tag, attrs in page.data if "data-top-rcc" in attrs]
    assert sorted(at_a_glance) == sorted(stats.index)   # every top-level RCC on the summary's one screen
    subs = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "sub_rcc_stats.csv")["sub_rcc"]
    assert sorted(attrs["data-sub-rcc"] for tag, attrs in page.data if "data-sub-rcc" in attrs) == sorted(subs)
    ids = {attrs["id"]: attrs for tag, attrs in page.data if "id" in attrs}
    assert int(ids["errors"]["data-value"]) == len(pd.read_csv(case / "T" / "Heatmaps" / "index.csv"))
    accuracies = [float(attrs["data-accuracy"]) for tag, attrs in page.data if "data-accuracy" in attrs]
    test = pd.read_csv(case / "testResult.csv")
    assert 100 * (test["result"] == "Correct").mean() == pytest.approx(accuracies[1], abs=1e-4)
    original = 100 * (test["result"] == "Correct").mean()
    shown = {attrs["data-mode"] for tag, attrs in page.data if "data-mode" in attrs}
    assert shown == {"HUDD", "BL1", "BL2"}
    values = [float(attrs["data-value"]) for tag, attrs in page.data if attrs.get("class", "").startswith("acc")]
    gains = [float(attrs["data-value"]) for tag, attrs in page.data if attrs.get("class", "").startswith("gain")]
    for mode, accuracy, gain in zip(("HUDD", "BL1", "BL2"), values, gains):
        runs = pd.read_csv(case / "T" / "Retrain" / f"{mode}_runs.csv")
        assert accuracy == pytest.approx(runs["accuracy"].mean(), abs=1e-4)
        assert gain == pytest.approx(runs["accuracy"].mean() - original, abs=1e-4)
    assert (case / "T" / "Report" / "comparison.png").is_file()
    # 2 runs per mode: no split of 2 and 2 runs gives a p below 2 / C(4, 2), and the page says so
    text = (case / "T" / "report.html").read_text(encoding="utf-8")
    assert "<span class=few-runs>With these runs no p can fall below 0.333, whatever the accuracies" in text
    # a classifier's unsafe set is picked by contrast (assign_pick auto), and the page says so
    assert (case / "T" / "UnsafeSet" / "contrast.csv").is_file() and ids["pick"]["data-pick"] == "contrast"


def test_the_layer_table_says_what_each_measured_column_is(retrained_case):
    """Every column of the layer table but the layer's name is explained in the line below it."""
    case, _ = retrained_case
    text = (case / "T" / "report.html").read_text(encoding="utf-8")
    table = re.search(r"<h3>Layer selection</h3>.*?<table><tr>(.*?)</tr>", text, re.S).group(1)
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert {"k", "wicd", "silhouette", "output_alignment"} <= set(headers)
    legend = re.search(r"<p class=legend>(.*?)</p>", text, re.S).group(1)
    assert [h for h in headers if f"<b>{h}</b>: " not in legend] == ["layer"]
    # a case with metadata shows purity and coverage too: the legend explains every column the table may show
    everything = reportModule.measures_legend(list(reportModule.LAYER_COLUMNS))
    assert [c for c in reportModule.LAYER_COLUMNS if f"<b>{c}</b>: " not in everything] == ["layer"]


def test_each_rcc_shows_first_the_most_typical_member_of_each_sub_cluster_largest_first(retrained_case):
    """Not the first class folder's images: the summary's tiles of an RCC take, in turn, each sub-cluster's
    member of smallest mean distance to the others (largest sub-cluster first), then each one's second."""
    case, _ = retrained_case
    layer = selected_layer(case)
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_labels.csv")
    sizes = labels["sub_rcc"].value_counts()
    text = (case / "T" / "report.html").read_text(encoding="utf-8")
    for rcc, members in labels.groupby("rcc"):
        queues = [list(group.sort_values("mean_distance_in_sub_rcc", kind="stable")["image"])
                  for _, group in sorted(members.groupby("sub_rcc"), key=lambda item: (-sizes[item[0]], item[0]))]
        order = [queue[turn] for turn in range(max(map(len, queues))) for queue in queues if turn < len(queue)]
        row = re.search(f"<tr data-top-rcc='{rcc}'>(.*?)</tr>", text, re.S).group(1)
        shown = [linked_file(html.unescape(src)).rsplit("/", 1)[1] for src in re.findall(r"src='([^']*)'", row)]
        images = {f"{r.expected}__{Path(r.image).stem}_heatmap.png": r.image for r in members.itertuples()}
        assert [images[name] for name in shown] == order[:4]


def test_the_page_says_what_each_heatmap_explains_as_the_explain_setting_chose(retrained_case):
    """The run's line and the cards' legend name the explained output in words; they said "class explained:
    predicted" for every task, keypoint models included, and "the predicted class" with explain expected."""
    case, _ = retrained_case
    text = (case / "T" / "report.html").read_text(encoding="utf-8")
    assert "LRP rules, each explaining the predicted class" in text and "relevance of the predicted class" in text
    words = {(task, explain): Helper.make_task(Helper.Settings(task=task, explain=explain)).explained_words[0]
             for task, explain in [("classification", "predicted"), ("classification", "expected"),
                                   ("keypoints", "predicted"), ("keypoints", "all")]}
    assert words == {("classification", "predicted"): "the predicted class",
                     ("classification", "expected"): "the expected (true) class",
                     ("keypoints", "predicted"): "the worst keypoint's output map",
                     ("keypoints", "all"): "every keypoint's output map"}


def test_tiles_take_turns_over_the_sub_clusters_largest_first():
    members = pd.DataFrame({"image": list("abcdefg"),
                            "sub_rcc": ["RCC03.2", "RCC03.1", "RCC03.1", "RCC03.3", "RCC03.2", "RCC03.1", "RCC03.2"],
                            "mean_distance_in_sub_rcc": [0.5, 0.9, 0.2, 0.0, 0.4, 0.3, 0.6]})
    # RCC03.1: c 0.2, f 0.3, b 0.9; RCC03.2: e 0.4, a 0.5, g 0.6; RCC03.3: d
    assert list(reportModule.shown_first(members)["image"]) == list("cedfabg")
    older = members.drop(columns="mean_distance_in_sub_rcc")   # a clustering written before the column
    assert list(reportModule.shown_first(older)["image"]) == list("abcdefg")


def test_a_scenario_a_set_lacks_is_a_dash_not_nan(case):
    pd.DataFrame({"set": ["TrainingSet", "TestSet", "TestSet"], "scenario": ["none", "none", "patch"],
                  "images": [10, 8, 2], "correct": [9, 8, 1], "accuracy": [90.0, 100.0, 50.0]}).to_csv(
        case / "scenarioAccuracy.csv", index=False)
    table = reportModule.scenario_table(context(case))
    patch = re.search(r"<tr><td class=l>patch</td>(.*?)</tr>", table).group(1)
    assert patch == "<td>–</td><td>50.0%</td>" and "nan" not in table


def test_an_undefined_purity_or_coverage_is_a_dash_with_its_reason_not_nan():
    """One or two error images: no RCC of two images has a purity, no scenario five errors for a coverage."""
    import HUDD
    few = pd.DataFrame({"layer": ["Layer1"], "k": [2], "purity": [np.nan], "coverage": [np.nan],
                        "purity_10": [np.nan], "coverage_10": [np.nan]})
    assert reportModule.format_cell(np.nan) == "–" and reportModule.format_cell(0.25) == "0.25"
    assert "purity needs an RCC of two or more images" in reportModule.undefined_measures_note(few)
    assert reportModule.undefined_measures_note(few.fillna(0.5)) == ""
    line = HUDD.cluster_quality({**few.iloc[0].to_dict(), "purity": 0.5})
    assert line.startswith("; purity 0.50, coverage n/a; the 10 largest: purity n/a, coverage n/a (from metadata.csv) (n/a: purity")
    assert "nan" not in line and "n/a" not in HUDD.cluster_quality({**few.iloc[0].fillna(1.0).to_dict()})


def test_overlays_lie_beside_the_rcc_images_and_show_positive_relevance_in_red(retrained_case):
    case, _ = retrained_case
    layer = selected_layer(case)
    labels = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_labels.csv")
    index = pd.read_csv(case / "T" / "Heatmaps" / "index.csv")
    pixels = np.load(case / "T" / "Heatmaps" / "Layer0.npy")
    for item in labels.itertuples():
        source = case / item.image
        overlay = case / "T" / layer / item.rcc / f"{item.expected}__{source.stem}_heatmap.png"
        assert overlay.is_file(), overlay
    # One overlay checked pixel by pixel against its heatmap: the strongest positive pixel is red, the
    # strongest negative one blue (tile coordinates: the heatmap is upscaled without smoothing).
    item = labels.iloc[0]
    heat = pixels[int(np.flatnonzero(index["image"] == item.image)[0])].sum(axis=0)
    tile = np.asarray(Image.open(case / "T" / layer / item.rcc /
                                 f"{item.expected}__{Path(item.image).stem}_heatmap.png").convert("RGB")).astype(int)
    size = reportModule.TILE
    assert tile.shape == (size, 2 * size + 2, 3)
    scale = size / heat.shape[0]
    for row, col, colour in ((*np.unravel_index(heat.argmax(), heat.shape), "red"),
                             (*np.unravel_index(heat.argmin(), heat.shape), "blue")):
        r, g, b = tile[int((row + 0.5) * scale), size + 2 + int((col + 0.5) * scale)]
        assert (r > b + 60) if colour == "red" else (b > r + 60), (colour, r, g, b)


def test_report_command_on_an_existing_case_and_on_one_without_clusters(retrained_case, make_case):
    case, _ = retrained_case
    report = case / "T" / "report.html"
    report.unlink()
    result = hudd("-o", str(case), "--report")
    assert result.returncode == 0 and report.is_file() and "report:" in result.stdout
    bare = make_case("bare", per_class=1)
    result = hudd("-o", str(bare), "--report")
    assert result.returncode == 2 and "no clustering results" in result.stderr


def test_the_page_renders_in_headless_chromium(retrained_case, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("HUDD_REQUIRE_BROWSER"):  # CI installs Chromium: there, a missing one is a failure
            pytest.fail("HUDD_REQUIRE_BROWSER is set but Chromium is not installed (Debian package: chromium)")
        pytest.skip("Chromium is not installed (Debian package: chromium)")
    case, _ = retrained_case
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1400,2000",
                    f"--screenshot={shot}", (case / "T" / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (2000, 1400)
    assert picture.std() > 20 and (picture < 100).any()   # text and thumbnails, not a blank page


def card_segments(page: str) -> dict[str, str]:
    """Each RCC card's HTML, by RCC name."""
    parts = re.split(r"(?=<div class=card id=')", page)
    return {re.match(r"<div class=card id='([^']+)'", p).group(1): p for p in parts[1:]}


def test_every_card_says_what_sets_its_rcc_apart_without_metadata(retrained_case):
    case, _ = retrained_case
    assert not list((case / "DataSets").rglob("metadata.csv"))
    layer = selected_layer(case)
    table = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_descriptors.csv", keep_default_na=False)
    page = (case / "T" / "report.html").read_text(encoding="utf-8")
    cards = card_segments(page)
    assert set(cards) == set(table["rcc"])
    for rcc, card in cards.items():
        said = table[(table["rcc"] == rcc) & (table["sentence"] != "")].sort_values("rank")
        if len(said):
            positions = [card.index(html.escape(s, quote=True)) for s in said["sentence"]]
            assert positions == sorted(positions)
            for row in said.itertuples():
                assert f"data-descriptor='{row.descriptor}' data-delta='{row.delta:.4f}'" in card
        else:
            assert "no image or relevance descriptor differs much" in card
    glance = parse(case / "T" / "report.html")
    headlines = {attrs["data-headline"]: None for tag, attrs in glance.data if "data-headline" in attrs}
    top_level = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rcc_stats.csv")["rcc"]
    assert set(headlines) == set(top_level) == set(table["rcc"])      # the summary: every top-level RCC
    summary = page[page.index("id=rcc-summary"):page.index("</table>", page.index("id=rcc-summary"))]
    assert all(f"data-headline='{rcc}'" in summary for rcc in headlines)
    assert "what they share" not in summary     # without metadata, no column left empty
    for rcc in headlines:
        first = table[(table["rcc"] == rcc) & (table["sentence"] != "")].sort_values("rank")["sentence"]
        cell = re.search(rf"data-headline='{rcc}'>(.*?)</td>", page).group(1)
        assert html.unescape(cell) == (first.iloc[0] if len(first) else reportModule.NOTHING_STANDS_OUT)


def test_a_test_set_without_errors_gets_a_report_that_says_so_and_no_earlier_rcc(make_case):
    """A model that gets every test image right (here: the wrong test images taken out after a full run)
    stops after the test step. The report says so; the earlier run's RCCs and retraining, still on disk,
    are neither shown nor reused."""
    case = make_case(per_class=4)
    assert hudd("-o", str(case), "-mode", "HUDD", "--runs", "1", "--steps", "test,heatmaps,clusters,assign,retrain"
                ).returncode == 0
    assert "RCC01" in (case / "T" / "report.html").read_text()
    results = pd.read_csv(case / "testResult.csv")
    for image in results.loc[results["result"] == "Wrong", "image"]:
        (case / image).unlink()
    result = hudd("-o", str(case))
    assert result.returncode == 0, result.stderr
    assert "no error-inducing test images" in result.stdout and "add -mode HUDD" not in result.stdout
    page = parse(case / "T" / "report.html")
    text = (case / "T" / "report.html").read_text()
    assert {"no-errors", "stale"} <= element_ids(page)
    assert "RCC01" not in text and "Retraining" not in text
    assert f"every one of the {(results['result'] == 'Correct').sum()} test images right" in text
    manifest = json.loads((case / "hudd_manifest.json").read_text())
    assert list(manifest) == ["test"]
    assert hudd("-o", str(case), "--report").returncode == 0   # the same page from the files on disk
    assert "no-errors" in element_ids(parse(case / "T" / "report.html"))
    for command in (("--compare",), ("-rq", "True", "-m", "OriginalModel.pth")):
        assert_clean_error(hudd("-o", str(case), *command), "an earlier run's", "run the pipeline again")


def test_retraining_of_an_earlier_unsafe_set_is_not_shown_as_current(make_case):
    """The test set changes after retraining: the analysis reruns, and the retraining tables on disk (of
    models trained on the old unsafe set and measured on the old test set) leave the report."""
    case = make_case(per_class=4)
    assert hudd("-o", str(case), "-mode", "HUDD", "--runs", "1").returncode == 0
    assert "data-mode=HUDD" in (case / "T" / "report.html").read_text()
    # The runs were measured on the test set: with the same unsafe set, another test set is another basis.
    before = retrainModule.RetrainStep("HUDD").inputs(context(case))
    results = pd.read_csv(case / "testResult.csv")
    (case / results.loc[results["result"] == "Correct", "image"].iloc[0]).unlink()
    after = retrainModule.RetrainStep("HUDD").inputs(context(case))
    assert before["assign"] == after["assign"] and before["test"] != after["test"]
    assert retrainModule.current_modes(context(case)) == []
    results = pd.read_csv(case / "testResult.csv")
    (case / results.loc[results["result"] == "Wrong", "image"].iloc[0]).unlink()
    rerun = hudd("-o", str(case))
    assert rerun.returncode == 0, rerun.stderr
    text = (case / "T" / "report.html").read_text()
    assert "data-mode=HUDD" not in text and "Not run on the current unsafe set and test set" in text
    assert retrainModule.modes_run(Helper.CasePaths(case)) == ["HUDD"] and retrainModule.current_modes(context(case)) == []
    again = hudd("-o", str(case), "-mode", "HUDD", "--runs", "1")   # retrained on the new unsafe set: shown
    assert again.returncode == 0 and "retraining HUDD: inputs unchanged" not in again.stdout
    assert "data-mode=HUDD" in (case / "T" / "report.html").read_text()


def test_a_case_whose_first_run_finds_no_error_gets_the_report_too(make_case):
    case = make_case(per_class=2)
    assert hudd("-o", str(case), "--steps", "test").returncode == 0
    results = pd.read_csv(case / "testResult.csv")
    for image in results.loc[results["result"] == "Wrong", "image"]:
        (case / image).unlink()
    result = hudd("-o", str(case))
    assert result.returncode == 0 and "report:" in result.stdout
    page = parse(case / "T" / "report.html")
    assert "no-errors" in element_ids(page) and "stale" not in element_ids(page)


def test_rccs_of_one_image_share_the_summary_s_last_line_and_their_cards_say_why_nothing_is_characterised(case):
    """A small case cut at its bound leaves RCCs of one image (a resnet18 case of 59 errors: 11 of 19), and
    the summary gave each a line, with a sentence of what "sets it apart" that one image always has. Now the
    RCCs of 2+ images have their lines, the single images one line whose tiles link to their cards, and a
    single image's card says why nothing is characterised."""
    sizes = {"RCC01": 3, "RCC02": 2, "RCC03": 1, "RCC04": 1, "RCC05": 1}
    labels = pd.DataFrame([{"image": f"DataSets/TestSet/class_a/{rcc}_{i}.png", "expected": "class_a",
                            "predicted": "class.b", "rcc": rcc, "sub_rcc": f"{rcc}.1", "mean_distance_in_sub_rcc": 0.1}
                           for rcc, size in sizes.items() for i in range(size)])
    stats = pd.DataFrame({"rcc": list(sizes), "size": list(sizes.values()), "sub_rccs": 1, "icd": 0.5,
                          "majority_scenario": ["fog", "night", "tilt", "none", "tilt"], "purity": 1.0})
    described = pd.DataFrame([{"rcc": rcc, "descriptor": "brightness", "delta": 0.9, "rank": 1,
                               "sentence": f"darker than the others ({rcc})"} for rcc in sizes])
    data = reportModule.ReportData(
        layer="Layer3", summary=pd.DataFrame(), labels=labels, stats=stats,
        sub_stats=stats.assign(sub_rcc=stats["rcc"] + ".1"), parameters=None, described=described, unsafe=None,
        retrain={}, sets={}, errors=len(labels))
    ctx = context(case)
    summary = reportModule.rcc_summary(ctx, data)
    assert "2 root-cause clusters and 3 single images of Layer3" in summary
    rows = re.findall(r"<tr[ >].*?</tr>", summary, re.S)[1:]
    assert [re.search(r"data-top-rcc='(\w+)'", row).group(1) for row in rows[:2]] == ["RCC01", "RCC02"]
    last = rows[2]
    assert "data-single-images='RCC03 RCC04 RCC05'" in last
    assert re.findall(r"<a href='#(\w+)' data-top-rcc='\1'><figure>", last) == ["RCC03", "RCC04", "RCC05"]
    assert "tilt 2, none 1" in last and reportModule.SINGLE_IMAGE in last and "darker" not in last
    assert "darker than the others (RCC01)" in summary
    cards = card_segments(reportModule.rcc_cards(ctx, data))
    assert set(cards) == set(sizes)
    for rcc, size in sizes.items():
        assert (f"darker than the others ({rcc})" in cards[rcc]) == (size > 1)
        assert (reportModule.SINGLE_CARD in cards[rcc]) == (size == 1)
    # one RCC of one image keeps a line of its own
    data.stats, data.labels = stats[stats["rcc"] != "RCC05"].copy(), labels[labels["rcc"] != "RCC05"]
    data.stats.loc[data.stats["rcc"] == "RCC04", "size"] = 2
    summary = reportModule.rcc_summary(ctx, data)
    assert "data-single-images" not in summary and "data-top-rcc='RCC03'>" in summary
