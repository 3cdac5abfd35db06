"""descriptors.py: each descriptor on synthetic images with a known answer, Cliff's delta against
scipy, the ranking, and every sentence against its numbers."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageStat
from scipy import ndimage, stats

import descriptors as D


def scene(seed: int = 0, size: int = 64, background=((110, 160, 215), (60, 120, 50))) -> Image.Image:
    """A red-rimmed white disc with a black bar on a noisy two-tone background (by default sky
    above, foliage below)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3))
    pixels[: size // 2] = background[0]
    pixels[size // 2:] = background[1]
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    c, r = size / 2, size * 0.3
    draw.ellipse([c - r, c - r, c + r, c + r], fill=(200, 30, 40))
    draw.ellipse([c - 0.7 * r, c - 0.7 * r, c + 0.7 * r, c + 0.7 * r], fill=(240, 240, 235))
    draw.rectangle([c - 0.4 * r, c - 0.12 * r, c + 0.4 * r, c + 0.12 * r], fill=(20, 20, 20))
    return image


def as_array(*images: Image.Image) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) / 255.0 for i in images])


def describe(*images: Image.Image) -> pd.DataFrame:
    return D.image_descriptors(as_array(*images))


# --------------------------------------------------------------------------------------------
# Image descriptors, each on a copy with a known change
# --------------------------------------------------------------------------------------------

def test_brightness_and_contrast_are_pils_luma_mean_and_spread_and_a_darkened_copy_scales_them():
    image = scene()
    dark = Image.eval(image, lambda v: int(v * 0.4))
    table = describe(image, dark)
    for row, picture in zip(table.itertuples(), (image, dark)):
        grey = ImageStat.Stat(picture.convert("L"))       # PIL's ITU-R 601-2 luma, rounded to whole levels
        assert row.brightness == pytest.approx(grey.mean[0] / 255, abs=0.5 / 255)
        assert row.contrast == pytest.approx(grey.stddev[0] / 255, abs=0.5 / 255)
    assert table.brightness[1] == pytest.approx(0.4 * table.brightness[0], rel=0.02)
    assert table.contrast[1] == pytest.approx(0.4 * table.contrast[0], rel=0.02)


def test_a_blurred_copy_is_less_sharp_with_fewer_edges():
    image = scene()
    copies = [image] + [image.filter(ImageFilter.GaussianBlur(sigma)) for sigma in (1, 2, 4)]
    table = describe(*copies)
    grey = D.luma(as_array(*copies))
    laplacian = np.stack([ndimage.laplace(g, mode="nearest")[1:-1, 1:-1] for g in grey])   # scipy as the oracle
    np.testing.assert_allclose(table.sharpness, laplacian.var(axis=(1, 2)), rtol=1e-12)
    assert table.sharpness[2] < 0.1 * table.sharpness[0]
    assert list(table.sharpness) == sorted(table.sharpness, reverse=True)
    assert list(table.edge_density) == sorted(table.edge_density, reverse=True)
    assert table.edge_density[3] < 0.2 * table.edge_density[0]


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.08])
def test_noise_level_recovers_the_noise_added_to_a_smooth_image(sigma):
    rng = np.random.default_rng(1)
    ramp = np.linspace(0.2, 0.7, 96)[None, :, None] * np.ones((96, 96, 3))
    noisy = ramp + rng.normal(0, sigma, (96, 96, 1))             # the same noise in every channel: grey noise
    table = D.image_descriptors(np.stack([ramp, noisy]))
    assert table.noise[0] < 0.002
    assert table.noise[1] == pytest.approx(sigma, rel=0.1)


def test_a_hue_rotated_copy_moves_the_dominant_hue_and_the_hue_shares():
    image = scene(background=((128, 128, 128), (100, 100, 100)))
    hsv = np.asarray(image.convert("HSV"), dtype=np.float64)
    hsv[..., 0] = np.mod(hsv[..., 0] + 120 / 360 * 256, 256)    # PIL's hue runs over 0..255
    rotated = Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")
    table = describe(image, rotated)
    assert table.dominant_hue[0] == pytest.approx(0, abs=10) or table.dominant_hue[0] > 350
    assert table.dominant_hue[1] == pytest.approx(120, abs=10)
    assert table.hue_red[0] > 0.1 and table.hue_green[1] == pytest.approx(table.hue_red[0], abs=0.02)
    assert table.hue_green[0] == pytest.approx(0, abs=0.01) and table.hue_red[1] < 0.02
    assert table.saturation[1] == pytest.approx(table.saturation[0], abs=0.02)


def test_the_hue_shares_are_the_objects_where_one_is_found():
    """A red sign on green foliage: its colours, not the foliage's; without an object, the image's."""
    image = scene(background=((60, 120, 50), (60, 120, 50)))
    masks, valid = D.object_masks(as_array(image))
    assert valid[0]
    table = describe(image)
    pixels = np.asarray(image.convert("HSV"), dtype=np.float64)[masks[0]]
    red = ((pixels[:, 1] >= 64) & (pixels[:, 2] >= 51) & ((pixels[:, 0] < 256 / 12) | (pixels[:, 0] >= 256 * 11 / 12)))
    assert table.hue_red[0] == pytest.approx(red.mean(), abs=0.01) and table.hue_red[0] > 0.2
    assert table.hue_green[0] < 0.05                                     # the foliage is not the object
    flat = Image.new("RGB", (64, 64), (60, 120, 50))
    assert not D.object_masks(as_array(flat))[1][0]
    assert describe(flat).hue_green[0] == pytest.approx(1.0)            # no object: the whole image


def stripes(angle: float, size: int = 64) -> Image.Image:
    """Vertical stripes rotated counter-clockwise by `angle` degrees (drawn large, cropped)."""
    big = Image.new("RGB", (3 * size, 3 * size), (40, 40, 40))
    draw = ImageDraw.Draw(big)
    for x in range(0, 3 * size, 16):
        draw.rectangle([x, 0, x + 7, 3 * size], fill=(220, 220, 220))
    return big.rotate(angle, resample=Image.BICUBIC).crop((size, size, 2 * size, 2 * size))


@pytest.mark.parametrize("angle", [10, 30, -20])
def test_a_rotated_copy_turns_the_dominant_edge_orientation_by_the_angle(angle):
    table = describe(stripes(0), stripes(angle))
    assert table.edge_orientation[0] == pytest.approx(90, abs=1)            # vertical edges
    assert table.edge_obliqueness[0] == pytest.approx(0, abs=1)
    assert table.edge_orientation[1] == pytest.approx(90 + angle, abs=2.5)
    assert table.edge_obliqueness[1] == pytest.approx(abs(angle), abs=2.5)


def test_edge_orientation_looks_at_the_object_where_there_is_one():
    """An upright background with a tilted object: the object's edges decide."""
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    for y in range(0, 64, 8):
        draw.rectangle([0, y, 63, y + 1], fill=(120, 120, 120))           # faint horizontal background lines
    bar = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(bar).rectangle([14, 26, 50, 38], fill=(240, 220, 40, 255))
    image.paste(bar.rotate(40, resample=Image.BICUBIC), (0, 0), bar.rotate(40, resample=Image.BICUBIC))
    table = describe(image)
    assert table.object_share[0] == pytest.approx(36 * 12 / 64 ** 2, rel=0.35)
    assert table.edge_obliqueness[0] > 30


@pytest.mark.parametrize("angle", [0, 15, 35, -30, 60])
def test_a_rotated_ellipse_has_the_tilt_of_its_long_axis_and_a_disc_has_none(angle):
    def shape(axes, turn):
        layer = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(layer).ellipse([48 - axes[0], 48 - axes[1], 48 + axes[0], 48 + axes[1]], fill=255)
        return np.asarray(layer.rotate(turn, resample=Image.BILINEAR)) > 127
    masks = np.stack([shape((30, 15), angle), shape((25, 25), angle)])
    tilt = D.object_tilt(masks)
    expected = min(abs(angle) % 90, 90 - abs(angle) % 90)
    assert tilt[0] == pytest.approx(expected, abs=1.0)
    assert tilt[1] == 0.0


def test_the_object_mask_finds_a_disc_on_a_textured_background_and_none_on_a_flat_image():
    image, flat = scene(), Image.new("RGB", (64, 64), (128, 128, 128))
    masks, valid = D.object_masks(as_array(image, flat))
    rows, cols = np.mgrid[0:64, 0:64] + 0.5
    disc = (rows - 32) ** 2 + (cols - 32) ** 2 <= (0.3 * 64) ** 2
    assert valid.tolist() == [True, False]
    assert (masks[0] & disc).sum() / (masks[0] | disc).sum() > 0.85


def test_large_images_get_masks_of_their_own_size():
    image = scene(size=200)
    masks, valid = D.object_masks(as_array(image))
    small, _ = D.object_masks(as_array(image.resize((50, 50), Image.BOX)))
    assert masks.shape == (1, 200, 200) and valid[0]
    assert masks[0].mean() == pytest.approx(small[0].mean(), abs=0.03)


def test_grey_images_have_no_colour_descriptors():
    grey = as_array(scene())[..., :1]
    table = D.image_descriptors(grey)
    assert table[["saturation", "dominant_hue", "hue_red"]].isna().all(axis=None)
    assert table[["brightness", "contrast", "sharpness", "edge_density"]].notna().all(axis=None)


# --------------------------------------------------------------------------------------------
# Relevance descriptors
# --------------------------------------------------------------------------------------------

def test_relevance_planted_in_one_corner():
    relevance = np.full((2, 3, 30, 30), -0.01)      # negative relevance everywhere is left out
    relevance[0, :, :4, :4] += 1.0                  # image 0: top-left 4x4 block
    relevance[1, :, 26:, 10:20] += np.arange(10)    # image 1: bottom row, growing to the right
    masks = np.zeros((2, 30, 30), dtype=bool)
    masks[:, 8:22, 8:22] = True                     # the object in the middle
    table = D.relevance_descriptors(relevance, masks, np.array([True, True]))
    positive = np.maximum(relevance.sum(axis=1), 0)
    for row, heat in zip(table.itertuples(), positive):
        y, x = ndimage.center_of_mass(heat)         # scipy as the oracle (pixel centres at 0.5)
        assert row.relevance_x == pytest.approx((x + 0.5) / 30)
        assert row.relevance_y == pytest.approx((y + 0.5) / 30)
    first = table.iloc[0]
    assert first.relevance_top_left == pytest.approx(1.0)
    assert sum(first[f"relevance_{c}"] for c in D.GRID) == pytest.approx(1.0)
    assert first.relevance_half_area == pytest.approx(8 / 900)       # half of 16 equal pixels
    assert first.relevance_outside_object == pytest.approx(1.0)
    second = table.iloc[1]
    assert second.relevance_bottom == pytest.approx(positive[1][20:, 10:20].sum() / positive[1].sum())
    assert second.relevance_bottom == pytest.approx(1.0)
    # half of sum(0..9 per column, 4 rows) lies in the largest values: columns 9, 8, 7 (4 rows each) hold 96 of 180
    assert second.relevance_half_area == pytest.approx(12 / 900)


def test_relevance_outside_the_object_is_missing_where_no_object_was_found():
    relevance = np.ones((2, 1, 8, 8))
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, :4] = True
    table = D.relevance_descriptors(relevance, masks, np.array([True, False]))
    assert table.relevance_outside_object[0] == pytest.approx(0.5)
    assert np.isnan(table.relevance_outside_object[1])
    assert D.relevance_descriptors(np.zeros((1, 8, 8))).isna().all(axis=None)   # no positive relevance


# --------------------------------------------------------------------------------------------
# Effect size, ranking and sentences
# --------------------------------------------------------------------------------------------

def test_cliffs_delta_is_scipys_mann_whitney_u_rescaled():
    rng = np.random.default_rng(2)
    for n, m in ((1, 50), (3, 200), (40, 40)):
        x = rng.integers(0, 6, n).astype(float)               # many ties
        y = rng.integers(0, 6, m).astype(float)
        u = stats.mannwhitneyu(x, y).statistic
        assert D.cliffs_delta(x, y) == pytest.approx(2 * u / (n * m) - 1, abs=1e-12)
    assert D.cliffs_delta([0.0, 0.1], [1.0, 2.0, 3.0]) == -1.0
    assert D.cliffs_delta([np.nan, 5.0], [1.0, np.nan]) == 1.0


def test_characterise_against_a_reference_and_against_the_other_groups_matches_scipy():
    rng = np.random.default_rng(3)
    values = pd.DataFrame({"a": rng.normal(size=80), "b": rng.integers(0, 4, 80).astype(float)})
    values.loc[5, "a"] = np.nan
    groups = rng.choice(["RCC01", "RCC02", "RCC03"], 80)
    reference = pd.DataFrame({"a": rng.normal(size=150), "b": rng.integers(0, 4, 150).astype(float)})
    for ref, name in ((reference, "correct images"), (None, "other error images")):
        table = D.characterise(values, groups, ref, name)
        assert len(table) == 6 and set(table["reference"]) == {name}
        for row in table.itertuples():
            x = values.loc[groups == row.rcc, row.descriptor].dropna()
            y = (ref[row.descriptor] if ref is not None else values.loc[groups != row.rcc, row.descriptor]).dropna()
            u = stats.mannwhitneyu(x, y).statistic
            assert row.delta == pytest.approx(2 * u / (len(x) * len(y)) - 1, abs=1e-12)
            assert row.members == len(x) and row.median == pytest.approx(np.median(x))
            beyond = (y < row.median) if row.delta > 0 else (y > row.median)
            assert row.percentile == pytest.approx(100 * beyond.mean())


def planted_rccs() -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Error images in three RCCs with planted differences from 300 correct images: RCC01 dark,
    RCC02 blurry with relevance in the top-left, RCC03 ordinary."""
    rng = np.random.default_rng(4)
    columns = list(D.IMAGE_DESCRIPTORS)

    def images(n):
        return pd.DataFrame(rng.uniform(0.3, 0.7, (n, len(columns))), columns=columns)

    correct = images(300)
    rccs = np.repeat(["RCC01", "RCC02", "RCC03"], [8, 6, 10])
    errors = images(len(rccs))
    errors.loc[rccs == "RCC01", "brightness"] = rng.uniform(0.05, 0.2, 8)
    errors.loc[rccs == "RCC02", "sharpness"] = rng.uniform(0.0, 0.1, 6)
    relevance = pd.DataFrame(rng.uniform(0.2, 0.4, (len(rccs), len(D.RELEVANCE_DESCRIPTORS))),
                             columns=list(D.RELEVANCE_DESCRIPTORS))
    relevance.loc[rccs == "RCC02", "relevance_top_left"] = rng.uniform(0.6, 0.9, 6)
    relevance.loc[rccs == "RCC02", ["relevance_x", "relevance_y"]] = 0.15
    relevance.loc[rccs == "RCC02", "relevance_half_area"] = 0.04
    return rccs, errors, correct, relevance


def test_the_planted_difference_ranks_first_and_each_family_speaks_once_in_the_first_ranks():
    rccs, errors, correct, relevance = planted_rccs()
    table = D.characterise_rccs(rccs, errors, correct, relevance)
    ranked = {rcc: group.sort_values("rank") for rcc, group in table.groupby("rcc")}
    assert ranked["RCC01"]["descriptor"].iloc[0] == "brightness"
    # RCC02: three planted families; relevance_top_left and relevance_x both have |delta| = 1, and the
    # top-left share moved further (in reference interquartile ranges), so it speaks for the location
    assert set(ranked["RCC02"]["descriptor"].head(3)) == {"sharpness", "relevance_half_area", "relevance_top_left"}
    for rcc, group in ranked.items():
        assert group["family"].head(3).is_unique
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        said = group.loc[group["sentence"] != "", "sentence"]
        assert D.headline(table, rcc) == (said.iloc[0] if len(said) else "")
    assert D.headline(table, "RCC01").startswith("darker than")


def test_the_unclustered_group_is_no_rcc_but_counts_among_the_other_error_images():
    rccs, errors, correct, relevance = planted_rccs()
    rccs = np.where(rccs == "RCC03", "noise", rccs)            # HDBSCAN left RCC03's images unclustered
    table = D.characterise_rccs(rccs, errors, correct, relevance, unclustered="noise")
    assert set(table["rcc"]) == {"RCC01", "RCC02"}
    rows = table.set_index(["rcc", "descriptor"])
    x = relevance.loc[rccs == "RCC01", "relevance_bottom_left"]
    for rcc in ("RCC01", "RCC02"):
        others = relevance.loc[rccs != rcc, "relevance_bottom_left"]                 # the noise included
        assert rows.loc[(rcc, "relevance_bottom_left"), "reference_median"] == pytest.approx(np.median(others))
    y = relevance.loc[rccs != "RCC01", "relevance_bottom_left"]
    u = stats.mannwhitneyu(x, y).statistic
    assert rows.loc[("RCC01", "relevance_bottom_left"), "delta"] == pytest.approx(2 * u / (len(x) * len(y)) - 1)
    without_noise = relevance.loc[rccs == "RCC02", "relevance_bottom_left"]
    assert np.median(without_noise) != pytest.approx(np.median(y))      # the noise does change the reference
    assert rows.loc[("RCC01", "brightness"), "rank"] == 1


SENTENCE = re.compile(r"^(?P<words>.+?) than (?P<share>\d+)% of (?P<reference>correct images|other error images)"
                      r"(?:: half of it in (?P<value2>[\d.]+%) of the image"
                      r"(?:, (?:in the|towards the) (?P<where>[a-z-]+))?)?"
                      r" \((?:(?P<label>.+?) (?P<value>[\d.e-]+[%°]?); )?"
                      r"(?P=reference):? (?P<reference_value>[\d.e-]+[%°]?)\)$")


def test_every_sentence_says_what_its_numbers_say():
    rccs, errors, correct, relevance = planted_rccs()
    table = D.characterise_rccs(rccs, errors, correct, relevance)
    said = table[table["sentence"] != ""]
    assert len(said) >= 3
    for row in said.itertuples():
        match = SENTENCE.match(row.sentence)
        assert match, row.sentence
        words = D.WORDS[row.descriptor]
        assert match["words"] == (words.higher if row.delta > 0 else words.lower)
        # the share: the reference beyond the RCC's median member, recomputed from the raw values, rounded down
        members = (errors if row.reference == "correct images" else relevance)[row.descriptor][rccs == row.rcc]
        reference = correct[row.descriptor] if row.reference == "correct images" else \
            relevance[row.descriptor][rccs != row.rcc]
        median = float(np.median(members))
        beyond = (reference < median) if row.delta > 0 else (reference > median)
        assert int(match["share"]) == math.floor(100 * beyond.mean())
        assert int(match["share"]) >= 75 and abs(row.delta) >= D.LARGE_EFFECT and row.rank <= 3
        shown = match["value"] or match["value2"]
        assert shown == words.value(median)
        assert match["reference_value"] == words.value(float(np.median(reference)))
        if match["where"]:
            centre = table[(table.rcc == row.rcc)].set_index("descriptor")["median"]
            assert match["where"] == D.cell_name(centre["relevance_x"], centre["relevance_y"])
    dark = said[(said.rcc == "RCC01") & (said.descriptor == "brightness")].sentence.iloc[0]
    assert dark.startswith("darker than 100% of correct images")


@pytest.mark.parametrize("x, y, cell", [(0.1, 0.1, "top-left"), (0.5, 0.5, "centre"), (0.9, 0.5, "right"),
                                        (0.5, 0.99, "bottom"), (1.0, 1.0, "bottom-right")])
def test_cell_names(x, y, cell):
    assert D.cell_name(x, y) == cell
