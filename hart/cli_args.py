"""What every `hart` command (and `python -m hart.app`) shares: argument types, the model, device,
dtype and sampling flags, and loading the pipeline they name.

Import-light on purpose: torch, accelerate and diffusers are imported when a command runs, so that
`hart --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from hart import limits

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METADATA_KEY = "hart"  # PNG text chunk holding the JSON of everything needed to regenerate the image
# Sampling flags and their values when not given (flags default to None so a replay can tell what was given;
# guidance None: the model's own, filled in once the model is loaded).
SAMPLING_DEFAULTS = dict(seed=limits.SEED, guidance_scale=None, top_k=None, top_p=None,
                         more_smooth=limits.MORE_SMOOTH, negative_prompt=None, prune=1.0, compact_text=True,
                         bf16_cache=False)
DEFAULT_PRUNE_KEEP = 0.25  # a bare --prune; the same as hart.pruning.DEFAULT_KEEP (kept here: --help imports no torch)


class UsageError(Exception):
    """Bad command-line input: reported as a one-line message, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the single line `PROG: error: MESSAGE` (status 2), no usage dump."""

    def error(self, message: str):
        message = " ".join(message.split())  # an argument's own line breaks (`-\r`) would split the line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def debug_requested() -> bool:
    """`HART_DEBUG=1`: every command line (`hart`, the training scripts) raises bad input with its full
    traceback instead of printing one line."""
    return os.environ.get("HART_DEBUG") == "1"


def checked(kind, ok, what: str):
    """An argparse `type=` that parses with `kind` and rejects values failing `ok`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, "an integer >= 0")
PIXELS = checked(int, lambda v: 0 <= v <= limits.MAX_IMAGE_SIDE, f"an integer in [0, {limits.MAX_IMAGE_SIDE}]")
OFFSET = checked(int, lambda v: abs(v) <= limits.MAX_IMAGE_SIDE,
                 f"an integer in [-{limits.MAX_IMAGE_SIDE}, {limits.MAX_IMAGE_SIDE}]")


def _usable_path(text: str) -> bool:
    """Non-blank, no NUL byte, and short enough for the OS (longer names make `stat` raise, not say no)."""
    parts = os.fsencode(text).split(b"/")
    return text.strip() != "" and "\0" not in text and len(os.fsencode(text)) < 4096 and max(map(len, parts)) < 256


PATH = checked(str, _usable_path, "a file or folder path (not blank, no NUL byte, at most 255 bytes a name)")


# ---- paths ------------------------------------------------------------------------------------------

def input_file(path: str, flag: str) -> Path:
    """`path` as a readable file (not a folder), or UsageError naming `flag`."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; expected a file")
    if not file.is_file():
        raise UsageError(f"{flag}: file not found: {path}")
    if not os.access(file, os.R_OK):
        raise UsageError(f"{flag}: {path} cannot be read (permission denied)")
    return file


def can_write(folder: Path) -> None:
    """Raise OSError unless a file can be created in `folder` (permissions and read-only mounts alike)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """`path` is (or can become) a folder this process can write in; checked without creating it, so
    that a run is refused before any work rather than losing what it made."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} is a file; expected a folder")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag}: {path} cannot be created: {ancestor} is a file")
    try:
        can_write(ancestor)
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {ancestor} ({e.strerror or e})") from None


def save_output(save, path: Path, flag: str = "--out") -> None:
    """`save(path)` into its folder (created on first use); a full disk is one line naming the path, and
    the half-written file is removed (the files written before it are complete)."""
    from hart.training.checkpoint import out_of_space

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path)
    except (OSError, RuntimeError) as e:
        if not out_of_space(e):
            raise
        path.unlink(missing_ok=True)
        raise UsageError(f"{flag}: no space left on {path.parent} while writing {path.name}; the files written "
                         "before it are complete: free some space and run the command again") from None


# ---- run size ---------------------------------------------------------------------------------------

def check_run_size(num_images: int, first_seed: int, yes: bool, interactive: bool) -> None:
    """Refuse a run whose seeds leave [0, MAX_SEED], one too large to plan, or (not on a terminal, where
    no one can be asked) one past CONFIRM_IMAGES without --yes."""
    if num_images > limits.MAX_IMAGES_PER_RUN:
        raise UsageError(f"-n: the run would make {num_images} images; at most {limits.MAX_IMAGES_PER_RUN} a run")
    if first_seed + num_images - 1 > limits.MAX_SEED:
        raise UsageError(f"--seed: image i of the run uses seed+i, so {num_images} images from seed {first_seed} "
                         f"would reach {first_seed + num_images - 1}, outside [0, {limits.MAX_SEED}]: "
                         f"use a seed of at most {limits.MAX_SEED - num_images + 1}")
    if num_images > limits.CONFIRM_IMAGES and not yes and not interactive:
        raise UsageError(f"-n: the run would make {num_images} images (more than {limits.CONFIRM_IMAGES}, which "
                         "can take hours); pass --yes to start it")


def estimates_time(num_images: int) -> bool:
    """Whether a run of `num_images` prints an estimate from its first images' time (`confirm_run`). A
    compiled run then makes one untimed call first: the call that compiles would inflate it."""
    return num_images > limits.CONFIRM_IMAGES


def confirm_run(command: str, num_images: int, done: int, seconds: float, yes: bool) -> None:
    """After the first `done` images took `seconds` (nothing saved yet): print the estimated time of a
    large run and, without --yes, ask on the terminal; a "no" leaves nothing behind."""
    if not estimates_time(num_images):
        return
    left = seconds / done * (num_images - done)
    print(f"hart {command}: {num_images} images; the first {done} took {seconds:.1f} s, so about "
          f"{left / 60:.0f} min more ({time.strftime('%H:%M', time.localtime(time.time() + left))})", flush=True)
    if yes:
        return
    answer = input(f"hart {command}: continue? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was written (pass --yes to skip the question)")


def interactive() -> bool:
    """Whether someone at a terminal can answer a question."""
    return sys.stdin is not None and sys.stdin.isatty()


# ---- flags ------------------------------------------------------------------------------------------

def add_model_arguments(p, required: bool = False) -> None:
    p.add_argument("--model", required=required, type=PATH,
                   help="pipeline folder (model_index.json) or official release folder (llm/ + tokenizer/)"
                        + ("" if required else "; default: the bundled shapes-world model"))
    p.add_argument("--text-encoder", required=required, type=PATH,
                   help="text model folder (Qwen2-VL-1.5B-Instruct for the release); needed with an official folder")


def add_device_arguments(p) -> None:
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", *TORCH_DTYPES],
                   help="weights dtype (default bf16 on cuda, fp32 on cpu); auto: bf16 where the CPU multiplies bf16 "
                        "natively (AMX or AVX512-BF16), else fp32")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights and per-token int8 activations for the transformer blocks (needs torchao: "
                        "pip install 'hart[int8]'); for CPUs without native bf16; changes images slightly")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the transformer blocks and the diffusion MLP: the first image compiles (a "
                        "minute or more on a CPU, which needs a C++ compiler), later ones run faster; images change "
                        "only by float rounding (default off; on in the exact and fast runs of `hart benchmark "
                        "--compare`)")


def add_sampling_arguments(p, what: str = "the images") -> None:
    """Seed, guidance, negative prompt, top-k, top-p, soft codes; unset flags are None (`sampling_settings`)."""
    p.add_argument("--seed", type=checked(int, lambda v: 0 <= v <= limits.MAX_SEED,
                                          f"an integer in [0, {limits.MAX_SEED}]"),
                   help=f"image i of the run uses seed+i (default {limits.SEED})")
    p.add_argument("--guidance-scale", type=checked(float, lambda v: 0 <= v <= limits.MAX_GUIDANCE_SCALE,
                                                     f"a number in [0, {limits.MAX_GUIDANCE_SCALE:g}]"),
                   help="classifier-free guidance (default: the model's own, saved with it; "
                        f"{limits.GUIDANCE_SCALE:g} for the release)")
    p.add_argument("--negative-prompt", type=checked(str, lambda v: v.strip() != "", "a non-empty text"),
                   help=f"what {what} should not show")
    p.add_argument("--top-k", type=POSITIVE_INT, help="top-k sampling (default: the release's schedule)")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                   help="nucleus sampling threshold (default off)")
    p.add_argument("--more-smooth", action=argparse.BooleanOptionalAction,
                   help=f"soft codes (default {'on' if limits.MORE_SMOOTH else 'off'})")
    p.add_argument("--prune", nargs="?", const=DEFAULT_PRUNE_KEEP, metavar="KEEP",
                   type=checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                   help=f"token pruning at the largest scales: the fraction of tokens forwarded at the last one (only "
                        f"those get the residual diffusion), twice that at the one before, and so on while under 1 "
                        f"(bare --prune: {DEFAULT_PRUNE_KEEP:g}; default 1, off); faster, changes images slightly")
    p.add_argument("--compact-text", action=argparse.BooleanOptionalAction,
                   help="attend to the prompt's distinct text positions plus one weighted padding key instead of "
                        "all 300 (default on; the same images up to float rounding)")
    p.add_argument("--bf16-cache", action=argparse.BooleanOptionalAction,
                   help="keep the attention cache (and the pruning cache) in bf16: an fp32 1024 px image peaks 0.7 "
                        "GB lower; changes images by rounding (default off)")


def sampling_settings(args) -> dict:
    """The sampling flags with the defaults filled in."""
    return {k: default if getattr(args, k) is None else getattr(args, k) for k, default in SAMPLING_DEFAULTS.items()}


def check_settings_fit(pipe, settings: dict) -> None:
    """What only the loaded model can tell: --top-k within its codebook; an unset --guidance-scale becomes
    the model's own (so the PNGs record the number used)."""
    if settings["guidance_scale"] is None:
        settings["guidance_scale"] = pipe.config.guidance_scale
    vocab = pipe.transformer.config.vocab_size
    if settings["top_k"] is not None and settings["top_k"] > vocab:
        raise UsageError(f"--top-k: expected an integer in [1, {vocab}] (the model's codebook size), "
                         f"got {settings['top_k']}")


def add_run_arguments(p, default_out: str) -> None:
    """-n, --out and --yes: how many images, where they go, and no question for a large run."""
    p.add_argument("--out", type=PATH, default=default_out, help=f"output folder (default ./{default_out})")
    p.add_argument("--yes", action="store_true",
                   help=f"start a run of more than {limits.CONFIRM_IMAGES} images without asking")


# ---- device, dtype, model ---------------------------------------------------------------------------

def device_and_dtype(device_arg: Optional[str], dtype_arg: Optional[str]):
    """(accelerate's process state, this process's torch device, dtype name) for `--device`/`--dtype`.

    One process without `accelerate launch`; under it, a bare "cuda" means each process's own GPU."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState ignores ACCELERATE_USE_CPU (only Accelerator reads it): without cpu=True a CPU
    # launch would run every process as a lone process 0, each generating everything
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device_arg == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)
    try:
        device = state.device if device_arg in (None, state.device.type) else torch.device(device_arg)
    except RuntimeError:
        raise UsageError(f"--device: {device_arg!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    dtype = dtype_arg or ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "auto":
        from hart.device import auto_dtype

        choice = auto_dtype(device)
        print(f"--dtype auto: {choice.reason}")  # a progress note (stdout), not a warning
        dtype = choice.name
    if dtype == "fp16" and device.type != "cuda":
        raise UsageError(f"--dtype fp16 needs a CUDA device (device is {device.type}); use fp32 or bf16")
    return state, device, dtype


def resolve_model(model: Optional[str]) -> str:
    """The model to load: the one given, else the bundled shapes-world model."""
    if model is not None:
        return model
    from hart.bundled import BUNDLED_MODEL

    if not (Path(BUNDLED_MODEL) / "model_index.json").is_file():
        raise UsageError(f"--model is required: the bundled model is missing from this install ({BUNDLED_MODEL})")
    return BUNDLED_MODEL


def as_recorded(name: Optional[str]) -> Optional[str]:
    """A local folder as an absolute path (so the PNG's metadata works from anywhere), a hub name as is."""
    return str(Path(name).resolve()) if name is not None and Path(name).exists() else name


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hart")
    except PackageNotFoundError:
        return "unknown (not installed)"


def load_pipeline(model: str, text_encoder: Optional[str] = None, device=None, dtype: str = "fp32",
                  use_ema: bool = True, *, int8: bool = False, compile_model: bool = False):
    """HARTPipeline from any layout `hart.loading` reads (this package's `model_index.json`, a training run
    folder's `pipeline/`, the official `llm/` + `tokenizer/`), with the command's flags named in errors;
    `int8` quantizes the transformer blocks (`HARTPipeline.quantize_int8`), `compile_model` compiles them
    and the diffusion MLP (`HARTPipeline.compile_transformer`)."""
    import torch

    from hart import loading
    from hart.device import CompilerMissing
    from hart.pipelines import HARTPipeline

    def flagged(flag, find, name):
        try:
            return find(name)
        except loading.CheckpointError as e:
            raise UsageError(f"{flag}: {e}") from None

    layout, path = flagged("--model", loading.detect_layout, model)
    if layout == "pipeline" and text_encoder is not None:
        raise UsageError(f"--text-encoder: {path} has its own text encoder (model_index.json); drop --text-encoder")
    if layout == "official" and text_encoder is None:
        raise UsageError(f"--text-encoder is required: {path} is in the official layout (llm/ + tokenizer/), "
                         "which has no text encoder; pass the Qwen2 text model folder")
    if text_encoder is not None:
        text_encoder = flagged("--text-encoder", loading.resolve_folder, text_encoder)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    pipe = HARTPipeline.from_folder(path, text_encoder, use_ema=use_ema, torch_dtype=torch_dtype)  # cast while loading
    pipe.set_progress_bar_config(disable=True)
    if {pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} != {torch_dtype}:
        pipe.to(torch_dtype)  # a text encoder that ignored the dtype; only when needed: diffusers 0.42 warns on every cast
    pipe = pipe.to(device) if device is not None else pipe
    if int8:
        try:
            pipe.quantize_int8()
        except ImportError as e:
            raise UsageError(f"--int8: {e}") from None
    if compile_model:
        try:
            pipe.compile_transformer()
        except CompilerMissing as e:
            raise UsageError(f"--compile: {e}") from None
    return pipe


def load_command_pipeline(args):
    """(pipeline, process state, device, dtype name, model) for a command's --model/--text-encoder/--device/--dtype."""
    model = resolve_model(args.model)
    state, device, dtype = device_and_dtype(args.device, args.dtype)
    return (load_pipeline(model, args.text_encoder, device, dtype, int8=args.int8, compile_model=bool(args.compile)),
            state, device, dtype, model)
