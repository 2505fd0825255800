"""The caption grammar: many wordings of one shapes-world scene, each with the spec of what it claims.

`describe(scene, rng, heldout=False)` returns `(caption, spec)` like `hart.data.captions.describe`,
with the same spec for the same scene and mentions, but the wording is composed from a grammar:
a lead-in ("there is", "an image of", "a picture showing", ...), a phrase of the scene's category, noun
phrases with or without an article, synonyms for sizes ("big", "huge", "tiny"), numbers ("2" or "two"),
grid cells ("in the upper left", "in the centre") and relations ("over", "on top of", "on the left side
of"), either object order of a pair (the relation follows the order), then case and final punctuation.
Every choice comes from the caller's generator, so each call draws a fresh caption.

The phrases of each category are split in two: those training captions use, and a held-out set
(`HELDOUT`) of sentence frames that no training caption uses, made of the same words ("in the
picture, {n} and {m}", "{where} there is {n}", "{rel} {m} is {n}"). A held-out caption (`heldout=True`)
is worded with a held-out phrase and the shared words, so it tests whether a model trained on this
grammar follows a sentence it was not shown (`hart/eval/shapes_prompts_heldout.jsonl`).
"""
from __future__ import annotations

import re
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from hart.data.captions import COLOURS_SHAPE_MENTION_P, COUNT_COLOUR_MENTION_P, SIZE_MENTION_P, expect
from hart.data.shapes import GREY, Scene, grid_cell, relation


class Wordings(NamedTuple):
    """The phrases of one category: those training captions use, and the held-out ones no training caption uses."""
    train: Tuple[str, ...]
    heldout: Tuple[str, ...]

    def pick(self, rng: np.random.Generator, heldout: bool) -> str:
        return _pick(self.heldout if heldout else self.train, rng)


def _pick(options: Tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


# Phrases by category. Fields: {lead} a lead-in with its trailing space, or "" (after PLURAL in counting);
# {n}, {m} the first and second noun phrase with article; {bare} the first without article; {where} a grid
# cell; {rel} the relation of {n} to {m}; {count} a number; {bg} a background colour; {colour}, {noun}
# for `colours` ({noun} is the shape, or a word for "shape" when the caption leaves the shape out).
# The held-out phrases are new sentence frames made of words the training phrases use; none is a template of
# `hart.data.captions` either.
PHRASES: Dict[str, Wordings] = {
    "single_object": Wordings(
        ("{lead}{n}", "{lead}{n} in the picture", "{lead}a single {bare}", "{lead}one {bare}"),
        ("in the picture, {n}", "{n} is in the picture")),
    "colours": Wordings(
        ("{lead}{n}", "{lead}a {noun} that is {colour}", "{lead}a {noun} coloured {colour}", "{lead}a {noun} in {colour}"),
        ("{lead}a {noun} that is coloured {colour}", "{lead}one {noun} in {colour}")),
    "position": Wordings(
        ("{lead}{n} {where}", "{where}, {n}", "{lead}{n} placed {where}", "{n} is {where}"),
        ("{where} there is {n}", "{lead}{n} that is placed {where}")),
    "counting": Wordings(
        ("{lead}{count} {bare}", "{lead}exactly {count} {bare}", "{lead}{count} {bare} in the picture"),
        ("in the picture, {count} {bare}", "{lead}exactly {count} {bare} in the picture")),
    "two_objects": Wordings(
        ("{lead}{n} and {m}", "{lead}{n} with {m}", "{lead}{n} and {m} in the picture", "{lead}{n} together with {m}"),
        ("in the picture, {n} and {m}", "{lead}{n} and {m} together")),
    "relative_position": Wordings(
        ("{lead}{n} {rel} {m}", "{n} is {rel} {m}", "{lead}{n} placed {rel} {m}"),
        ("{rel} {m} is {n}", "{lead}{n} that is {rel} {m}")),
    "background": Wordings(
        ("{lead}{n} on a {bg} background", "{lead}{n} on {bg}", "{lead}{n} against a {bg} background",
         "a {bg} background with {n}", "{lead}{n} in front of a {bg} background", "{lead}{n}, {bg} background"),
        ("{lead}{n} with a {bg} background", "on a {bg} background, {n}")),
}
PHRASES["colour_attribution"] = PHRASES["two_objects"]

# The words of each slot, shared by training and held-out captions.
LEADS = ("", "", "", "a picture of ", "an image of ", "there is ", "a drawing of ", "a picture showing ")
PLURAL = {"there is ": "there are "}  # the lead-in before a plural
ARTICLES = ("a", "a", "the", "")
SIZE_WORDS = {"large": ("large", "big", "huge"), "small": ("small", "little", "tiny")}
NO_SHAPE = ("shape", "object", "thing")  # the noun of a `colours` caption that leaves the shape out
NUMBERS = {2: ("2", "two"), 3: ("3", "three"), 4: ("4", "four")}
WHERE = {
    "top left": ("in the top left", "in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top of the picture"),
    "top right": ("in the top right", "in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom of the picture"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right", "in the lower right"),
}
RELATIONS = {
    "left of": ("left of", "to the left of", "on the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath", "underneath"),
}
BACKGROUND_WORDS = {GREY: ("grey", "gray")}  # other backgrounds are named by their colour
CASES = ("lower", "lower", "lower", "first", "first", "title", "upper")  # drawn uniformly
ENDINGS = ("", "", "", ".", ".", "!")

# The held-out set: phrases no training caption uses.
HELDOUT = {c: w.heldout for c, w in PHRASES.items()}


def _noun_phrase(e: dict, size_word: Optional[str], noun: str, plural: bool = False) -> str:
    return " ".join(w for w in (size_word, e["colour"], noun + "s" if plural else noun) if w)


def _with_article(article: str, bare: str) -> str:
    return f"{article} {bare}" if article else bare


def _finish(text: str, rng: np.random.Generator) -> str:
    """Articles before vowels, single spaces, then a drawn case and final punctuation."""
    text = re.sub(r"\ba (?=[aeiou])", "an ", " ".join(text.split()))
    case = CASES[int(rng.integers(len(CASES)))]
    if case == "first":
        text = text[:1].upper() + text[1:]
    elif case == "title":
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    elif case == "upper":
        text = text.upper()
    return text + ENDINGS[int(rng.integers(len(ENDINGS)))]


def describe(scene: Scene, rng: np.random.Generator, heldout: bool = False) -> Tuple[str, dict]:
    """(caption, spec) of `scene`, in a training phrase of its category, or a held-out one (`heldout=True`)."""
    cat, objs = scene.category, scene.objects
    rel = background = None
    fields = {"lead": _pick(LEADS, rng)}

    def size_word(obj) -> Optional[str]:
        return _pick(SIZE_WORDS[obj.size], rng) if rng.random() < SIZE_MENTION_P else None

    def mention(obj, colour: bool = True) -> Tuple[dict, str]:
        """The object's spec (with a drawn size mention) and its noun phrase without article."""
        word = size_word(obj)
        e = expect(obj.shape, obj.colour if colour else None, obj.size if word else None)
        return e, _noun_phrase(e, word, obj.shape)

    if cat in ("single_object", "position", "background"):
        o = objs[0]
        e, bare = mention(o)
        if cat == "position":
            e["position"] = grid_cell(*o.center)
            fields["where"] = _pick(WHERE[e["position"]], rng)
        if cat == "background":
            background = scene.background
            fields["bg"] = _pick(BACKGROUND_WORDS[background], rng) if background in BACKGROUND_WORDS else background
        exps = [e]
    elif cat == "colours":
        o = objs[0]
        shape = o.shape if rng.random() < COLOURS_SHAPE_MENTION_P else None
        e = expect(shape, o.colour)
        noun = shape or _pick(NO_SHAPE, rng)
        bare = _noun_phrase(e, None, noun)
        fields.update(colour=o.colour, noun=noun)
        exps = [e]
    elif cat == "counting":
        colours = {o.colour for o in objs}
        colour = objs[0].colour if len(colours) == 1 and rng.random() < COUNT_COLOUR_MENTION_P else None
        word = size_word(objs[0])
        e = expect(objs[0].shape, colour, objs[0].size if word else None, count=len(objs))
        bare = _noun_phrase(e, word, e["shape"], plural=True)
        fields["count"] = _pick(NUMBERS[len(objs)], rng)
        fields["lead"] = PLURAL.get(fields["lead"], fields["lead"])
        exps = [e]
    else:  # two objects, in random order; a relation is stated from the first to the second
        a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        (e, bare), (f, other) = (mention(o, colour=cat != "two_objects") for o in (a, b))
        fields["m"] = _with_article(_pick(ARTICLES, rng), other)
        if cat == "relative_position":
            rel = relation(a.center, b.center)
            fields["rel"] = _pick(RELATIONS[rel], rng)
        exps = [e, f]
    fields.update(bare=bare, n=_with_article(_pick(ARTICLES, rng), bare))
    text = PHRASES[cat].pick(rng, heldout).format(**fields)
    return _finish(text, rng), {"category": cat, "objects": exps, "relation": rel, "background": background}
