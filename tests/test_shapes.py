"""The shapes world (generator, captions, dataset folder, eval prompt set) and ShapesEval."""
import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from hart.data.captions import describe
from hart.data.shapes import (
    BACKGROUNDS, CATEGORIES, GREY, IMAGE_SIZE, OBJECT_GAP, Obj, Scene, render, sample_scene,
)
from hart.data.shapes_dataset import dumps_prompts, make_eval_prompts, render_record, write_dataset
from hart.eval.shapes_eval import PROMPTS_PATH, connected_components, detect, evaluate, load_prompts, score

CLEAN_MIN = 0.98  # required on ground-truth renders, every category
DEGRADED_MIN = 0.95  # on blurred, down-and-up-sampled or noisy JPEG renders (measured: 1.0)
WRONG_MAX = 0.35  # a render of another prompt of the category (measured: at most 0.22, two_objects)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


@pytest.fixture(scope="module")
def renders(prompts):
    return [render_record(p) for p in prompts]


def _scenes(seed, n=300):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((scene, describe(scene, rng)[0]))
    return out


def test_generator_is_deterministic():
    assert _scenes(3, 50) == _scenes(3, 50)
    assert _scenes(3, 50) != _scenes(4, 50)


def test_scenes_follow_the_world_rules():
    for scene, text in _scenes(0):
        objs = scene.objects
        assert 1 <= len(objs) <= 4 and scene.category in CATEGORIES
        assert scene.background in BACKGROUNDS and scene.background not in {o.colour for o in objs}
        assert scene.background == GREY or scene.category == "background"
        for i, o in enumerate(objs):
            assert 0 <= o.x and o.x + o.diameter <= IMAGE_SIZE and 0 <= o.y and o.y + o.diameter <= IMAGE_SIZE
            assert all(o.gap_to(p) >= OBJECT_GAP for p in objs[i + 1:])
        packed = np.asarray(render(scene)).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        allowed = {BACKGROUNDS[scene.background]} | {BACKGROUNDS[o.colour] for o in objs}
        assert set(np.unique(packed).tolist()) == {(r << 16) + (g << 8) + b for r, g, b in allowed}  # no anti-aliasing
        assert text == text.strip() and not re.search(r"\ba [aeiou]", text)


def test_dataset_folder(tmp_path):
    from hart.training.data import read_captions

    a, b = write_dataset(tmp_path / "a", 12, seed=7), write_dataset(tmp_path / "b", 12, seed=7)
    lines = [json.loads(x) for x in (a / "metadata.jsonl").read_text().splitlines()]
    assert [x["file_name"] for x in lines] == [f"{i:05d}.png" for i in range(12)]
    assert all(set(x) == {"file_name", "text"} and x["text"] for x in lines)
    captions, _ = read_captions(a)
    assert captions == {x["file_name"]: x["text"] for x in lines}
    for x in lines:
        with Image.open(a / x["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert (a / x["file_name"]).read_bytes() == (b / x["file_name"]).read_bytes()
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    c = write_dataset(tmp_path / "c", 12, seed=8)
    assert (c / "metadata.jsonl").read_text() != (a / "metadata.jsonl").read_text()


def test_dataset_script(tmp_path):
    from scripts.make_shapes_dataset import main

    assert main(["--out", str(tmp_path / "d"), "-n", "3", "--seed", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "metadata.jsonl"]


def test_eval_prompts_are_committed_and_reproducible(tmp_path, prompts):
    from scripts.make_shapes_dataset import main

    assert PROMPTS_PATH.read_text(encoding="utf-8") == dumps_prompts(make_eval_prompts())
    assert main(["--eval-prompts", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").read_text(encoding="utf-8") == PROMPTS_PATH.read_text(encoding="utf-8")
    assert len(prompts) >= 200 and [p["index"] for p in prompts] == list(range(len(prompts)))
    per_category = {c: [p["prompt"] for p in prompts if p["category"] == c] for c in CATEGORIES}
    assert len({len(v) for v in per_category.values()}) == 1  # balanced
    assert all(len(set(v)) == len(v) for v in per_category.values())  # distinct within a category
    assert any(p["relation"] for p in prompts) and any(p["background"] for p in prompts)
    assert any(o["position"] for p in prompts for o in p["objects"])


def test_eval_prompts_use_the_training_vocabulary(prompts):
    vocabulary = {w for _, text in _scenes(1, 1500) for w in re.findall(r"[a-z]+", text)}
    assert {w for p in prompts for w in re.findall(r"[a-z]+", p["prompt"])} <= vocabulary


def test_connected_components():
    mask = np.zeros((8, 8), bool)
    mask[1:6, 1] = mask[5, 1:5] = mask[1:6, 4] = True  # a U: one component
    mask[0, 6] = mask[1, 7] = True  # diagonal neighbours: two components
    labels, n = connected_components(mask)
    assert n == 3 and labels[~mask].max() == 0
    assert len(np.unique(labels[1:6, 1])) == 1 and labels[1, 1] == labels[1, 4]
    assert labels[0, 6] != labels[1, 7]


def test_detect_reads_a_scene_at_any_size():
    scene = Scene("colour_attribution", GREY, (Obj("triangle", "orange", "large", 10, 70, 48),
                                               Obj("circle", "yellow", "small", 90, 10, 24)))
    big = np.asarray(render(scene).resize((512, 512), Image.BICUBIC))
    background, found = detect(big)
    assert background == GREY
    assert sorted((d.colour, d.shape, d.size, d.position) for d in found) == [
        ("orange", "triangle", "large", "bottom left"), ("yellow", "circle", "small", "top right")]


def _by_category(scores):
    return {c: round(scores[c], 3) for c in CATEGORIES}


def test_ground_truth_scores_high(prompts, renders):
    scores = score(renders, prompts)
    assert min(scores[c] for c in CATEGORIES) >= CLEAN_MIN, _by_category(scores)
    assert scores["overall"] >= CLEAN_MIN


def _degrade(i: int, image: Image.Image) -> Image.Image:
    """By turns: gaussian blur (radius 1), down to 64 px and back, gaussian noise (sd 20) saved as JPEG."""
    if i % 3 == 0:
        return image.filter(ImageFilter.GaussianBlur(1))
    if i % 3 == 1:
        return image.resize((64, 64), Image.BILINEAR).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    noise = np.random.default_rng(i).normal(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=75)
    return Image.open(buffer)


def test_degraded_ground_truth_scores_high(prompts, renders):
    scores = score([_degrade(i, im) for i, im in enumerate(renders)], prompts)
    assert min(scores[c] for c in CATEGORIES) >= DEGRADED_MIN, _by_category(scores)


def test_training_scenes_match_their_captions():
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = sample_scene(rng)
        text, spec = describe(scene, rng)
        assert evaluate(render(scene), spec)["passed"], (text, scene)


def test_wrong_images_score_low(prompts, renders):
    # The render of the next prompt of the same category.
    wrong = []
    for i, p in enumerate(prompts):
        same = [j for j, q in enumerate(prompts) if q["category"] == p["category"]]
        wrong.append(renders[same[(same.index(i) + 1) % len(same)]])
    scores = score(wrong, prompts)
    assert max(scores[c] for c in CATEGORIES) <= WRONG_MAX, _by_category(scores)
    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[GREY])
    assert not any(evaluate(blank, p)["passed"] for p in prompts[::4])


def test_swapped_colours_and_mirrored_relations_fail(prompts):
    for p in prompts:
        scene = Scene.from_dict(p["scene"])
        if p["category"] == "colour_attribution":
            a, b = scene.objects
            swapped = (Obj(a.shape, b.colour, a.size, a.x, a.y, a.diameter),
                       Obj(b.shape, a.colour, b.size, b.x, b.y, b.diameter))
            assert not evaluate(render(Scene(scene.category, scene.background, swapped)), p)["passed"]
        if p["category"] == "relative_position":
            flip = Image.FLIP_LEFT_RIGHT if p["relation"] in ("left of", "right of") else Image.FLIP_TOP_BOTTOM
            checks = evaluate(render(scene).transpose(flip), p)
            assert not checks["relation"] and not checks["passed"]


def test_eval_script(tmp_path, prompts, renders):
    from scripts.shapes_eval import main

    images = tmp_path / "images"
    images.mkdir()
    chosen = [i for c in CATEGORIES for i in [p["index"] for p in prompts if p["category"] == c][:2]]
    for i in chosen:
        renders[i].save(images / f"{i:05d}_0.png")
    renders[chosen[0]].resize((256, 256)).save(images / f"{chosen[0]:05d}.png")  # a second image, larger
    assert main(["--images", str(images), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scores"]["overall"] == 1.0 and set(report["scores"]) == {*CATEGORIES, "overall"}
    assert len(report["results"]) == len(chosen) + 1
    assert len(report["missing"]) == len(prompts) - len(chosen)
    renders[0].save(images / "grid.png")
    with pytest.raises(SystemExit):
        main(["--images", str(images)])
