"""A user sees only real warnings: the libraries' notices that say nothing about their run are not printed."""
import os
import subprocess
import sys

from PIL import Image, ImageDraw


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "hart.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_inpaint_on_the_bundled_model_prints_no_warning(tmp_path):
    picture = Image.new("RGB", (128, 128), (128, 128, 128))
    ImageDraw.Draw(picture).ellipse((30, 30, 90, 90), fill=(255, 0, 0))
    picture.save(tmp_path / "picture.png")
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 64, 64), fill=255)
    mask.save(tmp_path / "mask.png")
    lines = _run(["inpaint", "a blue square", "--image", "picture.png", "--mask", "mask.png", "--out", "edits"],
                 tmp_path)
    noise = [line for line in lines if "warn" in line.lower() or "float32" in line]
    assert not noise, noise
    assert (tmp_path / "edits" / "00000_00.png").is_file()


def test_a_long_prompt_gives_one_truncation_warning_and_no_tokenizer_notice(tmp_path):
    lines = _run(["generate", "a red circle on a blue background " * 40, "--out", "out"], tmp_path)
    assert not any("indexing errors" in line for line in lines), lines
    assert sum("truncated" in line for line in lines) == 1, lines
