"""`hart inpaint`, `hart outpaint`, `hart vary`: thin wrappers over the editing pipelines (fixture checkpoint)."""
import json

import numpy as np
import PIL.Image
import pytest
import torch

from hart.cli import METADATA_KEY, main
from hart.editing import outpaint_canvas
from hart.pipelines import HARTInpaintPipeline, HARTVariationPipeline
from tests.utils import fixture_sizes

SIDE = fixture_sizes().image_size  # the fixture checkpoint's image size
SCALES = fixture_sizes().num_scales
SHIFT = SIDE // 4  # the outpainting offset


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The commands create accelerate's process-wide PartialState: do not leak it into other tests."""
    yield
    from accelerate.state import PartialState

    PartialState._reset_state()


@pytest.fixture(scope="module")
def model(fixture_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("package_model")
    fixture_pipe.save_pretrained(folder)
    return ["--model", str(folder)]


@pytest.fixture(scope="module")
def files(recorded, tmp_path_factory):
    """The fixture's test picture, a hole mask for it, a half-size copy and a file that is not an image."""
    folder = tmp_path_factory.mktemp("inputs")
    img = recorded("tokenizer/tokenizer")["input_images"][0]
    picture = PIL.Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[SIDE // 4 : 3 * SIDE // 4, SIDE // 4 : 3 * SIDE // 4] = 255
    picture.save(folder / "picture.png")
    PIL.Image.fromarray(mask).save(folder / "mask.png")
    picture.resize((SIDE // 2, SIDE // 2)).save(folder / "small.png")
    (folder / "notes.png").write_text("not an image")
    return {name: str(folder / f"{name}.png") for name in ("picture", "mask", "small", "notes")}


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_inpaint_writes_what_the_pipeline_makes_with_its_settings(model, files, fixture_pipe, tmp_path):
    out = tmp_path / "out"
    argv = ["inpaint", "a red circle", "--image", files["picture"], "--mask", files["mask"], "-n", "2", "--seed", "5",
            "--guidance-scale", "3", "--blend-radius", "2", "--out", str(out), *model]
    assert main(argv) == 0
    pipe = HARTInpaintPipeline.from_pipe(fixture_pipe)
    for i in range(2):
        expected = pipe("a red circle", image=PIL.Image.open(files["picture"]), mask_image=PIL.Image.open(files["mask"]),
                        blend_radius=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(5 + i)).images[0]
        assert np.array_equal(pixels(out / f"00000_{i:02d}.png"), np.asarray(expected))
        meta = json.loads(PIL.Image.open(out / f"00000_{i:02d}.png").text[METADATA_KEY])
        assert meta["command"] == "inpaint" and meta["seed"] == 5 + i and meta["blend_radius"] == 2
        assert meta["mask"].endswith("mask.png") and meta["guidance_scale"] == 3.0


def test_outpaint_places_the_image_on_a_shifted_canvas(model, files, fixture_pipe, tmp_path):
    out = tmp_path / "out"
    argv = ["outpaint", "a garden", "--image", files["picture"], "--offset", str(-SHIFT), "0", "--fill", "0", "0", "255",
            "--save-canvas", "--out", str(out), *model]
    assert main(argv) == 0
    canvas, mask = outpaint_canvas(PIL.Image.open(files["picture"]), SIDE, (-SHIFT, 0), (0, 0, 255))
    assert np.array_equal(pixels(out / "canvas.png"), np.asarray(canvas))
    assert np.array_equal(np.asarray(PIL.Image.open(out / "canvas_mask.png")), np.asarray(mask))
    expected = HARTInpaintPipeline.from_pipe(fixture_pipe)(
        "a garden", image=canvas, mask_image=mask, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(pixels(out / "00000_00.png"), np.asarray(expected))


def test_vary_keeps_the_requested_scales(model, files, fixture_pipe, tmp_path):
    out = tmp_path / "out"
    assert main(["vary", "a lemur", "--image", files["small"], "--resize", "--keep-scales", "2", "--out", str(out),
                 *model]) == 0
    small = PIL.Image.open(files["small"]).convert("RGB").resize((SIDE, SIDE), PIL.Image.BICUBIC)
    expected = HARTVariationPipeline.from_pipe(fixture_pipe)(
        "a lemur", image=small, keep_scales=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(pixels(out / "00000_00.png"), np.asarray(expected))


@pytest.mark.parametrize("command,change,message", [
    ("inpaint", {"--image": "missing"}, "--image: file not found"),
    ("inpaint", {"--mask": "notes"}, "--mask: "),
    ("inpaint", {"--image": "small"}, "pass --resize"),
    ("inpaint", {"--mask": "empty"}, "`mask_image` is empty"),
    ("vary", {"--keep-scales": str(SCALES + 5)}, f"`keep_scales` must be an integer in [0, {SCALES - 1}]"),
    ("outpaint", {"--offset": [str(SIDE), "0"]}, "falls outside"),
    ("outpaint", {"--prompt": "  "}, "PROMPT is empty"),
])
def test_bad_input_is_a_one_line_error(command, change, message, model, files, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    PIL.Image.new("L", (SIDE, SIDE), 0).save(empty)
    paths = dict(files, missing=str(tmp_path / "missing.png"), empty=str(empty))
    options = {"--image": files["picture"], "--mask": files["mask"]} if command == "inpaint" else {"--image": files["picture"]}
    prompt = change.pop("--prompt", "a red circle")
    for flag, value in change.items():
        options[flag] = paths.get(value, value) if isinstance(value, str) else value
    argv = [command, prompt, "--out", str(tmp_path / "out"), *model]
    for flag, value in options.items():
        argv += [flag, *value] if isinstance(value, list) else [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"hart {command}: error: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "inpaint", "vary"])
def test_without_model_a_missing_bundled_one_is_named(command, files, tmp_path, capsys, monkeypatch):
    import hart.bundled

    monkeypatch.setattr(hart.bundled, "BUNDLED_MODEL", str(tmp_path / "shapes-128"))
    inputs = {"generate": [], "inpaint": ["--image", files["picture"], "--mask", files["mask"]],
              "vary": ["--image", files["picture"]]}[command]
    assert main([command, "a red circle", *inputs, "--out", str(tmp_path / "out")]) == 2
    assert "--model is required: the bundled model is missing from this install" in capsys.readouterr().err
