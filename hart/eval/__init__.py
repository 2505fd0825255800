"""Offline evaluation: ShapesEval scores shapes-world images against the committed prompt set."""
from hart.eval.shapes_eval import PROMPTS_PATH, detect, evaluate, evaluate_folder, load_prompts, score

__all__ = ["PROMPTS_PATH", "detect", "evaluate", "evaluate_folder", "load_prompts", "score"]
