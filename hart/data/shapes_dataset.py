"""Shapes-world datasets: a fine-tuning folder of (image, caption) pairs and the fixed evaluation prompts.

`write_dataset` writes the Hugging Face imagefolder layout that `hart.training.data` reads: `00000.png`,
`00001.png`, ... and `metadata.jsonl` with one `{"file_name": ..., "text": caption}` line per image.
Everything is drawn from one `numpy` generator seeded with `seed`, so a seed always gives the same folder.

`make_eval_prompts` builds the ShapesEval prompt set (committed as `hart/eval/shapes_prompts.jsonl`):
`EVAL_PER_CATEGORY` distinct prompts per category, each record holding the prompt, its spec (see
`hart.data.captions`) and the scene it was captioned from, which renders a ground-truth image.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np

from hart.data.captions import describe
from hart.data.shapes import BACKGROUNDS, CATEGORIES, COUNTS, GRID, RELATIONS, Scene, render, sample_scene

EVAL_SEED = 20250
EVAL_PER_CATEGORY = 32
METADATA = "metadata.jsonl"


def write_dataset(out_dir, n: int, seed: int, categories=CATEGORIES) -> Path:
    """Write `n` rendered scenes (categories drawn uniformly from `categories`) and their captions into
    `out_dir`. (A tokenizer learns more per image from the categories with several objects: more edges.)"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(5, len(str(n - 1)))
    lines = []
    for i in range(n):
        scene = sample_scene(rng, categories[int(rng.integers(len(categories)))])
        text, _ = describe(scene, rng)
        name = f"{i:0{width}d}.png"
        render(scene).save(out / name)
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


def dumps_prompts(records: List[dict]) -> str:
    """JSON lines text of the records, as committed."""
    return "".join(json.dumps(r) + "\n" for r in records)


def render_record(record: dict):
    """Ground-truth image of an evaluation record."""
    return render(Scene.from_dict(record["scene"]))
