"""New-concept datasets (`hart.data.concepts`), their detector (`hart.eval.concepts`) and the script."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from hart.data.concepts import CONCEPT_COLOURS, CONCEPT_SHAPES, render_concept, write_concept_dataset
from hart.data.shapes import PALETTE, render, sample_scene
from hart.eval.concepts import find_concepts, shows_concept
from tests.utils import REPO_ROOT


@pytest.mark.parametrize("shape", CONCEPT_SHAPES)
@pytest.mark.parametrize("colour", ["green", "pink"])
def test_dataset_images_show_their_caption(tmp_path, shape, colour):
    folder = write_concept_dataset(tmp_path / "d", shape, colour, n=12, seed=3, sizes=("large", "small"))
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len({r["text"] for r in records}) > 3  # worded several ways
    for r in records:
        assert f"{colour} {shape}" in r["text"]
        image = Image.open(folder / r["file_name"])
        assert image.size == (128, 128)
        assert find_concepts(image, CONCEPT_COLOURS[colour]) == [shape]
    again = write_concept_dataset(tmp_path / "e", shape, colour, n=12, seed=3, sizes=("large", "small"))
    assert (again / "metadata.jsonl").read_text() == (folder / "metadata.jsonl").read_text()


@pytest.mark.parametrize("shape", CONCEPT_SHAPES)
def test_detector_survives_blur_and_tells_the_colour(shape):
    image = render_concept(shape, CONCEPT_COLOURS["pink"], 30, 40, 48).filter(ImageFilter.GaussianBlur(1.5))
    assert shows_concept(image, shape, CONCEPT_COLOURS["pink"])
    assert not shows_concept(image, shape, PALETTE["orange"])  # nearest-colour labelling keeps pink apart
    other = "ring" if shape == "star" else "star"
    assert not shows_concept(image, other, CONCEPT_COLOURS["pink"])


def test_detector_finds_no_concept_in_the_world():
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = sample_scene(rng)
        image = render(scene).filter(ImageFilter.GaussianBlur(1.0))
        for colour in {o.colour for o in scene.objects}:
            kinds = find_concepts(image, PALETTE[colour])
            assert "star" not in kinds and "ring" not in kinds, (scene, kinds)


def test_script_writes_a_folder_and_refuses_a_full_one(tmp_path):
    script = [sys.executable, str(REPO_ROOT / "scripts" / "make_concept_dataset.py"), "--shape", "star",
              "--colour", "teal", "--out", str(tmp_path / "stars"), "-n", "4"]
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "stars").glob("*.png"))) == 4
    again = subprocess.run(script, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert len(list((tmp_path / "stars").glob("*.png"))) == 4
