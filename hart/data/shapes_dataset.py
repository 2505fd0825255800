"""Shapes-world datasets: a fine-tuning folder of (image, caption) pairs and the fixed evaluation prompts.

`write_dataset` writes the Hugging Face imagefolder layout that `hart.training.data` reads: `00000.png`,
`00001.png`, ... and `metadata.jsonl` with one `{"file_name": ..., "text": caption}` line per image.
Everything is drawn from one `numpy` generator seeded with `seed`, so a seed always gives the same folder.
With `grammar_variants=K` the captions come from the caption grammar (`hart.data.grammar`, training
wordings) instead, K of them per image, each with its own copy of the image (`00000_0.png` ...
`00000_{K-1}.png`): a training cache stores one caption per file, so this is how cached training sees
several wordings of one picture.

`make_eval_prompts` builds the ShapesEval prompt set (committed as `hart/eval/shapes_prompts.jsonl`):
`EVAL_PER_CATEGORY` distinct prompts per category, each record holding the prompt, its spec (see
`hart.data.captions`) and the scene it was captioned from, which renders a ground-truth image.
`make_heldout_prompts` words the same scenes with the grammar's held-out wordings only (committed as
`hart/eval/shapes_prompts_heldout.jsonl`): how a model copes with wordings it was not trained on.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List

import numpy as np

from hart.data import grammar
from hart.data.captions import describe
from hart.data.shapes import BACKGROUNDS, CATEGORIES, COUNTS, GRID, RELATIONS, Scene, render, sample_scene

EVAL_SEED = 20250
EVAL_PER_CATEGORY = 32
HELDOUT_SEED = 20251
HELDOUT_TRIES = 100  # draws of a held-out caption until one differs from the category's earlier ones
METADATA = "metadata.jsonl"


def write_dataset(out_dir, n: int, seed: int, categories=CATEGORIES, grammar_variants: int = 0) -> Path:
    """Write `n` rendered scenes (categories drawn uniformly from `categories`) and their captions into
    `out_dir`: one caption of `hart.data.captions` per image, or with `grammar_variants` > 0 that many
    captions of the caption grammar, each beside its own copy of the image. (A tokenizer learns more
    per image from the categories with several objects: more edges.)"""
    if grammar_variants < 0:
        raise ValueError(f"grammar_variants must be 0 (fixed templates) or a number of captions per image, "
                         f"got {grammar_variants}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(5, len(str(n - 1)))
    lines = []
    for i in range(n):
        scene = sample_scene(rng, categories[int(rng.integers(len(categories)))])
        if not grammar_variants:
            named = [(f"{i:0{width}d}.png", describe(scene, rng)[0])]
        else:
            named = [(f"{i:0{width}d}_{v}.png", grammar.describe(scene, rng)[0]) for v in range(grammar_variants)]
        png = io.BytesIO()
        render(scene).save(png, format="PNG")
        for name, text in named:
            (out / name).write_bytes(png.getvalue())
            lines.append(json.dumps({"file_name": name, "text": text}))
    (out / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# What the eval set balances within a category: the prompts cycle through these values.
_STRATA = {
    "position": ([cell for row in GRID for cell in row], lambda spec: spec["objects"][0]["position"]),
    "counting": (COUNTS, lambda spec: spec["objects"][0]["count"]),
    "relative_position": (RELATIONS, lambda spec: spec["relation"]),
    "background": (tuple(BACKGROUNDS), lambda spec: spec["background"]),
}


def make_eval_prompts(seed: int = EVAL_SEED, per_category: int = EVAL_PER_CATEGORY) -> List[dict]:
    """The evaluation records, category by category, with distinct prompts within each category and
    grid cells, counts, relations and background colours in turn."""
    rng = np.random.default_rng(seed)
    records = []
    for category in CATEGORIES:
        seen = set()
        while len(seen) < per_category:
            scene = sample_scene(rng, category)
            text, spec = describe(scene, rng)
            if text in seen:
                continue
            if category in _STRATA:
                values, key = _STRATA[category]
                if key(spec) != values[len(seen) % len(values)]:
                    continue
            seen.add(text)
            records.append({"index": len(records), "prompt": text, **spec, "scene": scene.to_dict()})
    return records


def make_heldout_prompts(seed: int = HELDOUT_SEED) -> List[dict]:
    """The records of `make_eval_prompts()` (same scenes, categories and order) captioned with held-out
    wordings only; captions stay distinct within a category, case and final punctuation aside."""
    rng = np.random.default_rng(seed)
    records, seen = [], {c: set() for c in CATEGORIES}
    for record in make_eval_prompts():
        scene = Scene.from_dict(record["scene"])
        for _ in range(HELDOUT_TRIES):
            text, spec = grammar.describe(scene, rng, heldout=True)
            key = text.lower().rstrip(".!")
            if key not in seen[scene.category]:
                break
        else:
            raise RuntimeError(f"no new held-out caption for record {record['index']} in {HELDOUT_TRIES} draws")
        seen[scene.category].add(key)
        records.append({"index": record["index"], "prompt": text, **spec, "scene": record["scene"]})
    return records


def dumps_prompts(records: List[dict]) -> str:
    """JSON lines text of the records, as committed."""
    return "".join(json.dumps(r) + "\n" for r in records)


def render_record(record: dict):
    """Ground-truth image of an evaluation record."""
    return render(Scene.from_dict(record["scene"]))
