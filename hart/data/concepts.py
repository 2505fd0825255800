"""New concepts for the shapes world: shapes it has never seen (stars, rings) in any colour, with
captions worded like the world's own, for teaching the bundled model something new by fine-tuning.

`write_concept_dataset` writes the imagefolder layout `hart.training.data` reads (PNGs and
`metadata.jsonl`): one object of the concept per image, large by default, at a random spot on a grey
background, captioned e.g. "a green star", "a pink ring in the top left" (and "a small green star"
when the folder mixes sizes). Large is the default because the bundled tokenizer draws a small
(22-26 px) star as a five-pointed shape in only about half of its reconstructions. The images follow
the world's rules (128 x 128, no anti-aliasing, 4 px from the border), so the concept is the only
new thing in them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from hart.data.captions import WHERE, _a_an
from hart.data.shapes import BACKGROUNDS, GREY, IMAGE_SIZE, PALETTE, SIZES, _corner_range, grid_cell

CONCEPT_SHAPES = ("star", "ring")
# colours outside the world's palette, for concepts the bundled tokenizer has never seen
EXTRA_COLOURS: Dict[str, Tuple[int, int, int]] = {"pink": (250, 110, 190), "teal": (0, 150, 150),
                                                  "brown": (130, 80, 40)}
CONCEPT_COLOURS: Dict[str, Tuple[int, int, int]] = {**PALETTE, **EXTRA_COLOURS}
STAR_INNER_RATIO = 0.45  # inner / outer radius of a five-pointed star
RING_WIDTH_RATIO = 0.22  # ring width / diameter
POSITION_MENTION_P = 0.5  # how often a caption says where the object is
SIZE_MENTION_P = 0.5  # how often it says how large it is
TEMPLATES = ("a {n}", "a {n} {where}", "a picture of a {n}", "there is a {n} {where}", "one {n}",
             "a {n} in the picture")


def star_points(x: float, y: float, diameter: int) -> list:
    """The ten corners of an upright five-pointed star filling the square box at (x, y)."""
    r_out = (diameter - 1) / 2
    cx, cy = x + r_out, y + r_out
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r_out, r_out * STAR_INNER_RATIO)
    return [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for r, a in zip(radii, angles)]


def render_concept(shape: str, rgb: Tuple[int, int, int], x: int, y: int, diameter: int) -> Image.Image:
    """One `shape` of colour `rgb` in the box (x, y, diameter) on the world's grey background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[GREY])
    draw = ImageDraw.Draw(image)
    x1 = y1 = None
    x1, y1 = x + diameter - 1, y + diameter - 1
    if shape == "star":
        draw.polygon(star_points(x, y, diameter), fill=rgb)
    elif shape == "ring":
        draw.ellipse((x, y, x1, y1), outline=rgb, width=max(3, round(diameter * RING_WIDTH_RATIO)))
    else:
        raise ValueError(f"unknown concept shape {shape!r}; expected one of {CONCEPT_SHAPES}")
    return image


def concept_caption(shape: str, colour: str, size: str, where: str, rng: np.random.Generator) -> str:
    """A caption in the world's wording; size (when given) and position are each mentioned only sometimes."""
    noun = " ".join(w for w in (size if size and rng.random() < SIZE_MENTION_P else None, colour, shape) if w)
    with_where = rng.random() < POSITION_MENTION_P
    templates = [t for t in TEMPLATES if ("{where}" in t) == with_where]
    text = templates[int(rng.integers(len(templates)))]
    phrases = WHERE[where]
    return _a_an(text.format(n=noun, where=phrases[int(rng.integers(len(phrases)))]))


def write_concept_dataset(out_dir, shape: str, colour: str, n: int = 48, seed: int = 0,
                          sizes: Sequence[str] = ("large",)) -> Path:
    """Write `n` captioned images of one `colour` `shape` of the world's `sizes` into `out_dir` (same
    seed, same folder)."""
    if shape not in CONCEPT_SHAPES:
        raise ValueError(f"unknown concept shape {shape!r}; expected one of {CONCEPT_SHAPES}")
    if colour not in CONCEPT_COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(CONCEPT_COLOURS)}")
    if not sizes or any(s not in SIZES for s in sizes):
        raise ValueError(f"sizes must be some of {', '.join(SIZES)}, got {list(sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        size = sizes[int(rng.integers(len(sizes)))]
        diameter = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        corners = _corner_range(diameter, None)
        x, y = int(rng.choice(corners)), int(rng.choice(corners))
        half = (diameter - 1) / 2
        text = concept_caption(shape, colour, size if len(sizes) > 1 else None, grid_cell(x + half, y + half), rng)
        name = f"{i:05d}.png"
        render_concept(shape, CONCEPT_COLOURS[colour], x, y, diameter).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
