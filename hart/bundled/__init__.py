"""Models shipped inside the package (weights in sub-folders, loaded with `HARTPipeline.from_pretrained`).

`BUNDLED_MODEL`: the shapes-world HART trained with this package's own scripts
(`scripts/train_bundled.py`; model card: docs/bundled_model.md), the default of `hart generate` and the app.
"""
from pathlib import Path

BUNDLED_MODEL = str(Path(__file__).resolve().parent / "shapes-128")
