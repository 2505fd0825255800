"""Procedurally generated training data: the shapes world (`shapes`), its captions (`captions`: fixed templates;
`grammar`: many wordings with a held-out set) and datasets."""
from hart.data.captions import caption, describe
from hart.data.shapes import CATEGORIES, Obj, Scene, render, sample_scene
from hart.data.shapes_dataset import make_eval_prompts, write_dataset

__all__ = ["CATEGORIES", "Obj", "Scene", "caption", "describe", "make_eval_prompts", "render",
           "sample_scene", "write_dataset"]
