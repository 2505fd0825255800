"""A detector for the new concepts of `hart.data.concepts`: does an image show a `colour` star (or ring)?

Pixels are labelled with their nearest colour among the world's (palette and grey) and the concept's
colour, as ShapesEval does, after the same median filter; the pixels off the background (the most
common colour on the border) are opened and split into objects of at least `MIN_AREA` pixels, and an
object counts when at least `COLOUR_SHARE` of it has the concept's colour (a ring with a short
stretch of another colour is still one ring). A component is a **ring** when the pixels it
encloses (not reachable from outside its bounding box) are at least `RING_HOLE` of its filled area;
a **star** when it has no such hole and its outline has five points spread around it (peaks of the
distance from its centroid to its edge, by angle: a star has five, evenly spaced; a triangle three,
a square four, a circle none; a lumpy blob's bumps bunch together).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from hart.data.shapes import BACKGROUNDS, IMAGE_SIZE
from hart.eval.shapes_eval import (BORDER, COLOUR_TOLERANCE, MIN_AREA, ImageLike, _neighbourhood, _to_rgb,
                                   connected_components)

RING_HOLE = 0.12  # enclosed share of the filled area that makes a ring
STAR_POINTS = 5  # points (outward peaks of the outline) that make a star
POINT_PROMINENCE = 0.06  # how far a point stands out, as a share of the mean radius
ANGLE_BINS = 72  # 5 degree sectors of the outline
MAX_ASPECT = 1.6  # bounding boxes more elongated than this are no concept object
COLOUR_SHARE = 0.7  # least share of an object's pixels in the concept's colour
BACKGROUND_MARGIN = 40.0  # RGB distance from the background colour that makes a pixel part of an object


def _outline_radii(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Distance from the centroid to the farthest pixel corner in each angular sector, lightly smoothed."""
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    px = np.concatenate([xs + dx for dx in (0, 1) for _ in (0, 1)])
    py = np.concatenate([ys + dy for _ in (0, 1) for dy in (0, 1)])
    sector = ((np.arctan2(py - cy, px - cx) + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    radii = np.zeros(ANGLE_BINS)
    np.maximum.at(radii, sector, np.hypot(px - cx, py - cy))
    for i in np.flatnonzero(radii == 0):  # a sector without a corner (tiny objects)
        radii[i] = max(radii[i - 1], radii[(i + 1) % ANGLE_BINS])
    kernel = np.array([1, 2, 3, 2, 1], dtype=np.float64) / 9
    return np.convolve(np.concatenate([radii[-2:], radii, radii[:2]]), kernel, "valid")


def has_star_points(xs: np.ndarray, ys: np.ndarray) -> bool:
    """True when the outline has `STAR_POINTS` points spread around it like a star's: peaks of the
    radius standing out by `POINT_PROMINENCE` from the lowest radius within a fifth of a turn on both
    sides, the strongest five no closer than half and no farther than one and a half fifths of a turn
    from their neighbours (a triangle has three points, a square four, a circle none; a lumpy blob's
    bumps bunch together)."""
    radii = _outline_radii(xs, ys)
    n, reach, least = len(radii), len(radii) // 5, POINT_PROMINENCE * radii.mean()
    peaks = []  # (prominence, sector)
    for i in range(n):
        if radii[i] >= radii[i - 1] and radii[i] > radii[(i + 1) % n]:
            left = min(radii[(i - j) % n] for j in range(1, reach + 1))
            right = min(radii[(i + j) % n] for j in range(1, reach + 1))
            if radii[i] - max(left, right) >= least:
                peaks.append((radii[i] - max(left, right), i))
    if len(peaks) < STAR_POINTS:
        return False
    sectors = sorted(i for _, i in sorted(peaks, reverse=True)[:STAR_POINTS])
    gaps = np.diff(sectors + [sectors[0] + n])
    return bool(gaps.min() >= reach / 2 and gaps.max() <= reach * 1.5)


def _enclosed(mask: np.ndarray) -> int:
    """Pixels of the box not in `mask` and not connected to the box's border around it."""
    outside = np.pad(~mask, 1, constant_values=True)  # a free frame around the box
    labels, _ = connected_components(outside)
    reachable = labels == labels[0, 0]
    return int(np.count_nonzero(outside & ~reachable))


def classify(mask: np.ndarray) -> str:
    """"ring", "star" or "other" for one component's mask cut to its bounding box."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "other"
    area = int(mask.sum())
    hole = _enclosed(mask)
    if hole >= RING_HOLE * (area + hole):
        return "ring"
    ys, xs = np.nonzero(mask)
    return "star" if has_star_points(xs, ys) else "other"


def find_concepts(image: ImageLike, rgb: Sequence[int]) -> List[str]:
    """The kinds ("ring", "star", "other") of the objects of colour `rgb` in the image: objects (pixels
    that stand out from the background) of which at least `COLOUR_SHARE` have that colour, so that a
    ring with a stretch of another colour stays one object."""
    colours = [tuple(c) for c in BACKGROUNDS.values()]
    if tuple(rgb) not in colours:
        colours.append(tuple(rgb))
    target = colours.index(tuple(rgb))
    palette = np.array(colours, dtype=np.float32)
    pixels = _to_rgb(image).reshape(-1, 3)
    dist2 = (pixels * pixels).sum(1, keepdims=True) - 2 * pixels @ palette.T + (palette * palette).sum(1)
    nearest = dist2.argmin(1).reshape(IMAGE_SIZE, IMAGE_SIZE)
    close = (dist2.min(1) <= COLOUR_TOLERANCE ** 2).reshape(IMAGE_SIZE, IMAGE_SIZE)
    coloured = (nearest == target) & close
    if coloured.sum() < MIN_AREA:
        return []
    border = np.ones(nearest.shape, bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.bincount(nearest[border], minlength=len(colours)).argmax()
    off_background = dist2[:, background].reshape(IMAGE_SIZE, IMAGE_SIZE) > BACKGROUND_MARGIN ** 2
    objects = _neighbourhood(_neighbourhood(off_background, np.logical_and), np.logical_or)
    labels, n = connected_components(objects)
    kinds = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(xs) >= MIN_AREA and coloured[ys, xs].mean() >= COLOUR_SHARE:
            kinds.append(classify(labels[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == k))
    return kinds


def shows_concept(image: ImageLike, shape: str, rgb: Sequence[int]) -> bool:
    """True when the image holds at least one `rgb`-coloured `shape` ("star" or "ring")."""
    return shape in find_concepts(image, rgb)
