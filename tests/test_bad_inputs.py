"""The bad-input catalogue: every way a user can get an input wrong, in one parametrised test.

Each case feeds one bad input through one entry point (the pipeline, the `hart` command line, the
model loaders, the fine-tuning data path, the web app) and checks that it is refused with the
documented exception type (exit status 2 for a command line), with a message that names the argument
or file and says what is expected, before any heavy work, and without leaving a half-written output
behind. Inputs that are documented to be converted (grey-scale and RGBA images) are checked to be
converted instead. `docs/troubleshooting.md` lists these errors and what to do about them.
"""
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hart.limits import MAX_GUIDANCE_SCALE, MAX_SEED
from hart.loading import CheckpointError, load_official_tokenizer
from tests.test_training_data import make_folder
from tests.utils import fixture_sizes

SIZES = fixture_sizes()  # the fixture checkpoint's sizes


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Env:
    tmp: Path
    fixtures: Path
    pipe: object
    capsys: object
    caplog: object
    narrow_text_encoder: Path

    @property
    def ckpt(self) -> Path:
        return self.fixtures / "ckpt"

    @property
    def text_encoder(self) -> Path:
        return self.fixtures / "ckpt" / "text_encoder"

    def copy_ckpt(self, name="model") -> Path:
        """A writable copy of the official-layout fixture (without its text encoder)."""
        dst = self.tmp / name
        shutil.copytree(self.ckpt, dst, ignore=shutil.ignore_patterns("text_encoder"))
        return dst

    def cli(self, *argv) -> tuple:
        """`hart ARGV` -> (exit status, stderr)."""
        from hart.cli import main

        self.capsys.readouterr()
        status = main([str(a) for a in argv])
        return status, self.capsys.readouterr().err

    def generate(self, model, *extra, text_encoder=True, out=None) -> tuple:
        out = out or self.tmp / "out"
        te = ["--text-encoder", self.text_encoder] if text_encoder is True else (
            ["--text-encoder", text_encoder] if text_encoder else [])
        return self.cli("generate", "a red fox", "--model", model, *te, "--out", out, *extra)


@pytest.fixture(scope="module")
def narrow_text_encoder(fixtures, tmp_path_factory):
    """A Qwen2 text encoder half as wide as the fixture transformer expects, with the fixture's tokenizer."""
    from transformers import Qwen2Config, Qwen2Model

    src = fixtures / "ckpt" / "text_encoder"
    cfg = json.loads((src / "config.json").read_text())
    width = SIZES.context_dim // 2
    cfg.update(hidden_size=width, num_attention_heads=cfg["num_key_value_heads"], intermediate_size=2 * width)
    for key in ("architectures", "transformers_version", "torch_dtype", "model_type", "head_dim", "dtype"):
        cfg.pop(key, None)
    dst = tmp_path_factory.mktemp("narrow") / "text_encoder"
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(**cfg)).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst)
    return dst


@pytest.fixture
def env(tmp_path, fixtures, fixture_pipe, capsys, caplog, narrow_text_encoder, monkeypatch):
    e = Env(tmp_path, fixtures, fixture_pipe, capsys, caplog, narrow_text_encoder)
    e.monkeypatch = monkeypatch
    return e


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert str(part) in message, f"{part!r} not in the message: {message!r}"


def refused(exc_type, call: Callable, *parts: str):
    """`call()` raises exactly `exc_type` (or a subclass) with a message naming every one of `parts`."""
    with pytest.raises(exc_type) as info:
        call()
    assert_names(str(info.value), *parts)
    return info.value


# =============================================================================== the pipeline
def _pipe_call(env, **kwargs):
    kwargs.setdefault("prompt", "a red fox")
    kwargs.setdefault("output_type", "latent")
    return lambda: env.pipe(**kwargs)


def pipeline_prompt_wrong_type(env):
    refused(TypeError, _pipe_call(env, prompt=42), "`prompt`", "string or a list of strings")


def pipeline_prompt_list_of_non_strings(env):
    error = refused(TypeError, _pipe_call(env, prompt=["a cat", None]), "`prompt[1]`", "must be a string", "NoneType")
    assert "got list" not in str(error)  # the element is named, not the list


def pipeline_negative_prompt_list_of_non_strings(env):
    refused(TypeError, _pipe_call(env, prompt=["a", "b"], negative_prompt=["blur", 3]), "`negative_prompt[1]`",
            "int 3")


def pipeline_negative_prompt_length_mismatch(env):
    refused(ValueError, _pipe_call(env, prompt=["a", "b", "c"], negative_prompt=["x", "y"]),
            "`negative_prompt`", "2 entries", "3", "one per prompt")


def pipeline_generator_list_length_mismatch(env):
    refused(ValueError, _pipe_call(env, prompt=["a", "b"], num_images_per_prompt=2,
                                   generator=[torch.Generator().manual_seed(0)] * 3),
            "`generator`", "3 generators", "4 images")


def pipeline_guidance_nan(env):
    refused(ValueError, _pipe_call(env, guidance_scale=float("nan")), "`guidance_scale`", "finite number >= 0")


def pipeline_guidance_inf(env):
    refused(ValueError, _pipe_call(env, guidance_scale=float("inf")), "`guidance_scale`", "finite number >= 0")


def pipeline_guidance_negative(env):
    refused(ValueError, _pipe_call(env, guidance_scale=-1.0), "`guidance_scale`", ">= 0")


def pipeline_guidance_too_large(env):
    # finite but so large that the guided logits overflow: refused up front, not a sampling crash
    refused(ValueError, _pipe_call(env, guidance_scale=1e308), "`guidance_scale`", "at most 1000")


def pipeline_top_k_zero(env):
    refused(ValueError, _pipe_call(env, top_k=0), "`top_k`", f"[1, {SIZES.vocab_size}]")


def pipeline_top_k_above_codebook(env):
    refused(ValueError, _pipe_call(env, top_k=SIZES.vocab_size + 1), "`top_k`", "codebook size")


def pipeline_top_p_zero(env):
    refused(ValueError, _pipe_call(env, top_p=0.0), "`top_p`", "(0, 1]")


def pipeline_top_p_above_one(env):
    refused(ValueError, _pipe_call(env, top_p=1.5), "`top_p`", "(0, 1]")


def pipeline_unsupported_output_type(env):
    refused(ValueError, _pipe_call(env, output_type="jpeg"), "`output_type`", "'pil'", "'latent'")


def pipeline_zero_images_per_prompt(env):
    refused(ValueError, _pipe_call(env, num_images_per_prompt=0), "`num_images_per_prompt`", "positive integer")


def pipeline_text_encoder_of_wrong_width(env):
    from transformers import AutoModel

    from hart import HARTPipeline

    narrow = AutoModel.from_pretrained(env.narrow_text_encoder)
    pipe = HARTPipeline(tokenizer=env.pipe.tokenizer, text_encoder=narrow, transformer=env.pipe.transformer,
                        vae=env.pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    refused(ValueError, lambda: pipe("a red fox", output_type="latent"), f"hidden size {SIZES.context_dim // 2}", f"context_dim {SIZES.context_dim}")


# =============================================================================== editing images
def _png_bytes(mode="RGB", size=(64, 64)) -> bytes:
    arr = (np.random.default_rng(0).random((size[1], size[0], 4)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _inpaint(env, **kwargs):
    from hart.pipelines import HARTInpaintPipeline

    pipe = HARTInpaintPipeline.from_pipe(env.pipe)
    side = SIZES.image_size
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    kwargs.setdefault("image", Image.new("RGB", (side, side), "grey"))
    kwargs.setdefault("mask_image", Image.fromarray(mask))
    return lambda: pipe("a red fox", output_type="latent", **kwargs)


def image_unreadable(env):
    data = _png_bytes()
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))  # the header reads; the pixels do not
    refused(ValueError, _inpaint(env, image=truncated), "`image`", "cannot be converted to RGB")


def image_zero_sized(env):
    refused(ValueError, _inpaint(env, image=np.zeros((0, 0, 3), np.uint8)), "`image`", "height x width")


def image_given_as_a_file_path(env):
    # paths are never opened on the caller's behalf: the caller opens the file it trusts
    refused(TypeError, _inpaint(env, image=str(env.tmp / "photo.png")), "`image`", "PIL image", "str")


def mask_zero_sized(env):
    refused(ValueError, _inpaint(env, mask_image=np.zeros((0, 64), np.uint8)), "`mask_image`", "height x width")


def image_grey_scale_and_rgba_are_converted(env):
    from hart.editing import prepare_image

    rgba = Image.open(io.BytesIO(_png_bytes("RGBA")))
    grey = Image.open(io.BytesIO(_png_bytes("L")))
    assert torch.equal(prepare_image(rgba, 64), prepare_image(rgba.convert("RGB"), 64))  # alpha dropped
    assert torch.equal(prepare_image(grey, 64), prepare_image(grey.convert("RGB"), 64))  # grey replicated
    assert prepare_image(grey, 64).shape == (1, 3, 64, 64)


# =============================================================================== model loading (via `hart`)
def model_folder_missing(env):
    status, err = env.generate(env.tmp / "nowhere")
    assert status == 2
    assert_names(err, "--model", "not found", "nowhere")
    assert not (env.tmp / "out").exists()


def model_folder_empty(env):
    (env.tmp / "empty").mkdir()
    status, err = env.generate(env.tmp / "empty")
    assert status == 2
    assert_names(err, "--model", "neither", "model_index.json", "llm/ and tokenizer/")
    assert not (env.tmp / "out").exists()


def model_folder_in_neither_layout(env):
    folder = env.tmp / "weights-only"
    folder.mkdir()
    shutil.copy(env.ckpt / "llm" / "model.safetensors", folder)  # a bare weights file is not a model folder
    status, err = env.generate(folder)
    assert status == 2
    assert_names(err, "--model", str(folder), "neither")


def model_official_layout_without_text_encoder(env):
    status, err = env.generate(env.ckpt, text_encoder=None)
    assert status == 2
    assert_names(err, "--text-encoder is required", "official layout")


def model_truncated_safetensors(env):
    model = env.copy_ckpt()
    weights = model / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    status, err = env.generate(model)
    assert status == 2
    assert_names(err, str(weights), "truncated or corrupt")
    assert not (env.tmp / "out").exists()


def model_config_disagrees_with_weights(env):
    model = env.copy_ckpt()
    cfg = json.loads((model / "llm" / "config.json").read_text())
    width = cfg["embed_dim"]  # what the weights hold
    cfg["embed_dim"] = 2 * width
    (model / "llm" / "config.json").write_text(json.dumps(cfg))
    status, err = env.generate(model)
    assert status == 2
    assert_names(err, str(model / "llm" / "model.safetensors"), "shape mismatches", f"file ({width},), model ({2 * width},)")
    assert not (env.tmp / "out").exists()


def _edit_weights(path: Path, edit: Callable[[dict], None]) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def model_missing_keys(env):
    model = env.copy_ckpt()
    _edit_weights(model / "llm" / "model.safetensors", lambda sd: sd.pop("blocks.1.attn.proj.weight"))
    status, err = env.generate(model)
    assert status == 2
    assert_names(err, "model.safetensors", "1 missing keys", "blocks.1.attn.proj.weight")


def model_extra_keys(env):
    model = env.copy_ckpt()
    weights = model / "tokenizer" / "model.safetensors"
    _edit_weights(weights, lambda sd: sd.update({"vae.surprise.weight": torch.ones(2)}))
    status, err = env.generate(model)
    assert status == 2
    assert_names(err, str(weights), "1 unexpected keys", "surprise.weight")


def model_text_encoder_of_wrong_width(env):
    status, err = env.generate(env.ckpt, text_encoder=env.narrow_text_encoder)
    assert status == 2
    assert_names(err, str(env.narrow_text_encoder), f"hidden size {SIZES.context_dim // 2}", f"context_dim {SIZES.context_dim}")
    assert not (env.tmp / "out").exists()


def model_text_encoder_without_tokenizer(env):
    folder = env.tmp / "bare_text_encoder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):  # the model, none of its tokenizer files
        shutil.copy(env.text_encoder / name, folder)
    status, err = env.generate(env.ckpt, text_encoder=folder)
    assert status == 2
    assert_names(err, str(folder), "no usable tokenizer", "tokenizer.json")
    assert not (env.tmp / "out").exists()


class _RunsCode:
    """Unpickling this runs a shell command (creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def model_pickle_that_runs_code_is_refused(env):
    folder = env.tmp / "tokenizer"
    folder.mkdir()
    shutil.copy(env.ckpt / "tokenizer" / "config.json", folder)
    marker = env.tmp / "code-ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"vae.encoder.conv_in.weight": _RunsCode(marker)}, f)
    refused(CheckpointError, lambda: load_official_tokenizer(folder), str(folder / "pytorch_model.bin"),
            "refused", "safetensors")
    assert not marker.exists(), "the pickle ran code"


def convert_into_a_non_empty_folder(env):
    out = env.tmp / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = env.cli("convert", "--model", env.ckpt, "--text-encoder", env.text_encoder, "--out", out)
    assert status == 2
    assert_names(err, "--out", "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def convert_a_broken_model_leaves_no_output(env):
    model = env.copy_ckpt()
    (model / "tokenizer" / "model.safetensors").write_bytes(b"\0" * 16)
    out = env.tmp / "converted"
    status, err = env.cli("convert", "--model", model, "--text-encoder", env.text_encoder, "--out", out)
    assert status == 2
    assert_names(err, "tokenizer", "model.safetensors")
    assert not out.exists()


# =============================================================================== `hart generate` arguments
def cli_guidance_nan(env):
    status, err = env.generate(env.ckpt, "--guidance-scale", "nan")
    assert status == 2
    assert_names(err, "--guidance-scale", "a number in [0, 1000]", "'nan'")
    assert not (env.tmp / "out").exists()


def cli_guidance_too_large(env):
    status, err = env.generate(env.ckpt, "--guidance-scale", "1e308")
    assert status == 2
    assert_names(err, "--guidance-scale", "a number in [0, 1000]")
    assert not (env.tmp / "out").exists()


def cli_top_p_out_of_range(env):
    status, err = env.generate(env.ckpt, "--top-p", "1.5")
    assert status == 2
    assert_names(err, "--top-p", "(0, 1]")


def cli_top_k_zero(env):
    status, err = env.generate(env.ckpt, "--top-k", "0")
    assert status == 2
    assert_names(err, "--top-k", "positive integer")


def cli_empty_negative_prompt(env):
    status, err = env.generate(env.ckpt, "--negative-prompt", " ")
    assert status == 2
    assert_names(err, "--negative-prompt", "empty")


def cli_seed_negative(env):
    status, err = env.generate(env.ckpt, "--seed", "-1")
    assert status == 2
    assert_names(err, "--seed")
    assert not (env.tmp / "out").exists()


def cli_seed_too_large(env):
    status, err = env.generate(env.ckpt, "--seed", str(2**63))
    assert status == 2
    assert_names(err, "--seed")
    assert not (env.tmp / "out").exists()


# =============================================================================== every `hart` command: one line, nothing left
def snapshot(root: Path) -> dict:
    """Every file and folder under `root` -> a hash of its bytes (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def error_lines(err: str) -> list:
    """What a command printed on stderr, less progress bars (tqdm's `%|`)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def cli_refused(env, argv, *parts) -> str:
    """`hart ARGV` exits with status 2 and one error line naming `parts`, no traceback, and every file under
    the test's folder is byte-identical afterwards, with nothing added (a refused run leaves nothing behind)."""
    before = snapshot(env.tmp)
    status, err = env.cli(*argv)
    lines = error_lines(err)
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    assert_names(lines[0], *parts)
    assert snapshot(env.tmp) == before
    return lines[0]


def _model(env) -> list:
    return ["--model", env.ckpt, "--text-encoder", env.text_encoder]


def _gen(env, *extra) -> list:
    return ["generate", "a red fox", *_model(env), "--out", env.tmp / "out", *extra]


def _picture(env, name="photo.png", size=None, colour="grey") -> Path:
    path = env.tmp / name
    Image.new("RGB", size or (SIZES.image_size, SIZES.image_size), colour).save(path)
    return path


def _mask(env) -> Path:
    side = SIZES.image_size
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    Image.fromarray(mask).save(env.tmp / "mask.png")
    return env.tmp / "mask.png"


def _edit(env, command, *extra) -> list:
    argv = [command, "a red fox", "--image", _picture(env), *_model(env), "--out", env.tmp / "edited", *extra]
    return argv + (["--mask", _mask(env)] if command == "inpaint" else [])


def cli_prompts_file_not_utf8(env):
    (env.tmp / "prompts.txt").write_bytes("a café\n".encode("latin-1"))
    cli_refused(env, _gen(env)[:1] + _gen(env)[2:] + ["--prompts-file", env.tmp / "prompts.txt"],
                "--prompts-file", "not UTF-8", "byte 5")


def cli_prompts_file_is_a_folder(env):
    (env.tmp / "prompts").mkdir()
    cli_refused(env, ["generate", *_model(env), "--prompts-file", env.tmp / "prompts", "--out", env.tmp / "o"],
                "--prompts-file", "is a folder; expected a file")


def cli_prompts_file_missing(env):
    cli_refused(env, ["generate", *_model(env), "--prompts-file", env.tmp / "nope.txt"], "--prompts-file",
                "file not found")


def cli_prompts_file_without_prompts(env):
    (env.tmp / "prompts.txt").write_text("\n  \n")
    cli_refused(env, ["generate", *_model(env), "--prompts-file", env.tmp / "prompts.txt"], "holds no prompts")


def cli_prompts_jsonl_line_without_prompt(env):
    (env.tmp / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    cli_refused(env, ["generate", *_model(env), "--prompts-file", env.tmp / "p.jsonl"], "p.jsonl:2", '"prompt" field')


def cli_prompt_and_prompts_file_together(env):
    (env.tmp / "p.txt").write_text("a\n")
    cli_refused(env, _gen(env, "--prompts-file", env.tmp / "p.txt"), "PROMPT or --prompts-file")


def cli_prompt_blank(env):
    cli_refused(env, ["generate", "   ", *_model(env), "--out", env.tmp / "out"], "PROMPT is empty")


def cli_out_is_a_file(env):
    (env.tmp / "out").write_text("mine")
    cli_refused(env, _gen(env), "--out", "is a file; expected a folder")


def cli_out_below_a_file(env):
    (env.tmp / "out").write_text("mine")
    cli_refused(env, ["generate", "a red fox", *_model(env), "--out", env.tmp / "out" / "images"], "--out",
                "cannot be created", "is a file")


def cli_out_read_only_is_refused_before_loading(env):
    import hart.cli
    import hart.cli_args

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    env.monkeypatch.setattr(hart.cli_args, "can_write", read_only)
    env.monkeypatch.setattr(hart.cli, "load_pipeline", never)
    cli_refused(env, _gen(env), "--out", "cannot write in", "Read-only file system")


def cli_disk_full_while_writing_images(env):
    written = []

    def save(image, fp, *args, **kwargs):  # the first PNG fits on the disk, the second is cut short
        Path(fp).write_bytes(b"\x89PNG partial")
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(fp)

    env.monkeypatch.setattr(Image.Image, "save", save)
    status, err = env.cli(*_gen(env, "-n", "2", "--batch-size", "1"))
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert_names(lines[0], "no space left on", str(env.tmp / "out"), "00000_01.png", "run the command again")
    assert sorted(p.name for p in (env.tmp / "out").iterdir()) == ["00000_00.png"]  # no half-written file


def cli_many_images_not_on_a_terminal(env):
    cli_refused(env, _gen(env, "-n", 10000), "-n", "10000 images", "--yes")


def cli_many_images_declined_at_the_terminal(env):
    import hart.cli
    from hart import limits

    env.monkeypatch.setattr(limits, "CONFIRM_IMAGES", 2)
    env.monkeypatch.setattr(hart.cli, "interactive", lambda: True)
    env.monkeypatch.setattr("builtins.input", lambda question: "n")
    line = cli_refused(env, _gen(env, "-n", 3, "--batch-size", 1), "not confirmed", "nothing was written", "--yes")
    assert line.startswith("hart generate: error:")


def cli_too_many_images_even_with_yes(env):
    cli_refused(env, _gen(env, "-n", 10**7, "--yes"), "-n", "at most 1000000")


def cli_later_seeds_leave_the_range(env):
    from hart.limits import MAX_SEED

    cli_refused(env, _gen(env, "--seed", MAX_SEED, "-n", 2), "--seed", f"[0, {MAX_SEED}]", str(MAX_SEED + 1))


def cli_seed_2_63_minus_1(env):
    from hart.limits import MAX_SEED

    cli_refused(env, _gen(env, "--seed", 2**63 - 1, "-n", 2), "--seed", f"[0, {MAX_SEED}]")


def cli_n_zero(env):
    cli_refused(env, _gen(env, "-n", 0), "--num-images", "positive integer")


def cli_batch_size_zero(env):
    cli_refused(env, _gen(env, "--batch-size", 0), "--batch-size", "positive integer")


def cli_top_k_above_the_codebook_leaves_nothing(env):
    cli_refused(env, _gen(env, "--top-k", SIZES.vocab_size + 1), "--top-k", f"[1, {SIZES.vocab_size}]", "codebook")


def cli_unknown_flag(env):
    cli_refused(env, _gen(env, "--steps", 4), "unrecognized arguments", "--steps")


def cli_unknown_command(env):
    cli_refused(env, ["generat", "a fox"], "invalid choice", "'generat'")


def cli_path_with_nul_byte(env):
    cli_refused(env, _gen(env, "--out", "out\0put"), "--out", "no NUL byte")


def cli_device_unknown(env):
    cli_refused(env, _gen(env, "--device", "toaster"), "--device", "'toaster'", "not a torch device")


def cli_from_png_without_metadata(env):
    cli_refused(env, ["generate", "--from-png", _picture(env), "--out", env.tmp / "again"], "--from-png",
                "no hart metadata")


def cli_from_png_is_a_folder(env):
    cli_refused(env, ["generate", "--from-png", env.tmp, "--out", env.tmp / "again"], "--from-png", "is a folder")


def cli_model_training_run_without_pipeline(env):
    run = env.tmp / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    cli_refused(env, ["generate", "a fox", "--model", run, "--out", env.tmp / "out"], "--model", str(run),
                "training run folder", "pipeline/")


def cli_edit_image_is_a_folder(env):
    (env.tmp / "photo.png").mkdir()
    cli_refused(env, ["vary", "a fox", "--image", env.tmp / "photo.png", *_model(env), "--out", env.tmp / "v"],
                "--image", "is a folder")


def cli_edit_mask_missing(env):
    cli_refused(env, ["inpaint", "a fox", "--image", _picture(env), "--mask", env.tmp / "nope.png", *_model(env)],
                "--mask", "file not found")


def cli_edit_image_not_an_image(env):
    (env.tmp / "photo.png").write_text("not a png")
    cli_refused(env, ["vary", "a fox", "--image", env.tmp / "photo.png", *_model(env), "--out", env.tmp / "v"],
                "--image", "not a readable image")


def cli_edit_image_of_another_size(env):
    _picture(env, size=(80, 64))
    cli_refused(env, ["vary", "a fox", "--image", env.tmp / "photo.png", *_model(env), "--out", env.tmp / "v"],
                "--image", "80x64", "--resize")


def cli_edit_out_is_a_file(env):
    (env.tmp / "edited").write_text("mine")
    cli_refused(env, _edit(env, "inpaint"), "--out", "is a file")


def cli_edit_seeds_leave_the_range(env):
    from hart.limits import MAX_SEED

    cli_refused(env, _edit(env, "vary", "--seed", MAX_SEED - 1, "-n", 3), "--seed", f"[0, {MAX_SEED}]")


def cli_edit_many_images_not_on_a_terminal(env):
    cli_refused(env, _edit(env, "outpaint", "--image-size", 32, "-n", 1000), "-n", "1000 images", "--yes")


def cli_vary_keep_scales_too_many_leaves_nothing(env):
    cli_refused(env, _edit(env, "vary", "--keep-scales", 99), "`keep_scales`", f"[0, {SIZES.num_scales - 1}]")


def cli_outpaint_declined_run_leaves_no_canvas(env):
    import hart.cli_edit
    from hart import limits

    env.monkeypatch.setattr(limits, "CONFIRM_IMAGES", 1)
    env.monkeypatch.setattr(hart.cli_edit, "interactive", lambda: True)
    env.monkeypatch.setattr("builtins.input", lambda question: "no")
    cli_refused(env, _edit(env, "outpaint", "--save-canvas", "--image-size", 32, "-n", 2), "not confirmed")


def cli_outpaint_image_covers_the_canvas(env):
    cli_refused(env, _edit(env, "outpaint"), "--offset/--image-size", "covers the whole")


def cli_outpaint_image_size_too_large(env):
    cli_refused(env, _edit(env, "outpaint", "--image-size", 10**9), "--image-size", "[1, 16384]")


def cli_outpaint_image_size_makes_it_too_tall(env):
    argv = _edit(env, "outpaint", "--image-size", 8000)
    _picture(env, size=(4, 64))  # a thin strip: 8000 px wide, it would be 128000 px high
    cli_refused(env, argv, "--image-size", "128000 px high")


def cli_outpaint_offset_too_large(env):
    cli_refused(env, _edit(env, "outpaint", "--offset", 0, 10**12), "--offset", "[-16384, 16384]")


def cli_outpaint_fill_out_of_range(env):
    cli_refused(env, _edit(env, "outpaint", "--fill", 0, 256, 0), "--fill", "[0, 255]")


def cli_inpaint_blend_radius_too_large(env):
    cli_refused(env, _edit(env, "inpaint", "--blend-radius", 10**9), "--blend-radius", "[0, 16384]")


def cli_inpaint_empty_prompt(env):
    argv = _edit(env, "inpaint")
    argv[1] = " "
    cli_refused(env, argv, "PROMPT is empty")


def cli_convert_out_is_a_file(env):
    (env.tmp / "converted").write_text("mine")
    cli_refused(env, ["convert", *_model(env), "--out", env.tmp / "converted"], "--out", "is a file")


def cli_benchmark_out_is_a_file(env):
    (env.tmp / "bench").write_text("mine")
    cli_refused(env, ["benchmark", "--config", "tiny", "--out", env.tmp / "bench"], "--out", "is a file")


def cli_benchmark_iters_zero(env):
    cli_refused(env, ["benchmark", "--iters", 0], "--iters", "positive integer")


# =============================================================================== fine-tuning data
def data_bad_json_line_is_skipped_with_its_number(env):
    from hart.training.data import ImageCaptionFolder

    root = make_folder(env.tmp / "data", n=4)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # line 3 is cut short
    (root / "metadata.jsonl").write_text("\n".join(lines))
    with env.caplog.at_level(logging.WARNING):
        ds = ImageCaptionFolder(root, resolution=64)
    assert len(ds) == 3  # the other lines still count
    assert ds.report.examples["bad metadata line"] == ["metadata.jsonl:3"]
    assert_names(env.caplog.text, "metadata.jsonl, line 3", "not valid JSON", "skipped")


def write_captions(root: Path, captions: dict) -> None:
    rows = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def data_folder_empty(env):
    from hart.training.cli import finetune_main

    (env.tmp / "data").mkdir()
    out = env.tmp / "run"
    argv = ["--pretrained", env.ckpt, "--text_encoder", env.text_encoder, "--data_dir", env.tmp / "data",
            "--output_dir", out]
    assert finetune_main([str(a) for a in argv]) == 2
    assert_names(env.caplog.text, "no images", str(env.tmp / "data"))
    assert not out.exists()


def data_folder_missing(env):
    from hart.training.data import DataError, ImageCaptionFolder

    refused(DataError, lambda: ImageCaptionFolder(env.tmp / "nowhere", resolution=64), "data folder not found",
            "nowhere")


def data_only_unreadable_or_zero_sized_images(env):
    from hart.training.data import DataError, ImageCaptionFolder

    root = env.tmp / "data"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")  # zero bytes
    (root / "garbage.jpg").write_bytes(b"not a jpeg at all")
    write_captions(root, {"empty.png": "a", "garbage.jpg": "b"})
    refused(DataError, lambda: ImageCaptionFolder(root, resolution=64), "no usable image", "2 unreadable",
            "empty.png", "garbage.jpg")


def data_grey_scale_and_rgba_images_are_converted(env):
    from hart.training.data import ImageCaptionFolder

    root = env.tmp / "data"
    root.mkdir()
    Image.open(io.BytesIO(_png_bytes("L", (72, 64)))).save(root / "grey.png")
    Image.open(io.BytesIO(_png_bytes("RGBA", (64, 80)))).save(root / "rgba.png")
    write_captions(root, {"grey.png": "a", "rgba.png": "b"})
    ds = ImageCaptionFolder(root, resolution=64)
    assert ds.report.total == 0
    for i in range(2):
        pixels = ds[(0, i)]["pixel_values"]
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32 and pixels.abs().max() <= 1


def data_truncated_image_is_counted_once(env):
    """An image that passes the scan but fails to decode is replaced in every epoch, and counted once."""
    from hart.training.finetune import FinetuneConfig, finetune

    data = make_folder(env.tmp / "data", n=4, size=(SIZES.image_size + 8, SIZES.image_size + 16))
    whole = (data / "img01.png").read_bytes()
    (data / "img01.png").write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels do not
    cfg = FinetuneConfig(pretrained=str(env.ckpt), text_encoder=str(env.text_encoder), data_dir=str(data),
                         output_dir=str(env.tmp / "run"), batch_size=2, max_steps=4, checkpoint_every=4, ema_decay=0.0)
    with env.caplog.at_level(logging.WARNING):
        result = finetune(cfg)  # 4 steps of 2 images: 2 epochs, the truncated image drawn in each
    assert result.skipped.counts == {"unreadable": 1} and result.skipped.examples == {"unreadable": ["img01.png"]}
    assert "data: 1 skipped: 1 unreadable (e.g. img01.png)" in env.caplog.text
    assert env.caplog.text.count("cannot decode img01.png") >= 2  # it was drawn again, and still counted once


@pytest.fixture(scope="module")
def one_step_checkpoint(fixtures, tmp_path_factory):
    """A finished fine-tuning run of one step on the fixture model (with its checkpoint)."""
    from hart.training.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("ckptrun")
    data = make_folder(root / "data", n=4, size=(SIZES.image_size + 8, SIZES.image_size + 16))
    settings = dict(pretrained=str(fixtures / "ckpt"), text_encoder=str(fixtures / "ckpt" / "text_encoder"),
                    data_dir=str(data), batch_size=2, max_steps=1, checkpoint_every=1, ema_decay=0.0)
    finetune(FinetuneConfig(**settings, output_dir=str(root / "run")))
    return settings, root / "run" / "checkpoints" / "checkpoint-00000001"


def resume_from_an_unfinished_checkpoint(env):
    from hart.training.checkpoint import CheckpointError as TrainCheckpointError
    from hart.training.finetune import FinetuneConfig, finetune

    settings, done = env.request.getfixturevalue("one_step_checkpoint")
    torn = env.tmp / "checkpoint-00000002"
    shutil.copytree(done, torn)
    (torn / "complete.json").unlink()  # as left by a run killed while saving
    cfg = FinetuneConfig(**{**settings, "max_steps": 3}, output_dir=str(env.tmp / "run"), resume=str(torn))
    refused(TrainCheckpointError, lambda: finetune(cfg), str(torn), "not a finished checkpoint", "complete.json")


def resume_from_a_checkpoint_of_another_model(env):
    from hart.training.checkpoint import CheckpointError as TrainCheckpointError
    from hart.training.finetune import FinetuneConfig, finetune

    settings, done = env.request.getfixturevalue("one_step_checkpoint")
    other = env.copy_ckpt("deeper")  # the fixture model with a third transformer block
    cfg = json.loads((other / "llm" / "config.json").read_text())
    (other / "llm" / "config.json").write_text(json.dumps(dict(cfg, depth=3)))
    _edit_weights(other / "llm" / "model.safetensors", lambda sd: sd.update(
        {"blocks.2." + k[len("blocks.1."):]: v.clone() for k, v in list(sd.items()) if k.startswith("blocks.1.")}))
    run = FinetuneConfig(**{**settings, "pretrained": str(other), "max_steps": 2}, output_dir=str(env.tmp / "run"),
                         resume=str(done))
    refused(TrainCheckpointError, lambda: finetune(run), str(done), "model")


# =============================================================================== the web app
def _app_validate(**changes):
    from hart.app.demo import validate

    args = dict(prompt="a red fox", negative_prompt="", seed=7, randomize_seed=False, guidance_scale=4.5, top_k=0,
                top_p=1.0, more_smooth=True, num_images=1)
    args.update(changes)
    return lambda: validate(*args.values(), vocab_size=768, max_images=4)


def app_seed_negative(env):
    import gradio as gr

    refused(gr.Error, _app_validate(seed=-1), "Seed", f"whole number from 0 to {MAX_SEED}")


def app_seed_too_large(env):
    import gradio as gr

    refused(gr.Error, _app_validate(seed=MAX_SEED + 1), "Seed", f"whole number from 0 to {MAX_SEED}")


def app_prompt_wrong_type(env):
    import gradio as gr

    refused(gr.Error, _app_validate(prompt=["a", "list"]), "enter a prompt")


def app_negative_prompt_wrong_type(env):
    import gradio as gr

    refused(gr.Error, _app_validate(negative_prompt=3), "negative prompt", "text")


def app_guidance_nan(env):
    import gradio as gr

    refused(gr.Error, _app_validate(guidance_scale=float("nan")), "Guidance scale", f"from 0 to {MAX_GUIDANCE_SCALE:g}")


def app_top_k_out_of_range(env):
    import gradio as gr

    refused(gr.Error, _app_validate(top_k=769), "Top-k", "from 0 to 768")


def app_top_p_out_of_range(env):
    import gradio as gr

    refused(gr.Error, _app_validate(top_p=0.0), "Top-p", "above 0 and at most 1")


def app_command_line_missing_model(env):
    from hart.app.__main__ import main

    env.capsys.readouterr()
    assert main(["--model", str(env.tmp / "nowhere")]) == 2
    assert_names(env.capsys.readouterr().err, "--model", "not found")


def app_binds_loopback_and_takes_no_paths_from_the_page(env):
    """Safety of loading: 127.0.0.1 unless told otherwise, and no input of the page is a file or path."""
    import gradio as gr

    from hart.app.__main__ import build_parser
    from hart.app.demo import build_demo

    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    demo = build_demo(env.pipe)
    inputs = {i for dep in demo.config["dependencies"] for i in dep["inputs"]}
    kinds = {type(demo.blocks[i]) for i in inputs}
    assert not kinds & {gr.File, gr.UploadButton, gr.FileExplorer, gr.Image}, kinds
    # Dataset: example prompts; ImageEditor: the inpainting tab's uploaded pixels (gradio serves only its own
    # upload cache to it, never a path the page names)
    assert kinds <= {gr.Textbox, gr.Number, gr.Checkbox, gr.Slider, gr.Dataset, gr.ImageEditor}, kinds


# =============================================================================== the catalogue
CASES = [
    # pipeline arguments
    pipeline_prompt_wrong_type, pipeline_prompt_list_of_non_strings, pipeline_negative_prompt_list_of_non_strings,
    pipeline_negative_prompt_length_mismatch,
    pipeline_generator_list_length_mismatch, pipeline_guidance_nan, pipeline_guidance_inf, pipeline_guidance_negative,
    pipeline_guidance_too_large, pipeline_top_k_zero, pipeline_top_k_above_codebook, pipeline_top_p_zero,
    pipeline_top_p_above_one, pipeline_unsupported_output_type, pipeline_zero_images_per_prompt,
    pipeline_text_encoder_of_wrong_width,
    # images given to the editing pipelines
    image_unreadable, image_zero_sized, image_given_as_a_file_path, mask_zero_sized,
    image_grey_scale_and_rgba_are_converted,
    # model loading, through `hart generate` / `hart convert` and the loaders
    model_folder_missing, model_folder_empty, model_folder_in_neither_layout,
    model_official_layout_without_text_encoder, model_truncated_safetensors, model_config_disagrees_with_weights,
    model_missing_keys, model_extra_keys, model_text_encoder_of_wrong_width, model_text_encoder_without_tokenizer,
    model_pickle_that_runs_code_is_refused,
    convert_into_a_non_empty_folder, convert_a_broken_model_leaves_no_output,
    # `hart generate` arguments
    cli_guidance_nan,
    cli_guidance_too_large,
    cli_top_p_out_of_range, cli_top_k_zero, cli_empty_negative_prompt,
    cli_seed_negative,
    cli_seed_too_large,
    # every `hart` command: one error line, nothing written
    cli_prompts_file_not_utf8, cli_prompts_file_is_a_folder, cli_prompts_file_missing, cli_prompts_file_without_prompts,
    cli_prompts_jsonl_line_without_prompt, cli_prompt_and_prompts_file_together, cli_prompt_blank, cli_out_is_a_file,
    cli_out_below_a_file, cli_out_read_only_is_refused_before_loading, cli_disk_full_while_writing_images,
    cli_many_images_not_on_a_terminal, cli_many_images_declined_at_the_terminal, cli_too_many_images_even_with_yes,
    cli_later_seeds_leave_the_range, cli_seed_2_63_minus_1, cli_n_zero, cli_batch_size_zero,
    cli_top_k_above_the_codebook_leaves_nothing, cli_unknown_flag, cli_unknown_command, cli_path_with_nul_byte,
    cli_device_unknown, cli_from_png_without_metadata, cli_from_png_is_a_folder, cli_model_training_run_without_pipeline,
    cli_edit_image_is_a_folder, cli_edit_mask_missing, cli_edit_image_not_an_image, cli_edit_image_of_another_size,
    cli_edit_out_is_a_file, cli_edit_seeds_leave_the_range, cli_edit_many_images_not_on_a_terminal,
    cli_vary_keep_scales_too_many_leaves_nothing, cli_outpaint_declined_run_leaves_no_canvas,
    cli_outpaint_image_covers_the_canvas, cli_outpaint_image_size_too_large, cli_outpaint_image_size_makes_it_too_tall,
    cli_outpaint_offset_too_large, cli_outpaint_fill_out_of_range, cli_inpaint_blend_radius_too_large,
    cli_inpaint_empty_prompt, cli_convert_out_is_a_file, cli_benchmark_out_is_a_file, cli_benchmark_iters_zero,
    # fine-tuning data and checkpoints
    data_bad_json_line_is_skipped_with_its_number, data_folder_empty, data_folder_missing,
    data_only_unreadable_or_zero_sized_images, data_grey_scale_and_rgba_images_are_converted,
    data_truncated_image_is_counted_once,
    resume_from_an_unfinished_checkpoint,
    resume_from_a_checkpoint_of_another_model,
    # the web app
    app_seed_negative, app_seed_too_large, app_prompt_wrong_type, app_negative_prompt_wrong_type, app_guidance_nan,
    app_top_k_out_of_range, app_top_p_out_of_range, app_command_line_missing_model,
    app_binds_loopback_and_takes_no_paths_from_the_page,
]


def _case_id(case) -> str:
    fn = case.values[0] if hasattr(case, "values") else case
    return fn.__name__


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(case, env, request):
    env.request = request
    case(env)


def test_the_catalogue_covers_every_area():
    names = [_case_id(c) for c in CASES]
    assert len(names) == len(set(names)) >= 25
    for area in ("pipeline_", "image_", "model_", "cli_", "data_", "resume_", "app_"):
        assert sum(n.startswith(area) for n in names) >= 2, area
