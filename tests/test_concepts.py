"""New-concept datasets (`hart.data.concepts`), their detector (`hart.eval.concepts`) and the script."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from hart.data.concepts import CONCEPT_COLOURS, CONCEPT_SHAPES, render_concept, write_concept_dataset
from hart.data.shapes import BACKGROUNDS, GREY, PALETTE, render, sample_scene
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


def _ring_with_stretch(stretch_rgb, start=20, end=80):
    """A blurred pink ring of which the arc from `start` to `end` degrees has another colour."""
    image = render_concept("ring", CONCEPT_COLOURS["pink"], 30, 30, 56)
    ImageDraw.Draw(image).arc((30, 30, 85, 85), start, end, fill=stretch_rgb, width=14)
    return image.filter(ImageFilter.GaussianBlur(1.0))


@pytest.mark.parametrize("stretch", [(245, 140, 30), (170, 105, 95)])  # orange; a dull blend near grey
def test_a_ring_with_a_stretch_of_another_colour_is_still_a_ring(stretch):
    assert find_concepts(_ring_with_stretch(stretch), CONCEPT_COLOURS["pink"]) == ["ring"]


def test_an_open_ring_and_a_disk_are_no_rings():
    opened = _ring_with_stretch(BACKGROUNDS[GREY], 20, 70)  # a gap of 50 degrees: a "C"
    assert "ring" not in find_concepts(opened, CONCEPT_COLOURS["pink"])
    disk = Image.new("RGB", (128, 128), BACKGROUNDS[GREY])
    ImageDraw.Draw(disk).ellipse((30, 30, 85, 85), fill=CONCEPT_COLOURS["pink"])
    assert find_concepts(disk.filter(ImageFilter.GaussianBlur(1.0)), CONCEPT_COLOURS["pink"]) == ["other"]
