"""Offline evaluation: ShapesEval scores shapes-world images against the committed prompt sets."""
from hart.eval.shapes_eval import HELDOUT_PROMPTS_PATH, PROMPTS_PATH, detect, evaluate, evaluate_folder, load_prompts, score

__all__ = ["HELDOUT_PROMPTS_PATH", "PROMPTS_PATH", "detect", "evaluate", "evaluate_folder", "load_prompts", "score"]
