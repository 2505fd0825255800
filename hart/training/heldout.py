"""The held-out check of fine-tuning: does the model still draw its old world?

When the base model declares the shapes world (`hart.training.checks.model_world`), every validation
(every `--validation_every` steps and at the end) and once at step 0, for the comparison, samples
`--validation_world_prompts K` prompts of the committed ShapesEval set with the current (EMA)
weights, one seed each (`seed + i` for prompt `i`), and scores them (`hart.eval.shapes_eval`). The
set lists its eight categories in blocks, so the K prompts are taken evenly spaced over it (every
category counts once K >= 8) rather than as its first K.

Each check writes `validation/step-XXXXXXXX.json` (the scores by category, and the start's),
`validation/world-step-XXXXXXXX.png` (the samples) and `old_world_score` ('overall') into the step's
row of `logs/metrics.csv` (step 0 gets a row of its own), and logs one line:
`step 200: old world ShapesEval 0.33 (start 0.34); samples: validation/step-00000200.png`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from hart.eval.shapes_eval import load_prompts, score
from hart.text import TextConditioning
from hart.training.validation import sample_images, save_grid

logger = logging.getLogger(__name__)

CHUNK = 16  # prompts sampled at once


def world_prompts(k: int) -> List[dict]:
    """`k` records of the ShapesEval set, evenly spaced over it."""
    records = load_prompts()
    if not 0 < k <= len(records):
        raise ValueError(f"the world prompts number from 1 to {len(records)}, got {k}")
    return [records[i * len(records) // k] for i in range(k)]


class WorldCheck:
    """Samples and scores the old world's prompts (encoded once, when the run starts)."""

    def __init__(self, k: int, encode: Callable[[List[str]], TextConditioning], seed: int, guidance_scale: float):
        self.records = world_prompts(k)
        prompts = [r["prompt"] for r in self.records]
        self.conds = [encode(prompts[lo:lo + CHUNK]) for lo in range(0, k, CHUNK)]
        self.seeds = [seed + i for i in range(k)]
        self.guidance_scale = guidance_scale

    def sample(self, transformer, vae) -> np.ndarray:
        """`(K, H, W, 3)` uint8 samples of the prompts with the weights the transformer holds now."""
        seeds = [self.seeds[lo:lo + CHUNK] for lo in range(0, len(self.seeds), CHUNK)]
        return np.concatenate([sample_images(transformer, vae, cond, s, self.guidance_scale)
                               for cond, s in zip(self.conds, seeds)])

    def score(self, images: np.ndarray) -> Dict[str, float]:
        return score(list(images), self.records)


def report(out: Path, step: int, grid: Optional[Path], check: Optional[WorldCheck],
           world_images: Optional[np.ndarray]) -> Dict[str, float]:
    """Write and log one validation's results (main process) -> the metrics of the step's row."""
    folder = out / "validation"
    parts, metrics = [], {}
    if check is not None:
        scores = check.score(world_images)
        save_grid(world_images, folder / f"world-step-{step:08d}.png", columns=8)
        start = scores if step == 0 else _start_scores(folder)
        record = {"step": step, "prompts": len(check.records), "seeds": check.seeds,
                  "guidance_scale": check.guidance_scale, "scores": scores, "start": start}
        (folder / f"step-{step:08d}.json").write_text(json.dumps(record, indent=1))
        metrics["old_world_score"] = scores["overall"]
        start_text = "" if step == 0 or start is None else f" (start {start['overall']:.2f})"
        parts.append(f"old world ShapesEval {scores['overall']:.2f}{start_text}")
    if grid is not None:
        parts.append(f"samples: {grid.relative_to(out).as_posix()}")
    if parts:
        logger.info("step %d: %s", step, "; ".join(parts))
    return metrics


def _start_scores(folder: Path) -> Optional[Dict[str, float]]:
    path = folder / f"step-{0:08d}.json"
    return json.loads(path.read_text())["scores"] if path.is_file() else None

