"""`hart generate` / `hart convert`: files, PNG metadata, exact regeneration, errors, accelerate split."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hart.cli import METADATA_KEY, main
from tests.utils import REPO_ROOT, fixture_sizes, free_port, strict_recompiles

METADATA_FIELDS = {"prompt", "negative_prompt", "seed", "guidance_scale", "top_k", "top_p", "more_smooth",
                   "model", "text_encoder", "dtype", "hart_version", "prompt_index", "image_index", "batch"}
SIDE = fixture_sizes().image_size  # the fixture checkpoint's image size
SCALES = fixture_sizes().num_scales  # and its number of scales


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """`hart generate` creates accelerate's process-wide PartialState: do not leak it into other tests."""
    yield
    from accelerate.state import PartialState

    PartialState._reset_state()


@pytest.fixture(scope="module")
def official(fixtures):
    """`--model ... --text-encoder ...` for the fixture checkpoint in the official layout."""
    return ["--model", str(fixtures / "ckpt"), "--text-encoder", str(fixtures / "ckpt" / "text_encoder")]


@pytest.fixture(scope="module")
def package_model(fixture_pipe, tmp_path_factory):
    """The same checkpoint saved in this package's layout (model_index.json)."""
    folder = tmp_path_factory.mktemp("package_model")
    fixture_pipe.save_pretrained(folder)
    return ["--model", str(folder)]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def metadata(path) -> dict:
    return json.loads(Image.open(path).text[METADATA_KEY])


def manifest(out: Path):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_generate_writes_pngs_with_complete_metadata(official, fixtures, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "a red fox", "-n", "2", "--seed", "7", "--guidance-scale", "3", "--negative-prompt", "blur"]
    assert main(argv + official + ["--out", str(out)]) == 0
    files = ["00000_00.png", "00000_01.png"]
    assert sorted(p.name for p in out.glob("*.png")) == files
    for i, name in enumerate(files):
        assert Image.open(out / name).size == (SIDE, SIDE)
        meta = metadata(out / name)
        assert METADATA_FIELDS <= meta.keys()
        assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["guidance_scale"]) == ("a red fox", "blur", 7 + i, 3.0)
        # local folders are recorded as resolved absolute paths, so --from-png finds them from anywhere
        assert (meta["model"], meta["text_encoder"]) == (
            str((fixtures / "ckpt").resolve()), str((fixtures / "ckpt" / "text_encoder").resolve()))
        assert meta["dtype"] == "fp32" and meta["image_index"] == i
    assert [r["file"] for r in manifest(out)] == files
    assert str(out) in capsys.readouterr().out
    assert not np.array_equal(pixels(out / files[0]), pixels(out / files[1]))  # seeds 7 and 8 differ


def test_from_png_regenerates_the_identical_image(package_model, tmp_path):
    # a batch of 3: float rounding depends on the batch, so --from-png must replay the whole batch
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["generate", "a blue house", "-n", "3", "--seed", "11", "--batch-size", "3", "--top-k", "50",
                 "--out", str(first)] + package_model) == 0
    assert main(["generate", "--from-png", str(first / "00000_01.png"), "--out", str(again)]) == 0
    assert [p.name for p in again.glob("*.png")] == ["00000_01.png"]
    assert np.array_equal(pixels(again / "00000_01.png"), pixels(first / "00000_01.png"))
    assert metadata(again / "00000_01.png") == metadata(first / "00000_01.png")


def test_compile_flag_gives_the_eager_image_up_to_rounding(package_model, tmp_path):
    argv = ["generate", "a blue house", "--seed", "5", "--top-k", "1"] + package_model
    with strict_recompiles(4):
        assert main(argv + ["--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert main(argv + ["--out", str(tmp_path / "eager")]) == 0
    compiled, eager = (pixels(tmp_path / name / "00000_00.png").astype(int) for name in ("compiled", "eager"))
    assert np.abs(compiled - eager).max() <= 2


def test_compile_without_a_cpp_compiler_is_a_clear_error(package_model, tmp_path, monkeypatch, capsys):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    assert main(["generate", "a blue house", "--compile", "--out", str(tmp_path / "out")] + package_model) == 2
    assert "--compile: compiling for the CPU needs a C++ compiler" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_guidance_scale_the_model_s_own_is_used_and_recorded(fixture_pipe, tmp_path):
    from hart import HARTPipeline

    HARTPipeline(**fixture_pipe.components, guidance_scale=2.0).save_pretrained(tmp_path / "model")
    runs = {}
    for name, extra in (("own", []), ("given", ["--guidance-scale", "2"]), ("release", ["--guidance-scale", "4.5"])):
        assert main(["generate", "a blue house", "--seed", "3", "--model", str(tmp_path / "model"),
                     "--out", str(tmp_path / name)] + extra) == 0
        runs[name] = tmp_path / name / "00000_00.png"
    assert metadata(runs["own"])["guidance_scale"] == 2.0
    assert np.array_equal(pixels(runs["own"]), pixels(runs["given"]))
    assert not np.array_equal(pixels(runs["own"]), pixels(runs["release"]))


def test_prompts_file_grid_and_steps(package_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "id": 7}\n{"prompt": "a bird"}\n')
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "--batch-size", "2", "--grid", "--save-steps",
                 "--out", str(out)] + package_model) == 0
    rows = manifest(out)
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [
        ("00000_00.png", "a cat", 0), ("00001_00.png", "a dog", 1), ("00002_00.png", "a bird", 2)]
    assert Image.open(out / "grid.png").size == (2 * SIDE, 2 * SIDE)  # 3 images on a 2 x 2 grid
    for row in rows:
        strip = Image.open(out / row["file"].replace(".png", "_steps.png"))
        assert strip.size == ((SCALES + 1) * SIDE, SIDE)  # one preview per scale, then the image
        assert metadata(out / row["file"])["prompt"] == row["prompt"]


def test_plain_text_prompts_file_and_grid_columns(official, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  \na dog\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "-n", "3", "--grid", "--out", str(out)] + official) == 0
    assert [r["file"] for r in manifest(out)] == [f"0000{p}_0{i}.png" for p in (0, 1) for i in range(3)]
    assert Image.open(out / "grid.png").size == (3 * SIDE, 2 * SIDE)  # a row per prompt


def test_converter_output_gives_the_same_images(official, fixtures, tmp_path, monkeypatch):
    converted = tmp_path / "converted"
    monkeypatch.setattr(sys, "argv", ["convert_official.py", *official, "--out", str(converted)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "scripts" / "convert_official.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert (converted / "model_index.json").is_file()
    prompt = ["generate", "a green tree", "-n", "2", "--seed", "5", "--batch-size", "2"]
    assert main(prompt + official + ["--out", str(tmp_path / "a")]) == 0
    assert main(prompt + ["--model", str(converted), "--out", str(tmp_path / "b")]) == 0
    for name in ("00000_00.png", "00000_01.png"):
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name))


@pytest.mark.parametrize("case", [
    "no_prompt", "missing_model", "neither_layout", "no_text_encoder", "fp16_on_cpu",
    "missing_prompts_file", "png_without_metadata", "from_png_with_seed", "convert_into_nonempty_folder",
])
def test_bad_input_exits_with_a_message_naming_the_problem(case, official, fixtures, tmp_path, capsys):
    ckpt = str(fixtures / "ckpt")
    plain_png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain_png)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    argv, expected = {
        "no_prompt": (["generate", *official], "PROMPT"),
        "missing_model": (["generate", "a cat", "--model", str(tmp_path / "nope")], str(tmp_path / "nope")),
        "neither_layout": (["generate", "a cat", "--model", str(tmp_path)], "neither"),
        "no_text_encoder": (["generate", "a cat", "--model", ckpt], "--text-encoder is required"),
        "fp16_on_cpu": (["generate", "a cat", *official, "--device", "cpu", "--dtype", "fp16"], "--dtype fp16"),
        "missing_prompts_file": (["generate", "--prompts-file", str(tmp_path / "p.txt"), *official], "p.txt"),
        "png_without_metadata": (["generate", "--from-png", str(plain_png)], "plain.png"),
        "from_png_with_seed": (["generate", "--from-png", str(plain_png), "--seed", "3"], "--seed"),
        "convert_into_nonempty_folder": (["convert", *official, "--out", str(tmp_path / "full")], "--out"),
    }[case]
    assert main(argv + ["--out", str(tmp_path / "out")] if argv[0] == "generate" else argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_accelerate_launch_splits_a_prompts_file_exactly(official, tmp_path):
    prompts = [f"prompt number {i}" for i in range(5)]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    args = ["generate", "--prompts-file", str(prompts_file), "--batch-size", "1", *official]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "hart.cli", *args, "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # `--cpu` or a missing cpu=True would silently run lone processes
        assert f"process {rank} of 2 wrote" in result.stdout
    assert json.loads((out / "run.json").read_text())["num_processes"] == 2
    rows = manifest(out)
    assert [r["prompt_index"] for r in rows] == list(range(5))  # every prompt exactly once
    assert [r["prompt"] for r in rows] == prompts and {r["rank"] for r in rows} == {0, 1}
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}_00.png" for i in range(5)]
    # the split does not change the images: one process writes the same pixels (with the same
    # thread count as the launched processes: fp32 sums on CPU round differently with more threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        assert np.array_equal(pixels(out / row["file"]), pixels(tmp_path / "single" / row["file"]))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_compiled_large_run_estimates_from_a_call_after_compiling(compiled, package_model, tmp_path, capsys,
                                                                    monkeypatch):
    """The first call of a compiled pipeline compiles (here: a 3 s pause stands for it); timing that call
    would inflate a large run's estimate by as much for every batch."""
    import re
    import time

    import hart.cli
    from hart import limits
    from hart.pipelines import HARTPipeline

    monkeypatch.setattr(limits, "CONFIRM_IMAGES", 2)
    monkeypatch.setattr(HARTPipeline, "compile_transformer", lambda self: self)
    real, calls = hart.cli.generate_batch, []

    def first_call_compiles(*args):
        calls.append(time.sleep(3 if not calls else 0))
        return real(*args)

    monkeypatch.setattr(hart.cli, "generate_batch", first_call_compiles)
    assert main(["generate", "a red fox", "-n", "3", "--batch-size", "2", "--yes", "--out", str(tmp_path / "out")]
                + package_model + (["--compile"] if compiled else [])) == 0
    took = float(re.search(r"the first 2 took ([\d.]+) s", capsys.readouterr().out).group(1))
    assert len(calls) == (3 if compiled else 2)
    assert (took < 3) == compiled
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_an_unknown_argument_with_a_line_break_is_still_one_line(capsys):
    assert main(["generate", "-\r", "--out", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == ["hart: error: unrecognized arguments: - (see --help)"]


def test_hart_app_passes_its_options_to_the_app(capsys):
    assert main(["app", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-queue" in out and "--compile" in out
    assert main(["app", "--model", "/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
    assert main(["generate", "--no-such-flag"]) == 2


def test_model_may_be_a_training_run_folder(package_model, tmp_path):
    """`--model runs/X` loads the pipeline the run exported into runs/X/pipeline, same images as that folder."""
    import shutil

    run = tmp_path / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    shutil.copytree(package_model[1], run / "pipeline")
    argv = ["generate", "a red fox", "--seed", "3"]
    assert main(argv + ["--model", str(run), "--out", str(tmp_path / "a")]) == 0
    assert main(argv + package_model + ["--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(pixels(tmp_path / "a" / "00000_00.png"), pixels(tmp_path / "b" / "00000_00.png"))


@pytest.mark.parametrize("answer,yes", [("y", False), (None, True)])
def test_a_large_run_prints_its_estimate_and_asks(answer, yes, package_model, tmp_path, capsys, monkeypatch):
    import hart.cli
    from hart import limits

    asked = []
    monkeypatch.setattr(limits, "CONFIRM_IMAGES", 2)
    monkeypatch.setattr(hart.cli, "interactive", lambda: True)
    monkeypatch.setattr("builtins.input", lambda question: asked.append(question) or answer)
    out = tmp_path / "out"
    assert main(["generate", "a red fox", "-n", "3", "--batch-size", "2", "--out", str(out)] + package_model
                + (["--yes"] if yes else [])) == 0
    printed = capsys.readouterr().out
    assert "3 images; the first 2 took" in printed and "min more" in printed
    assert len(asked) == (0 if yes else 1) and sorted(p.name for p in out.glob("*.png")) == [
        "00000_00.png", "00000_01.png", "00000_02.png"]


def test_hart_debug_raises_bad_input_with_its_traceback(official, tmp_path, monkeypatch):
    from hart.cli_args import UsageError

    monkeypatch.setenv("HART_DEBUG", "1")
    with pytest.raises(UsageError, match="is a folder"):
        main(["generate", "--prompts-file", str(tmp_path), *official])


def test_a_real_bug_keeps_its_traceback(package_model, tmp_path, monkeypatch):
    import hart.cli

    def broken(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(hart.cli, "generate_batch", broken)
    with pytest.raises(KeyError):
        main(["generate", "a red fox", "--out", str(tmp_path / "out")] + package_model)


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hart.cli", "generate", "--prompts-file", str(tmp_path),
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("hart generate: error: --prompts-file") and not (tmp_path / "out").exists()


def test_optional_libraries_import_notices_are_dropped_and_nothing_else(caplog):
    """With the `int8` extra installed, torchao's import-time notices (its CUDA-only kernel libraries on a
    CPU build of torch, ...) would precede every CLI message; `import hart` drops those, and only those."""
    import logging

    import hart

    with caplog.at_level(logging.DEBUG):
        for name, notice in hart._IMPORT_NOTICES.items():
            logging.getLogger(name).warning(f"{notice} ...")
            logging.getLogger(name).warning("quantize_ failed on layer blocks.0.attn.qkv")
    assert [r.getMessage() for r in caplog.records] == ["quantize_ failed on layer blocks.0.attn.qkv"] * 3
