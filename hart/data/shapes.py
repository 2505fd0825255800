"""The shapes world: a fixed, procedurally generated captioned world for training and evaluation.

Images are 128 x 128 RGB. Objects are circles, squares and upward triangles (as wide as they are
tall) in one of eight palette colours and two sizes, never overlapping, on a grey background or, in
the `background` category, on any palette colour or grey other than the object's. Rendering has no
anti-aliasing, so every pixel is exactly a palette colour or the background.

A scene is sampled for one of the eight evaluation categories (`CATEGORIES`); the category decides
how many objects there are and how they are laid out (a grid cell for `position`, a clear offset
along one axis for `relative_position`). What the caption says about it is decided in
`hart.data.captions`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
GREY = "grey"
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {**PALETTE, GREY: (128, 128, 128)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES: Dict[str, Tuple[int, int]] = {"small": (22, 26), "large": (44, 52)}  # diameter range in px, inclusive
GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = (
    "single_object", "colours", "position", "counting",
    "two_objects", "relative_position", "colour_attribution", "background",
)
COUNTS = (2, 3, 4)
MAX_LARGE_COUNT = 3  # four large objects rarely fit: counting scenes of four use small ones

EDGE_MARGIN = 4  # px between an object and the image border
OBJECT_GAP = 4  # px between the bounding boxes of two objects
CELL_MARGIN = 6  # px between a positioned object's centre and the edges of its grid cell
RELATION_GAP = 20  # px, least centre offset along a relation's axis
PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: int  # left column of the bounding box
    y: int  # top row of the bounding box
    diameter: int  # width and height of the bounding box

    @property
    def center(self) -> Tuple[float, float]:
        half = (self.diameter - 1) / 2
        return self.x + half, self.y + half

    def gap_to(self, other: "Obj") -> int:
        """Pixels between the two bounding boxes along the axis where they are furthest apart."""
        dx = max(other.x - (self.x + self.diameter), self.x - (other.x + other.diameter))
        dy = max(other.y - (self.y + self.diameter), self.y - (other.y + other.diameter))
        return max(dx, dy)


@dataclass(frozen=True)
class Scene:
    category: str
    background: str
    objects: Tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"category": self.category, "background": self.background,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["category"], d["background"], tuple(Obj(**o) for o in d["objects"]))


def grid_cell(x: float, y: float) -> str:
    """Grid word of the 3 x 3 cell holding the point (x, y) of a 128 x 128 image."""
    col, row = (min(int(v * 3 // IMAGE_SIZE), 2) for v in (x, y))
    return GRID[row][col]


def relation(a: Tuple[float, float], b: Tuple[float, float]) -> str:
    """Relation of the point `a` to the point `b` along the axis where they differ most."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _pick(rng: np.random.Generator, options: Sequence, exclude: Sequence = ()):
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _diameter(rng: np.random.Generator, size: str) -> int:
    lo, hi = SIZES[size]
    return int(rng.integers(lo, hi + 1))


def _corner_range(diameter: int, cell: Optional[int]) -> range:
    """Top-left coordinates keeping the object inside the image (and its centre inside `cell`)."""
    corners = range(EDGE_MARGIN, IMAGE_SIZE - EDGE_MARGIN - diameter + 1)
    if cell is None:
        return corners
    lo, hi = cell * IMAGE_SIZE / 3 + CELL_MARGIN, (cell + 1) * IMAGE_SIZE / 3 - CELL_MARGIN
    half = (diameter - 1) / 2
    return range(max(corners.start, int(np.ceil(lo - half))), min(corners.stop, int(np.floor(hi - half)) + 1))


def _place(rng, shape, colour, size, placed: Sequence[Obj], cell: Optional[Tuple[int, int]] = None) -> Optional[Obj]:
    """A new object at a random free spot (in the grid cell (row, col) when given), None when none is found."""
    d = _diameter(rng, size)
    xs, ys = (_corner_range(d, None if cell is None else cell[i]) for i in (1, 0))
    for _ in range(PLACEMENT_TRIES):
        obj = Obj(shape, colour, size, int(rng.choice(xs)), int(rng.choice(ys)), d)
        if all(obj.gap_to(p) >= OBJECT_GAP for p in placed):
            return obj
    return None


def _place_all(rng, specs: Sequence[Tuple[str, str, str]]) -> Optional[Tuple[Obj, ...]]:
    placed = []
    for shape, colour, size in specs:
        obj = _place(rng, shape, colour, size, placed)
        if obj is None:
            return None
        placed.append(obj)
    return tuple(placed)


def _one_object(rng, category: str) -> Optional[Scene]:
    shape, colour, size = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, tuple(SIZES))
    cell = (int(rng.integers(3)), int(rng.integers(3))) if category == "position" else None
    background = _pick(rng, tuple(BACKGROUNDS), exclude=[colour]) if category == "background" else GREY
    return Scene(category, background, (_place(rng, shape, colour, size, [], cell),))


def _counting(rng, category: str) -> Optional[Scene]:
    n, shape = int(rng.choice(COUNTS)), _pick(rng, SHAPES)
    size = _pick(rng, tuple(SIZES)) if n <= MAX_LARGE_COUNT else "small"
    same_colour = _pick(rng, COLOURS) if rng.random() < 0.5 else None
    specs = [(shape, same_colour or _pick(rng, COLOURS), size) for _ in range(n)]
    objects = _place_all(rng, specs)
    return objects and Scene(category, GREY, objects)


def _pair(rng, category: str) -> Optional[Scene]:
    """Two objects: different shapes (two_objects, colour_attribution; the latter also different
    colours) or any two distinct (colour, shape) pairs with a clear relation (relative_position)."""
    while True:
        shapes = [_pick(rng, SHAPES) for _ in range(2)]
        colours = [_pick(rng, COLOURS) for _ in range(2)]
        distinct = {"two_objects": shapes[0] != shapes[1],
                    "colour_attribution": shapes[0] != shapes[1] and colours[0] != colours[1],
                    "relative_position": (shapes[0], colours[0]) != (shapes[1], colours[1])}[category]
        if distinct:
            break
    specs = [(s, c, _pick(rng, tuple(SIZES))) for s, c in zip(shapes, colours)]
    objects = _place_all(rng, specs)
    if objects is None:
        return None
    if category == "relative_position":
        (ax, ay), (bx, by) = objects[0].center, objects[1].center
        near, far = sorted((abs(bx - ax), abs(by - ay)))
        if far < RELATION_GAP or near > far / 2:  # the relation must be clear
            return None
    return Scene(category, GREY, objects)


_SAMPLERS: Dict[str, Callable[[np.random.Generator, str], Optional[Scene]]] = {
    "single_object": _one_object, "colours": _one_object, "position": _one_object,
    "background": _one_object, "counting": _counting, "two_objects": _pair,
    "relative_position": _pair, "colour_attribution": _pair,
}


def sample_scene(rng: np.random.Generator, category: Optional[str] = None) -> Scene:
    """A random scene of `category` (drawn uniformly from `CATEGORIES` when None)."""
    if category is None:
        category = _pick(rng, CATEGORIES)
    if category not in _SAMPLERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    while True:
        scene = _SAMPLERS[category](rng, category)
        if scene is not None and all(o is not None for o in scene.objects):
            return scene


def render(scene: Scene) -> Image.Image:
    """The scene as a 128 x 128 RGB image, without anti-aliasing."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x1, y1 = o.x + o.diameter - 1, o.y + o.diameter - 1
        fill = PALETTE[o.colour]
        if o.shape == "circle":
            draw.ellipse((o.x, o.y, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((o.x, o.y, x1, y1), fill=fill)
        else:
            draw.polygon([(o.x + (o.diameter - 1) / 2, o.y), (o.x, y1), (x1, y1)], fill=fill)
    return image
