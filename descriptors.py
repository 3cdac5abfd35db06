"""What is unusual about a root-cause cluster's images, and where the model looked: descriptors
computed from the images and the input-level relevance alone (no metadata), and their statistics.

Arrays in, arrays or tables out; no files (the test step writes the image descriptors, the cluster
step the relevance descriptors and the characterisation).

- `image_descriptors`: per image (as the model sees it: resized, values in [0, 1]) brightness,
  contrast, saturation, dominant hue and the share of each hue, sharpness, noise, edge density, the
  dominant edge orientation and how oblique the edges are, the share of the image taken by the
  estimated object (`object_masks`) and how tilted the object's outline is.
- `relevance_descriptors`: per error image, where its positive input relevance lies (centre of mass,
  share in each cell of a 3x3 grid), how concentrated it is (the smallest share of the image holding
  half of it) and the share of it outside the estimated object.
- `cliffs_delta`, `characterise`: per RCC, the descriptors whose distribution differs most from a
  reference group (Cliff's delta, a rank-based effect size), each with a plain-words sentence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

# --------------------------------------------------------------------------------------------
# Image descriptors
# --------------------------------------------------------------------------------------------

HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")   # 60-degree sectors centred on 0, 60, ... 300
COLOURED_SATURATION = 0.25      # a pixel has a hue when its HSV saturation and value reach these
COLOURED_VALUE = 0.2
EDGE_THRESHOLD = 0.1            # an edge: luma changing by more than 0.1 of full range per pixel (Sobel)
LUMA = np.array([0.299, 0.587, 0.114])      # ITU-R BT.601
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 8.0
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)

IMAGE_DESCRIPTORS = ("brightness", "contrast", "saturation", *(f"hue_{h}" for h in HUES), "sharpness", "noise",
                     "edge_density", "edge_obliqueness", "object_share", "object_tilt")
IMAGE_COLUMNS = ("brightness", "contrast", "saturation", "dominant_hue", *(f"hue_{h}" for h in HUES), "sharpness",
                 "noise", "edge_density", "edge_orientation", "edge_obliqueness", "object_share", "object_tilt")


def _filter(planes: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlates every (H, W) plane of a (B, H, W) stack with a 2-D kernel (never across images)."""
    return ndimage.correlate(planes, kernel[None], mode="nearest")


def luma(rgb: np.ndarray) -> np.ndarray:
    """(B, H, W, C) in [0, 1] -> (B, H, W) luma (C = 1: the grey values)."""
    return rgb[..., 0] if rgb.shape[-1] == 1 else rgb @ LUMA


def gradients(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel derivatives (change per pixel) along x (right) and y (up) of a (B, H, W) stack."""
    return _filter(grey, SOBEL_X), -_filter(grey, SOBEL_X.T)


def image_descriptors(rgb: np.ndarray, objects: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per image of a (B, H, W, C) stack with values in [0, 1] (C = 3 RGB or 1 grey), columns
    IMAGE_COLUMNS; the colour descriptors are NaN for grey images. The edge orientation descriptors
    look at the edges of the object region and its outline where one is estimated (a tilted object
    among upright background edges), and the hue descriptors at the object region's pixels (an object
    of unusual colour in an ordinary scene), else both at the whole image. `objects`: the images'
    object masks and whether each was estimated (`object_masks`), computed here when not given."""
    grey = luma(rgb)
    gx, gy = gradients(grey)
    magnitude = np.hypot(gx, gy)
    degrees = np.degrees(np.arctan2(gy, gx))   # the gradient's direction, shared by two descriptors
    edges = magnitude > EDGE_THRESHOLD
    masks, valid = objects if objects is not None else object_masks(rgb)
    region = np.where(valid[:, None, None], ndimage.binary_dilation(masks, _PLANE), True)   # with its outline
    table = pd.DataFrame({
        "brightness": grey.mean(axis=(1, 2)),
        "contrast": grey.std(axis=(1, 2)),
        "sharpness": _interior(_filter(grey, LAPLACIAN)).var(axis=(1, 2)),
        "noise": noise_sigma(grey, edges),
        "edge_density": _interior(edges & ridge(degrees, magnitude)).mean(axis=(1, 2)),
        "edge_orientation": dominant_orientation(gx * region, gy * region),
        "edge_obliqueness": edge_obliqueness(degrees, magnitude, edges & region),
        "object_share": np.where(valid, masks.mean(axis=(1, 2)), np.nan),
        "object_tilt": np.where(valid, object_tilt(masks), np.nan),
    })
    objects_only = np.where(valid[:, None, None], masks, True)
    return pd.concat([table, colour_descriptors(rgb, objects_only)], axis=1)[list(IMAGE_COLUMNS)]


def _interior(planes: np.ndarray) -> np.ndarray:
    return planes[:, 1:-1, 1:-1] if min(planes.shape[1:]) > 2 else planes


def colour_descriptors(rgb: np.ndarray, region: np.ndarray | None = None) -> pd.DataFrame:
    """Mean HSV saturation of the image; the dominant hue (degrees; NaN without coloured pixels) and
    the share of the pixels coloured with each of the six hues, both over `region` ((B, H, W) masks,
    none empty; default the whole image). PIL's HSV, 8 bits a channel."""
    columns = ["saturation", "dominant_hue", *(f"hue_{h}" for h in HUES)]
    if rgb.shape[-1] != 3:
        return pd.DataFrame(np.nan, index=range(len(rgb)), columns=columns)
    levels = np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    hsv = np.stack([np.asarray(Image.fromarray(image).convert("HSV")) for image in levels]).astype(np.float64)
    hue, saturation, value = hsv[..., 0] * (360.0 / 256.0), hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    region = np.ones(hue.shape, dtype=bool) if region is None else region
    coloured = (saturation >= COLOURED_SATURATION) & (value >= COLOURED_VALUE) & region
    sector = np.floor(np.mod(hue + 30.0, 360.0) / 60.0).astype(np.int64)
    table = pd.DataFrame({"saturation": saturation.mean(axis=(1, 2)),
                          "dominant_hue": dominant_hue(hue, np.where(coloured, saturation * value, 0.0))})
    area = region.sum(axis=(1, 2))
    for number, name in enumerate(HUES):
        table[f"hue_{name}"] = (coloured & (sector == number)).sum(axis=(1, 2)) / area
    return table


def dominant_hue(hue: np.ndarray, weight: np.ndarray, bins: int = 36) -> np.ndarray:
    """Per image, the centre (degrees) of the fullest bin of a weighted hue histogram, circularly
    smoothed over neighbouring bins; NaN where every weight is zero."""
    count = len(hue)
    index = np.minimum((hue / 360.0 * bins).astype(np.int64), bins - 1).reshape(count, -1)
    index += bins * np.arange(count)[:, None]
    histogram = np.bincount(index.ravel(), weights=weight.ravel(), minlength=count * bins).reshape(count, bins)
    smooth = histogram + 0.5 * (np.roll(histogram, 1, axis=1) + np.roll(histogram, -1, axis=1))
    centre = (smooth.argmax(axis=1) + 0.5) * 360.0 / bins
    return np.where(histogram.sum(axis=1) > 0, centre, np.nan)


def ridge(degrees: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Where the gradient magnitude is a maximum across the edge (non-maximum suppression, as in
    Canny's detector: the neighbours along the gradient direction, rounded to 45 degrees, are not
    larger), so an edge counts once along its length however blurred it is. `degrees`: the gradient's
    direction (arctan2(gy, gx) in degrees)."""
    angle = np.mod(degrees, 180.0)
    sector = np.floor((angle + 22.5) / 45.0).astype(np.int64) % 4      # 0: along x, 1: diagonal /, 2: y, 3: \
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = magnitude.shape[1:]
    keep = np.zeros(magnitude.shape, dtype=bool)
    # (row, column) steps of the neighbour along the gradient; y points up, rows down
    for number, (dr, dc) in enumerate(((0, 1), (-1, 1), (-1, 0), (-1, -1))):
        ahead = padded[:, 1 + dr:1 + dr + height, 1 + dc:1 + dc + width]
        behind = padded[:, 1 - dr:1 - dr + height, 1 - dc:1 - dc + width]
        keep |= (sector == number) & (magnitude >= ahead) & (magnitude > behind)   # ties: one pixel
    return keep


def noise_sigma(grey: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Standard deviation of the image's noise (luma units), by Immerkaer's estimator (J. Immerkaer,
    'Fast noise variance estimation', CVIU 64(2), 1996) over the pixels that are not edges, where
    the image's own structure adds least to it."""
    response = np.abs(_interior(_filter(grey, IMMERKAER)))
    flat = ~_interior(edges)
    counts = flat.sum(axis=(1, 2))
    total = np.where(counts > 0, (response * flat).sum(axis=(1, 2)), response.sum(axis=(1, 2)))
    counts = np.where(counts > 0, counts, response[0].size)
    return math.sqrt(math.pi / 2) / 6.0 * total / counts


def dominant_orientation(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Per image, the dominant orientation of its edge lines (degrees in [0, 180), counter-clockwise
    from horizontal), from the image's structure tensor; the gradient is perpendicular to the edge."""
    jxx, jyy, jxy = (gx * gx).sum(axis=(1, 2)), (gy * gy).sum(axis=(1, 2)), (gx * gy).sum(axis=(1, 2))
    gradient_angle = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
    return np.mod(gradient_angle + 90.0, 180.0)


def edge_obliqueness(degrees: np.ndarray, magnitude: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per image, the mean angle (degrees, 0-45) between its edges and the nearest image axis,
    weighted by edge strength: 0 for horizontal and vertical edges, 45 for diagonal ones; NaN
    without edges. `degrees`, `magnitude`: the gradient's direction and size."""
    angle = np.mod(degrees, 90.0)
    off_axis = np.minimum(angle, 90.0 - angle)
    weight = np.where(edges, magnitude, 0.0)
    total = weight.sum(axis=(1, 2))
    return np.where(total > 0, (off_axis * weight).sum(axis=(1, 2)) / np.where(total > 0, total, 1), np.nan)


# --------------------------------------------------------------------------------------------
# The object region
# --------------------------------------------------------------------------------------------

BORDER = 0.08           # share of the image's side taken as the background band
MIN_OBJECT, MAX_OBJECT = 0.02, 0.9


WORKING_SIDE = 48      # masks are estimated on images shrunk to at most about this many pixels a side


def object_masks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) masks of the estimated object and, per image, whether one could be estimated.

    The object is what differs from the image's border: each pixel's colour distance (after a
    slight blur) to the nearest colour of the border band (sampled every other pixel), thresholded by
    Otsu's method; the largest connected region, holes filled. No object where that region covers
    under 2% or over 90% of the image. Large images are shrunk by block averaging first and the
    masks enlarged back."""
    count, height, width = rgb.shape[:3]
    factor = max(1, math.ceil(max(height, width) / WORKING_SIDE))
    smooth = ndimage.gaussian_filter(_shrink(rgb.astype(np.float32), factor), sigma=(0, 1, 1, 0))
    h, w = smooth.shape[1:3]
    band = max(1, int(round(BORDER * min(h, w))))
    border = np.ones((h, w), dtype=bool)
    border[band:-band, band:-band] = False
    border[1::2, :] = border[:, 1::2] = False
    pixels = smooth.reshape(count, h * w, -1)
    distance = np.concatenate([_border_distance(pixels[s:s + 8], border.ravel()) for s in range(0, count, 8)])
    cut = np.maximum(otsu_thresholds(distance), 0.05)
    masks = largest_regions((distance > cut[:, None]).reshape(count, h, w))
    share = masks.mean(axis=(1, 2))
    return _enlarge(masks, factor, height, width), (share >= MIN_OBJECT) & (share <= MAX_OBJECT)


def _border_distance(pixels: np.ndarray, border: np.ndarray) -> np.ndarray:
    """(b, P, C) colours -> (b, P) distance of each to the nearest colour of its image's border
    pixels (a few images at a time: the (b, P, border) block stays small)."""
    edge = pixels[:, border]
    squared = np.zeros((len(pixels), pixels.shape[1], edge.shape[1]), dtype=np.float32)
    for channel in range(pixels.shape[2]):
        difference = pixels[:, :, None, channel] - edge[:, None, :, channel]
        squared += difference * difference
    return np.sqrt(squared.min(axis=2)).astype(np.float64)


def _shrink(images: np.ndarray, factor: int) -> np.ndarray:
    """Block means of factor x factor pixels (the last partial rows and columns dropped)."""
    if factor == 1:
        return images
    count, height, width, channels = images.shape
    h, w = height // factor, width // factor
    return images[:, :h * factor, :w * factor].reshape(count, h, factor, w, factor, channels).mean(axis=(2, 4))


def _enlarge(masks: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """Masks of shrunk images back at (height, width), the dropped edge repeating its neighbour."""
    if factor == 1:
        return masks
    big = masks.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.pad(big, ((0, 0), (0, height - big.shape[1]), (0, width - big.shape[2])), mode="edge")


ROUND = 0.85       # an object whose minor axis is at least this share of its major axis has no tilt


def object_tilt(masks: np.ndarray) -> np.ndarray:
    """Per (H, W) mask, the angle (degrees, 0-45) between the region's long axis and the nearest
    image axis, from its second moments; 0 for a nearly round region (minor/major axis ratio above
    ROUND), whose long axis means nothing."""
    height, width = masks.shape[1:]
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    weight = masks.astype(np.float64)
    area = np.maximum(weight.sum(axis=(1, 2)), 1.0)
    dx = cols - ((weight * cols).sum(axis=(1, 2)) / area)[:, None, None]
    dy = -(rows - ((weight * rows).sum(axis=(1, 2)) / area)[:, None, None])       # y up
    mxx, myy, mxy = ((weight * a * b).sum(axis=(1, 2)) / area for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    spread = np.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    major, minor = (mxx + myy) / 2 + spread, np.maximum((mxx + myy) / 2 - spread, 0.0)
    angle = np.mod(0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy)), 90.0)
    tilt = np.minimum(angle, 90.0 - angle)
    return np.where(np.sqrt(minor / np.maximum(major, 1e-12)) < ROUND, tilt, 0.0)


def otsu_thresholds(values: np.ndarray, bins: int = 64) -> np.ndarray:
    """Per row of `values`, Otsu's threshold: the cut of the row's histogram (`bins` equal bins over
    its range) that maximises the between-class variance."""
    low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    width = np.where(high > low, (high - low) / bins, 1.0)
    index = np.minimum(((values - low) / width).astype(np.int64), bins - 1)
    rows = len(values)
    counts = np.bincount((index + bins * np.arange(rows)[:, None]).ravel(), minlength=rows * bins).reshape(rows, bins)
    centres = low + (np.arange(bins) + 0.5) * width
    weight, mass = np.cumsum(counts, axis=1), np.cumsum(counts * centres, axis=1)
    below, above = weight[:, :-1], weight[:, -1:] - weight[:, :-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass[:, :-1] / below - (mass[:, -1:] - mass[:, :-1]) / above) ** 2
    best = np.argmax(np.where(np.isfinite(between), between, -1.0), axis=1)
    return (low[:, 0] + (best + 1) * width[:, 0])


# Connectivity inside each (H, W) plane of a stack, never between planes.
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def largest_regions(masks: np.ndarray) -> np.ndarray:
    """Per (H, W) plane of a boolean stack, its largest connected region with holes filled."""
    labels, count = ndimage.label(masks, structure=_PLANE)
    if count == 0:
        return masks.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    plane_of = np.zeros(count + 1, dtype=np.int64)
    plane_of[labels.ravel()] = np.repeat(np.arange(len(masks)), masks[0].size)
    best = np.zeros(len(masks), dtype=np.int64)
    order = np.argsort(sizes, kind="stable")          # the largest label of each plane is written last
    best[plane_of[order[sizes[order] > 0]]] = order[sizes[order] > 0]
    keep = np.zeros(count + 1, dtype=bool)
    keep[best[best > 0]] = True
    return ndimage.binary_fill_holes(keep[labels], structure=_PLANE)


# --------------------------------------------------------------------------------------------
# Relevance descriptors
# --------------------------------------------------------------------------------------------

GRID = ("top_left", "top", "top_right", "left", "centre", "right", "bottom_left", "bottom", "bottom_right")
RELEVANCE_DESCRIPTORS = ("relevance_x", "relevance_y", *(f"relevance_{c}" for c in GRID), "relevance_half_area",
                         "relevance_outside_object")


def relevance_descriptors(relevance: np.ndarray, masks: np.ndarray | None = None,
                          valid: np.ndarray | None = None) -> pd.DataFrame:
    """One row per image of (B, [C,] H, W) input relevance (channels summed): where its positive part
    lies (centre of mass as shares of the width from the left and of the height from the top; share
    in each cell of a 3x3 grid), the smallest share of the image area holding half of it, and the
    share of it outside the object (`masks`, where `valid`). NaN where an image has no positive
    relevance."""
    heat = relevance.sum(axis=1) if relevance.ndim == 4 else relevance
    positive = np.maximum(heat.astype(np.float64), 0.0)
    count, height, width = positive.shape
    total = positive.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    rows, cols = np.arange(height) + 0.5, np.arange(width) + 0.5
    table = {"relevance_x": (positive.sum(axis=1) @ cols) / safe / width,
             "relevance_y": (positive.sum(axis=2) @ rows) / safe / height}
    row_cut = np.round(np.array([0, height / 3, 2 * height / 3, height])).astype(int)
    col_cut = np.round(np.array([0, width / 3, 2 * width / 3, width])).astype(int)
    for number, name in enumerate(GRID):
        r, c = divmod(number, 3)
        table[f"relevance_{name}"] = positive[:, row_cut[r]:row_cut[r + 1], col_cut[c]:col_cut[c + 1]].sum(
            axis=(1, 2)) / safe
    table["relevance_half_area"] = half_mass_area(positive)
    if masks is not None:
        outside = (positive * ~masks).sum(axis=(1, 2)) / safe
        table["relevance_outside_object"] = np.where(valid if valid is not None else True, outside, np.nan)
    else:
        table["relevance_outside_object"] = np.nan
    frame = pd.DataFrame(table)
    frame.loc[total <= 0, :] = np.nan
    return frame


def half_mass_area(positive: np.ndarray) -> np.ndarray:
    """Per (H, W) map of non-negative values, the smallest share of its pixels holding half its sum."""
    flat = -np.sort(-positive.reshape(len(positive), -1), axis=1)
    cumulative = np.cumsum(flat, axis=1)
    needed = (cumulative < 0.5 * cumulative[:, -1:]).sum(axis=1) + 1
    return needed / flat.shape[1]


# --------------------------------------------------------------------------------------------
# Characterisation: the descriptors that set an RCC apart, in plain words
# --------------------------------------------------------------------------------------------

LARGE_EFFECT = 0.474        # |Cliff's delta| from which a difference is "large" (Romano et al., 2006)
SENTENCES_PER_RCC = 3


def cliffs_delta(sample: np.ndarray, reference: np.ndarray) -> float:
    """Cliff's delta, P(X > Y) - P(X < Y) for X drawn from `sample` and Y from `reference` (NaNs
    left out): -1 when every sample value lies below every reference value, 0 when the two mix
    evenly, +1 when all lie above. Equals 2U / (n m) - 1 for the Mann-Whitney U of the sample."""
    x = np.asarray(sample, dtype=np.float64)
    y = np.sort(np.asarray(reference, dtype=np.float64))
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if not len(x) or not len(y):
        return float("nan")
    below = np.searchsorted(y, x, side="left").sum()           # pairs with the reference value below
    above = (len(y) - np.searchsorted(y, x, side="right")).sum()
    return float((below - above) / (len(x) * len(y)))


@dataclass(frozen=True)
class Words:
    """How a descriptor is said: what it measures, the words for higher and lower, and its unit."""

    label: str
    higher: str
    lower: str
    unit: str = ""                  # "%": a share, shown in percent; "°": degrees

    def value(self, number: float) -> str:
        if self.unit == "%":
            return f"{100 * number:.0f}%" if abs(number) >= 0.01 or number == 0 else f"{100 * number:.1f}%"
        if self.unit == "°":
            return f"{number:.0f}°"
        return f"{number:.2g}" if abs(number) < 0.1 else f"{number:.2f}"


WORDS = {
    "brightness": Words("brightness", "brighter", "darker"),
    "contrast": Words("contrast", "higher in contrast", "lower in contrast"),
    "saturation": Words("saturation", "more saturated", "less saturated"),
    **{f"hue_{h}": Words(f"{h} pixels", f"more {h}", f"less {h}", "%") for h in HUES},
    "sharpness": Words("sharpness", "sharper", "blurrier"),
    "noise": Words("noise", "noisier", "less noisy"),
    "edge_density": Words("edge pixels", "with more edges", "with fewer edges", "%"),
    "edge_obliqueness": Words("edge angle to the image axes", "with more oblique edges",
                              "with edges closer to horizontal and vertical", "°"),
    "object_share": Words("object region", "with a larger object region", "with a smaller object region", "%"),
    "object_tilt": Words("object's long axis off the image axes", "with a more tilted object",
                         "with a less tilted object", "°"),
    "relevance_x": Words("relevance centre from the left", "relevance further right", "relevance further left", "%"),
    "relevance_y": Words("relevance centre from the top", "relevance lower in the image",
                         "relevance higher in the image", "%"),
    **{f"relevance_{c}": Words("relevance there",
                               f"more relevance in the {c.replace('_', '-')} ninth of the image",
                               f"less relevance in the {c.replace('_', '-')} ninth of the image", "%") for c in GRID},
    "relevance_half_area": Words("area holding half the relevance", "relevance more spread out",
                                 "relevance more concentrated", "%"),
    "relevance_outside_object": Words("relevance outside the object", "more relevance outside the object",
                                      "more relevance on the object", "%"),
}



COLUMNS = ["rcc", "descriptor", "reference", "members", "delta", "median", "reference_median", "reference_iqr",
           "percentile"]


def characterise(values: pd.DataFrame, groups, reference: pd.DataFrame | None, reference_name: str) -> pd.DataFrame:
    """Per group (RCC) and descriptor (a column of `values`, one row per member image): Cliff's delta
    of the members against the reference group; the members' median; the reference's median and
    interquartile range; and `percentile`, the share (%) of the reference strictly below the members'
    median when delta > 0, strictly above it otherwise. `reference` None: each group against the
    rows of `values` outside it. NaNs are left out; a group or reference left empty gives no row."""
    codes, names = pd.factorize(np.asarray(groups))
    frames = []
    for descriptor in values.columns:
        x = values[descriptor].to_numpy(dtype=np.float64)
        present = ~np.isnan(x)
        if reference is None:
            frames.append(_against_the_rest(x[present], codes[present], len(names)))
        else:
            ref = reference[descriptor].to_numpy(dtype=np.float64)
            frames.append(_against(x[present], codes[present], len(names), np.sort(ref[~np.isnan(ref)])))
        frames[-1].insert(0, "descriptor", descriptor)
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "rcc", np.asarray(names, dtype=object)[table.pop("group").to_numpy()])
    table.insert(2, "reference", reference_name)
    return table.dropna(subset=["delta"])[COLUMNS].reset_index(drop=True)


def _net_pairs(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Per value of x, the number of pool values below it minus the number above it (pool sorted)."""
    return np.searchsorted(pool, x, side="left") - (len(pool) - np.searchsorted(pool, x, side="right"))


def _against(x: np.ndarray, codes: np.ndarray, groups: int, ref: np.ndarray) -> pd.DataFrame:
    """characterise() for one descriptor against a fixed, sorted reference."""
    members = np.bincount(codes, minlength=groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.bincount(codes, weights=_net_pairs(x, ref), minlength=groups) / (members * len(ref))
    medians = np.array([np.median(x[codes == g]) if members[g] else np.nan for g in range(groups)])
    quartiles = np.percentile(ref, [25, 50, 75]) if len(ref) else np.full(3, np.nan)
    below = np.searchsorted(ref, medians, side="left")
    above = len(ref) - np.searchsorted(ref, medians, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        percentile = 100.0 * np.where(delta > 0, below, above) / len(ref)
    return pd.DataFrame({"group": np.arange(groups), "members": members, "delta": delta, "median": medians,
                         "reference_median": quartiles[1], "reference_iqr": quartiles[2] - quartiles[0],
                         "percentile": percentile})


def _against_the_rest(x: np.ndarray, codes: np.ndarray, groups: int) -> pd.DataFrame:
    """characterise() for one descriptor, each group against the values outside it. Within a group
    the pairs cancel (each counts once as below and once as above), so the net count of a member
    against the rest equals its net count against every value."""
    members = np.bincount(codes, minlength=groups)
    rest = len(x) - members
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.bincount(codes, weights=_net_pairs(x, np.sort(x)), minlength=groups) / (members * rest)
    rows = []
    for group in range(groups):
        own, others = x[codes == group], x[codes != group]
        if not len(own) or not len(others):
            rows.append((np.nan, np.nan, np.nan, np.nan))
            continue
        median = float(np.median(own))
        q1, q2, q3 = np.percentile(others, [25, 50, 75])
        beyond = (others < median) if delta[group] > 0 else (others > median)
        rows.append((median, q2, q3 - q1, 100.0 * beyond.mean()))
    stats = np.array(rows, dtype=np.float64).reshape(groups, 4)
    return pd.DataFrame({"group": np.arange(groups), "members": members, "delta": delta, "median": stats[:, 0],
                         "reference_median": stats[:, 1], "reference_iqr": stats[:, 2], "percentile": stats[:, 3]})


def family(descriptor: str) -> str:
    """Descriptors that say one thing in several ways share a family: the hue shares ("hue"), the
    edges' and the object's tilt ("orientation"), and the relevance's centre and grid cells
    ("relevance location"); every other descriptor is its own."""
    if descriptor.startswith("hue_"):
        return "hue"
    if descriptor in ("edge_obliqueness", "object_tilt"):
        return "orientation"
    if descriptor in ("relevance_x", "relevance_y") or descriptor[len("relevance_"):] in GRID:
        return "relevance location"
    return descriptor


def rank_descriptors(table: pd.DataFrame) -> pd.DataFrame:
    """Ranks each RCC's descriptors (1 = differs most) by |Cliff's delta|, ties broken by the
    distance between the medians in reference interquartile ranges, with the strongest descriptor
    of each family first (so the first ranks name different things: not three ways of saying
    "relevance on the left"); writes a sentence for those of the first SENTENCES_PER_RCC that say
    much (`says_much`)."""
    table = table.copy()
    spread = table["reference_iqr"].where(table["reference_iqr"] > 0, np.nan)
    table["shift"] = ((table["median"] - table["reference_median"]) / spread).abs().fillna(0.0)
    table["strength"] = table["delta"].abs()
    table = table.sort_values(["rcc", "strength", "shift"], ascending=[True, False, False], kind="stable")
    table["family"] = table["descriptor"].map(family)
    table["repeat"] = table.groupby(["rcc", "family"]).cumcount() > 0
    table = table.sort_values(["rcc", "repeat", "strength", "shift"], ascending=[True, True, False, False],
                              kind="stable")
    table["rank"] = table.groupby("rcc").cumcount() + 1
    where = _relevance_centres(table)
    table["sentence"] = [sentence(row, where.get(row.rcc, "")) if row.rank <= SENTENCES_PER_RCC and says_much(row)
                         else "" for row in table.itertuples()]
    return table.drop(columns=["shift", "strength", "repeat"]).reset_index(drop=True)


def says_much(row) -> bool:
    """Worth a sentence: a large effect, and the RCC's median member beyond three quarters of the
    reference (a share that is zero for most images can move delta while the median stays at zero)."""
    return abs(row.delta) >= LARGE_EFFECT and row.percentile >= 75.0


def _relevance_centres(table: pd.DataFrame) -> dict:
    """Per RCC, the 3x3 cell (e.g. "top-left") of its members' median relevance centre."""
    centre = table[table["descriptor"].isin(["relevance_x", "relevance_y"])].pivot(
        index="rcc", columns="descriptor", values="median")
    if centre.shape[1] < 2:
        return {}
    return {rcc: cell_name(row["relevance_x"], row["relevance_y"]) for rcc, row in centre.iterrows()}


def cell_name(x: float, y: float) -> str:
    """The 3x3 cell of a point given as shares of the width (from the left) and height (from the top)."""
    column, row = min(int(x * 3), 2), min(int(y * 3), 2)
    return GRID[3 * row + column].replace("_", "-")


def sentence(row, where: str = "") -> str:
    """A plain-words line for one RCC and descriptor, e.g. "darker than 95% of correct images
    (brightness 0.12; correct images 0.45)". The percentage is the share of the reference beyond the
    RCC's median member, rounded down."""
    words = WORDS.get(row.descriptor, Words(row.descriptor, f"higher {row.descriptor}", f"lower {row.descriptor}"))
    share = math.floor(row.percentile)
    comparison = f"{words.higher if row.delta > 0 else words.lower} than {share}% of {row.reference}"
    if row.descriptor == "relevance_half_area" and row.delta < 0:
        place = "" if not where else ", in the centre" if where == "centre" else f", towards the {where}"
        return (f"{comparison}: half of it in {words.value(row.median)} of the image{place} "
                f"({row.reference}: {words.value(row.reference_median)})")
    numbers = f"{words.label} {words.value(row.median)}; {row.reference} {words.value(row.reference_median)}"
    return f"{comparison} ({numbers})"


def characterise_rccs(rccs, images: pd.DataFrame, correct: pd.DataFrame, relevance: pd.DataFrame,
                      unclustered: str | None = None) -> pd.DataFrame:
    """The ranked characterisation of every RCC (`rank_descriptors`): its members' image descriptors
    (`images`, one row per error image, aligned with `rccs`) against the correct test images'
    (`correct`), and their relevance descriptors (`relevance`, aligned too) against the other error
    images' (the correct images have no relevance). The `unclustered` group (HDBSCAN's noise) is no
    RCC: it gets no rows, but its images count among the other error images."""
    ranked = [c for c in IMAGE_DESCRIPTORS if c in images.columns]
    table = pd.concat([characterise(images[ranked].reset_index(drop=True), rccs, correct[ranked], "correct images"),
                       characterise(relevance[list(RELEVANCE_DESCRIPTORS)].reset_index(drop=True), rccs, None,
                                    "other error images")], ignore_index=True)
    return rank_descriptors(table[table["rcc"] != unclustered].reset_index(drop=True))


def headline(table: pd.DataFrame, rcc: str) -> str:
    """The RCC's first sentence ("" when no descriptor says much): a short line for a summary."""
    lines = table.loc[(table["rcc"] == rcc) & (table["sentence"] != ""), "sentence"]
    return str(lines.iloc[0]) if len(lines) else ""
