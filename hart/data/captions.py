"""Captions of shapes-world scenes, with the structured expectation each caption states.

`describe(scene, rng)` picks one of several templates of the scene's category and returns the
caption together with its spec: what an image must show to match the caption, in the form
`hart.eval.shapes_eval` checks:

    {"category": "relative_position",
     "objects": [{"shape": "square", "colour": "purple", "size": None, "count": None, "position": None},
                 {"shape": "triangle", "colour": "orange", "size": None, "count": None, "position": None}],
     "relation": "above",        # relation of objects[0] to objects[1], or None
     "background": None}         # background colour name, or None

An object field left None is not stated; `count` None means "at least one", an int means exactly
that many. Training captions and evaluation prompts come from the same templates.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import numpy as np

from hart.data.shapes import Obj, Scene, grid_cell, relation

SIZE_MENTION_P = 0.3  # how often a caption states an object's size
COLOURS_SHAPE_MENTION_P = 0.5  # how often a `colours` caption names the shape ("colours_no_shape" otherwise)
COUNT_COLOUR_MENTION_P = 0.7  # how often a counting caption of same-coloured objects states the colour
NUMBERS = {2: "two", 3: "three", 4: "four"}

# Templates by category; "colours_no_shape" serves `colours` captions that leave the shape out.
TEMPLATES = {
    "single_object": ("a {n}", "a picture of a {n}", "an image of a {n}", "there is a {n}", "a single {n}",
                      "one {n}", "a {n} in the picture", "a drawing of a {n}"),
    "colours": ("a {shape} coloured {colour}", "a {shape} that is {colour}", "a {shape} in {colour}",
                "a {colour} coloured {shape}", "a {colour} {shape}"),
    "colours_no_shape": ("a {colour} shape", "a {colour} object", "something {colour}",
                         "one {colour} shape", "a shape coloured {colour}"),
    "position": ("a {n} {where}", "{where}, a {n}", "a picture with a {n} {where}", "a {n} placed {where}",
                 "there is a {n} {where}"),
    "counting": ("{count} {n}", "exactly {count} {n}", "there are {count} {n}", "a picture of {count} {n}",
                 "{count} {n} in the picture"),
    "two_objects": ("a {n} and a {m}", "a {n} with a {m}", "a picture of a {n} and a {m}",
                    "a {n} and a {m} in the picture", "one {n} and one {m}"),
    "colour_attribution": ("a {n} and a {m}", "a {n} with a {m}", "a picture of a {n} and a {m}",
                           "a {n} together with a {m}", "a {n} and also a {m}"),
    "relative_position": ("a {n} {rel} a {m}", "a picture of a {n} {rel} a {m}", "there is a {n} {rel} a {m}"),
    "background": ("a {n} on a {bg} background", "a {n} on {bg}", "a {n} against a {bg} background",
                   "a {bg} background with a {n}", "a {n} in front of a {bg} background", "a {n}, {bg} background"),
}
WHERE = {
    "top left": ("in the top left", "in the top left corner"),
    "top": ("at the top",),
    "top right": ("in the top right", "in the top right corner"),
    "left": ("on the left",),
    "center": ("in the center",),
    "right": ("on the right",),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def expect(shape=None, colour=None, size=None, count=None, position=None) -> dict:
    return {"shape": shape, "colour": colour, "size": size, "count": count, "position": position}


def _noun(e: dict, plural: bool = False) -> str:
    shape = e["shape"] + "s" if plural else e["shape"]
    return " ".join(w for w in (e["size"], e["colour"], shape) if w)


def _a_an(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _mention_size(rng: np.random.Generator, obj: Obj) -> Optional[str]:
    return obj.size if rng.random() < SIZE_MENTION_P else None


def describe(scene: Scene, rng: np.random.Generator) -> Tuple[str, dict]:
    """(caption, spec) for `scene`, with the template and the optional mentions drawn from `rng`."""
    cat, objs = scene.category, scene.objects
    fields, background, rel, templates = {}, None, None, TEMPLATES[cat]
    if cat in ("single_object", "position", "background"):
        o = objs[0]
        where = grid_cell(*o.center) if cat == "position" else None
        exps = [expect(o.shape, o.colour, _mention_size(rng, o), position=where)]
        fields["n"] = _noun(exps[0])
        if where:
            fields["where"] = _choice(rng, WHERE[where])
        if cat == "background":
            background = fields["bg"] = scene.background
    elif cat == "colours":
        o = objs[0]
        shape = o.shape if rng.random() < COLOURS_SHAPE_MENTION_P else None
        exps = [expect(shape, o.colour)]
        fields.update(shape=shape, colour=o.colour)
        if shape is None:
            templates = TEMPLATES["colours_no_shape"]
    elif cat == "counting":
        colours = {o.colour for o in objs}
        colour = objs[0].colour if len(colours) == 1 and rng.random() < COUNT_COLOUR_MENTION_P else None
        exps = [expect(objs[0].shape, colour, _mention_size(rng, objs[0]), count=len(objs))]
        fields.update(n=_noun(exps[0], plural=True), count=NUMBERS[len(objs)])
    else:  # two objects, in random order
        a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        with_colour = cat != "two_objects"
        exps = [expect(o.shape, o.colour if with_colour else None, _mention_size(rng, o)) for o in (a, b)]
        fields.update(n=_noun(exps[0]), m=_noun(exps[1]))
        if cat == "relative_position":
            rel = relation(a.center, b.center)
            fields["rel"] = _choice(rng, RELATION_WORDS[rel])
    text = _a_an(_choice(rng, templates).format(**fields))
    return text, {"category": cat, "objects": exps, "relation": rel, "background": background}


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of `scene` (the text of `describe`)."""
    return describe(scene, rng)[0]
