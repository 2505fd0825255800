"""ShapesEval: analytic, offline scoring of shapes-world images against their prompts (GenEval style).

An image is resized to 128 x 128, median filtered (pixel noise) and every pixel is labelled with
its nearest colour among the palette and grey. The background is the most common label on the image
border; pixels of any other palette colour within `COLOUR_TOLERANCE` are object pixels. Each
colour's mask is opened (3 x 3 erosion then dilation, which removes the thin fringes a blurry image
leaves between two colours) and split into 4-connected components; components under `MIN_AREA`
pixels are noise. A component is an object of that colour; its shape comes from the fill ratio of
its bounding box (square 1, circle pi/4, triangle 1/2) and its aspect, with the share of its area
in the top half of the box telling blurred triangles (1/4) from circles (1/2); its size from the
box diameter; its position (3 x 3 grid cell) from the box centre.

A prompt's spec (see `hart.data.captions`) is checked object by object: an object with the stated
colour, shape and size exists (or exactly `count` of them), lies in the stated grid cell, stands in
the stated relation to the second object (centre comparison), and the background has the stated
colour. A prompt passes when every check passes; `score` averages passes per category, and
'overall' is the mean of the category scores.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

from hart.data.shapes import BACKGROUNDS, CATEGORIES, GREY, IMAGE_SIZE, grid_cell

PROMPTS_PATH = Path(__file__).with_name("shapes_prompts.jsonl")
HELDOUT_PROMPTS_PATH = Path(__file__).with_name("shapes_prompts_heldout.jsonl")  # same scenes, held-out wordings

MEDIAN_SIZE = 3  # px; a median filter first removes pixel noise
COLOUR_TOLERANCE = 80.0  # RGB distance beyond which a pixel matches no palette colour
BORDER = 2  # px of image border that decide the background colour
MIN_AREA = 80  # px; smaller components are noise (a small triangle covers about 240 px)
SQUARE_EXTENT = 0.89  # fill ratio of the bounding box: squares (1) above, circles (pi/4) down to...
CIRCLE_EXTENT = 0.64  # ...this; triangles (1/2) down to...
TRIANGLE_EXTENT = 0.35  # ...this, and with...
TRIANGLE_TOP = 0.42  # ...at most this share of their area in the top half of the box (1/4; others 1/2)
MAX_ASPECT = 1.6  # bounding boxes more elongated than this are no shape
LARGE_DIAMETER = 34  # px; sqrt(bounding box area) splitting small (about 24) from large (about 48)
RELATION_MARGIN = 4  # px a centre must be past the other along a relation's axis

_NAMES = tuple(BACKGROUNDS)
_RGB = np.array([BACKGROUNDS[n] for n in _NAMES], dtype=np.float32)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_NAME = re.compile(r"^(\d{5})(?:_.*)?$")

ImageLike = Union[Image.Image, np.ndarray]


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str  # circle, square, triangle or "other"
    size: str  # small or large
    center: Tuple[float, float]  # (x, y) of the bounding box centre
    area: int

    @property
    def position(self) -> str:
        return grid_cell(*self.center)


def load_prompts(path=PROMPTS_PATH) -> List[dict]:
    """The evaluation records: prompt text, spec and ground-truth scene (the committed set by default)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _to_rgb(image: ImageLike) -> np.ndarray:
    """Float RGB array, 128 x 128, of a PIL image or a uint8 (H, W, 3) array of any size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    image = image.filter(ImageFilter.MedianFilter(MEDIAN_SIZE))
    return np.asarray(image, dtype=np.float32)


def _neighbourhood(mask: np.ndarray, reduce) -> np.ndarray:
    """`reduce` (np.logical_and / np.logical_or) of each pixel's 3 x 3 neighbourhood, outside = False."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = p[1:h + 1, 1:w + 1].copy()
    for dy in range(3):
        for dx in range(3):
            out = reduce(out, p[dy:dy + h, dx:dx + w])
    return out


def connected_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: (labels with 0 = outside and 1..n, n).

    Every pixel starts labelled with its own flat index; labels shrink to the least label among the
    4 neighbours and then jump to the label of the pixel they point at, until nothing changes.
    """
    h, w = mask.shape
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, outside)
        flat = new.ravel()
        new = np.where(mask, np.append(flat, outside)[new], outside)  # pointer jumping
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense, int(np.count_nonzero(roots != outside))


def _shape(xs: np.ndarray, ys: np.ndarray) -> str:
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(width, height) > MAX_ASPECT * min(width, height):
        return "other"
    extent = len(xs) / (width * height)
    top = np.mean(ys < (ys.min() + ys.max() + 1) / 2)  # share of the area in the top half of the box
    if extent >= SQUARE_EXTENT:
        return "square"
    if top <= TRIANGLE_TOP and extent >= TRIANGLE_EXTENT:
        return "triangle"
    return "circle" if extent >= CIRCLE_EXTENT else "other"


def _object(colour: str, xs: np.ndarray, ys: np.ndarray) -> Detection:
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    size = "large" if np.sqrt(width * height) >= LARGE_DIAMETER else "small"
    center = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2)
    return Detection(colour, _shape(xs, ys), size, center, len(xs))


def detect(image: ImageLike) -> Tuple[str, List[Detection]]:
    """(background colour name, objects found) of an image of any size."""
    rgb = _to_rgb(image).reshape(-1, 3)
    dist2 = (rgb * rgb).sum(1, keepdims=True) - 2 * rgb @ _RGB.T + (_RGB * _RGB).sum(1)
    nearest = dist2.argmin(1).reshape(IMAGE_SIZE, IMAGE_SIZE)
    close = (dist2.min(1) <= COLOUR_TOLERANCE ** 2).reshape(IMAGE_SIZE, IMAGE_SIZE)
    border = np.ones(nearest.shape, bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = int(np.bincount(nearest[border], minlength=len(_NAMES)).argmax())
    pixels = np.bincount(nearest[close], minlength=len(_NAMES))
    found = []
    for c, name in enumerate(_NAMES):
        if c == background or name == GREY or pixels[c] < MIN_AREA:
            continue
        mask = (nearest == c) & close
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        top, left = rows[0], cols[0]
        mask = mask[top:rows[-1] + 1, left:cols[-1] + 1]  # work on the colour's bounding box only
        mask = _neighbourhood(_neighbourhood(mask, np.logical_and), np.logical_or)
        labels, n = connected_components(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if len(xs) >= MIN_AREA:
                found.append(_object(name, xs + left, ys + top))
    return _NAMES[background], found


def _matches(d: Detection, e: dict) -> bool:
    return all(e[k] is None or e[k] == getattr(d, k) for k in ("shape", "colour", "size"))


def _holds(rel: str, a: Detection, b: Detection) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return offset > RELATION_MARGIN


def evaluate(image: ImageLike, spec: dict) -> Dict[str, bool]:
    """Per-check booleans of `image` against a prompt spec, and `passed` (all checks pass)."""
    background, found = detect(image)
    checks, matched = {}, []
    for i, e in enumerate(spec["objects"]):
        hits = [d for d in found if _matches(d, e)]
        matched.append(hits)
        if e["count"] is None:
            checks[f"object{i}"] = bool(hits)
        else:
            checks[f"object{i}_count"] = len(hits) == e["count"]
        if e["position"] is not None:
            checks[f"object{i}_position"] = any(d.position == e["position"] for d in hits)
    if spec["relation"] is not None:
        checks["relation"] = any(_holds(spec["relation"], a, b) for a in matched[0] for b in matched[1])
    if spec["background"] is not None:
        checks["background"] = background == spec["background"]
    checks["passed"] = all(checks.values())
    return checks


def _aggregate(categories: Sequence[str], passed: Sequence[bool]) -> Dict[str, float]:
    by_category: Dict[str, List[bool]] = {}
    for category, ok in zip(categories, passed):
        by_category.setdefault(category, []).append(ok)
    scores = {c: float(np.mean(by_category[c])) for c in CATEGORIES if c in by_category}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores


def score(images: Sequence[ImageLike], specs: Sequence[dict]) -> Dict[str, float]:
    """Accuracy per category (of the categories present) and 'overall', the mean of those accuracies."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} specs")
    return _aggregate([s["category"] for s in specs], [evaluate(i, s)["passed"] for i, s in zip(images, specs)])


def score_pipeline(pipe, records: Sequence[dict], seeds: Sequence[int] = (0,), batch_size: int = 16,
                   **call_kwargs) -> dict:
    """Generate an image for every (record, seed) with `pipe` (a `HARTPipeline`; `call_kwargs` go to its
    call, e.g. `guidance_scale`) and score them: `scores` (as `score`) and the PIL `images`, record-major."""
    import torch  # only here: the rest of this module needs no torch

    jobs = [(r, s) for r in records for s in seeds]
    images = []
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for _, s in chunk]
        images += pipe([r["prompt"] for r, _ in chunk], generator=generators, output_type="pil",
                       **call_kwargs).images
    return {"scores": score(images, [r for r, _ in jobs]), "images": images}


def image_files(folder, n_prompts: int) -> Dict[int, List[Path]]:
    """Images of `folder` by prompt index, following the naming contract: the name starts with the
    prompt's index as five digits, then the extension or `_` and anything (`00012.png`,
    `00012_0.png`, `00012_seed7.jpg`); several images of one prompt are scored separately."""
    files: Dict[int, List[Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        match = IMAGE_NAME.match(path.stem)
        if match is None or int(match.group(1)) >= n_prompts:
            raise ValueError(f"{path.name}: image names must start with a prompt index 00000-{n_prompts - 1:05d} "
                             "followed by '_' or the extension")
        files.setdefault(int(match.group(1)), []).append(path)
    return files


def evaluate_folder(folder, prompts: Sequence[dict]) -> dict:
    """Score the images of `folder` (named as `image_files` says) against `prompts`: `scores`, the
    number of images per category (`images`), prompt indices without an image (`missing`, not
    scored) and each image's checks (`results`)."""
    files = image_files(folder, len(prompts))
    results = []
    for index, paths in sorted(files.items()):
        spec = prompts[index]
        for path in paths:
            with Image.open(path) as image:
                checks = evaluate(image, spec)
            results.append({"file": path.name, "index": index, "category": spec["category"], **checks})
    categories = [r["category"] for r in results]
    return {
        "scores": _aggregate(categories, [r["passed"] for r in results]),
        "images": {c: categories.count(c) for c in CATEGORIES if c in categories},
        "missing": [i for i in range(len(prompts)) if i not in files],
        "results": results,
    }
