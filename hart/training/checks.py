"""Checks of the training programs' settings and folders, run before any model is loaded.

Each setting has one checker (argparse `type=` functions built with `hart.cli_args.checked`); the
command lines parse with them and `FinetuneConfig` / `TokenizerTrainConfig` run the same ones on
values given from Python, so both refuse the same inputs with the same message. The folder checks
make sure a run can write where it is told to, and never deletes or overwrites an earlier run:
an `--output_dir` holding one is refused unless the run resumes it or `--overwrite` moves it aside.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Mapping, Optional

from hart.cli_args import PATH, POSITIVE_INT, UsageError, check_output_folder, checked
from hart.data.shapes import CATEGORIES
from hart.data.shapes_dataset import EVAL_PER_CATEGORY
from hart.limits import GUIDANCE_SCALE, MAX_GUIDANCE_SCALE

# Generators are seeded with seed * 1_000_003 + process index, which must stay a 64-bit seed.
MAX_TRAIN_SEED = 2**32 - 1
# What the training programs write into --output_dir; any of them there means an earlier run.
RUN_ENTRIES = ("checkpoints", "logs", "validation", "pipeline", "pipeline.tmp", "run_info.json", "tokenizer",
               ".tmp-tokenizer", "prior", "prior.partial")
MAX_WORLD_PROMPTS = EVAL_PER_CATEGORY * len(CATEGORIES)  # the committed ShapesEval set's size


# the groups of layers LoRA can adapt (their layer patterns: `hart.training.lora.LORA_GROUPS`)
LORA_GROUP_NAMES = ("attention", "mlp", "modulation", "context", "head", "diffusion")


class SettingError(ValueError):
    """A training setting (a flag, or a config field given from Python) that cannot be used."""


def one_of(*values: str):
    return checked(str, lambda v: v in values, "one of " + ", ".join(values))


NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, "a whole number >= 0")
POSITIVE_NUMBER = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE_NUMBER = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
DECAY = checked(float, lambda v: 0 <= v < 1, "a number from 0 up to, not including, 1 (0 disables it)")
WORLD_PROMPTS = checked(int, lambda v: 0 <= v <= MAX_WORLD_PROMPTS, f"a whole number from 0 to {MAX_WORLD_PROMPTS}")
SEED = checked(int, lambda v: 0 <= v <= MAX_TRAIN_SEED, f"a whole number from 0 to {MAX_TRAIN_SEED}")
GUIDANCE = checked(float, lambda v: 0 <= v <= MAX_GUIDANCE_SCALE, f"a number from 0 to {MAX_GUIDANCE_SCALE:g}")
TEXT = checked(str, lambda v: v.strip() != "", "a non-empty text")


_COMMON = dict(
    pretrained=PATH, data_dir=PATH, output_dir=PATH, resume=PATH, crop=one_of("center", "random"),
    min_image_size=POSITIVE_INT, num_workers=NON_NEGATIVE_INT,
    max_steps=POSITIVE_INT, batch_size=POSITIVE_INT, grad_accum=POSITIVE_INT, lr=POSITIVE_NUMBER,
    weight_decay=NON_NEGATIVE_NUMBER, warmup_steps=NON_NEGATIVE_INT, min_lr_ratio=FRACTION,
    max_grad_norm=NON_NEGATIVE_NUMBER, mixed_precision=one_of("no", "bf16"), seed=SEED,
    checkpoint_every=POSITIVE_INT, keep_checkpoints=POSITIVE_INT,
)
FINETUNE_RULES = dict(
    _COMMON, text_encoder=PATH, cache_dir=PATH, cache_dtype=one_of("float32", "bfloat16", "float16"),
    cond_drop_rate=FRACTION, ema_decay=DECAY, lora_rank=NON_NEGATIVE_INT, lora_alpha=POSITIVE_NUMBER,
    lora_targets=one_of(*LORA_GROUP_NAMES), adapt_tokenizer=one_of("auto", "always", "never"),
    tokenizer_steps=POSITIVE_INT, refine_decoder=one_of("auto", "always", "never"), refine_steps=POSITIVE_INT,
    new_words=TEXT,
    validation_prompts=TEXT, validation_every=NON_NEGATIVE_INT, validation_guidance=GUIDANCE,
    validation_world_prompts=WORLD_PROMPTS, export_weights=one_of("ema", "raw"), prior_ratio=DECAY,
    prior_images=POSITIVE_INT, prior_prompts=PATH, prior_distill=NON_NEGATIVE_NUMBER,
)
TOKENIZER_RULES = dict(
    _COMMON, model_config=PATH, trainable=one_of("all", "decoder"), recon_weight=NON_NEGATIVE_NUMBER,
    skip_continuous_prob=FRACTION, restart_dead_codes_every=NON_NEGATIVE_INT, restart_until_step=NON_NEGATIVE_INT,
    disc_weight=NON_NEGATIVE_NUMBER, disc_start_step=NON_NEGATIVE_INT,
)
_FLAGS = {"validation_prompts": "--validation_prompt"}


def flag_name(field: str) -> str:
    return _FLAGS.get(field, f"--{field}")


def check_settings(cfg, rules: Mapping[str, object]) -> None:
    """Run every field of `cfg` that has a rule through its command-line checker."""
    for field, check in rules.items():
        value = getattr(cfg, field)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v is None:
                continue
            try:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise argparse.ArgumentTypeError(f"expected a number or text, got {v!r}")
                check(v if isinstance(v, str) else repr(v))
            except argparse.ArgumentTypeError as e:
                raise SettingError(f"{flag_name(field)}: {e}") from None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingError(message)


# ---- folders ---------------------------------------------------------------------------------------

def check_writable_folder(path: Path, flag: str) -> None:
    """`path` is (or can become) a folder this process can write in; checked without creating it."""
    try:
        check_output_folder(path, flag)
    except UsageError as e:
        raise SettingError(str(e)) from None


def earlier_run(out: Path) -> list:
    """The entries of an earlier run in `out` (empty when there is none)."""
    return [name for name in RUN_ENTRIES if (out / name).exists()] if out.is_dir() else []


def check_output_dir(out: Path, resume: Optional[str], overwrite: bool, pretrained: Optional[str]) -> None:
    """Refuse an --output_dir this run cannot write, or one holding an earlier run it would overwrite."""
    check_writable_folder(out, "--output_dir")
    if pretrained is not None and Path(pretrained).exists():
        base, target = Path(pretrained).resolve(), out.resolve()
        require(base != target and target not in base.parents,
                f"--output_dir: {out} holds the --pretrained model {pretrained}: write the new run to another folder")
    found = earlier_run(out)
    if found and resume not in (None, "latest") and Path(resume).absolute().parent != (out / "checkpoints").absolute():
        # resuming prunes the checkpoints of output_dir as it saves: they must be this run's
        raise SettingError(f"--resume: {resume} is not a checkpoint of --output_dir {out}, which holds another run: "
                           "resume into a new --output_dir, or from one of its own checkpoints")
    if found and not resume and not overwrite:
        resumable = any((out / "checkpoints").glob("checkpoint-*/complete.json"))
        go_on = "continue it with --resume latest, or" if resumable else \
            "it has no finished checkpoint for --resume latest to continue from, so"
        raise SettingError(f"--output_dir: {out} holds an earlier run ({', '.join(found)}): {go_on} pass --overwrite "
                           f"to start over (the earlier run is moved to {aside_name(out)}, not deleted)")


def aside_name(out: Path) -> Path:
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}.old-{n}")


def move_earlier_run_aside(out: Path) -> Optional[Path]:
    """Move the entries of an earlier run in `out` into the sibling folder `OUT.old-N`; other files stay."""
    found = earlier_run(out)
    if not found:
        return None
    aside = aside_name(out)
    aside.mkdir()
    for name in found:
        (out / name).rename(aside / name)
    return aside


def _check_common(cfg) -> None:
    from hart.training.checkpoint import CheckpointManager
    from hart.training.data import DataError

    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise DataError(f"--data_dir: data folder not found: {cfg.data_dir}")
    if cfg.resume is not None:  # "latest" needs a finished checkpoint in output_dir; a folder must be one
        CheckpointManager(Path(cfg.output_dir) / "checkpoints", 1, None).resolve(cfg.resume)
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise SettingError("--tensorboard needs the `tensorboard` package (pip install tensorboard)") from None


def check_finetune_folders(cfg) -> None:
    """Every path of a `FinetuneConfig`, checked without loading anything or writing anywhere."""
    from hart.loading import detect_layout, resolve_folder

    detect_layout(cfg.pretrained)
    if cfg.text_encoder is not None:
        resolve_folder(cfg.text_encoder)
    if cfg.cache_dir is not None:
        cache = Path(cfg.cache_dir)
        if not (cache.is_dir() and any(cache.iterdir())):  # else an existing cache, only read
            check_writable_folder(cache, "--cache_dir")
    if cfg.cache_only:  # writes the cache only: output_dir is not touched
        return
    check_output_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite, cfg.pretrained)
    _check_common(cfg)
    if cfg.prior_ratio:
        check_prior_source(cfg)


def check_tokenizer_folders(cfg) -> None:
    """Every path of a `TokenizerTrainConfig`, checked without loading anything or writing anywhere."""
    from hart.loading import resolve_folder

    if cfg.pretrained is not None:
        resolve_folder(cfg.pretrained)
    else:
        check_model_config(Path(cfg.model_config))
    check_output_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite, cfg.pretrained)
    _check_common(cfg)


def check_model_config(path: Path) -> None:
    """A JSON file of `HybridTokenizer` arguments that builds a tokenizer."""
    import torch

    from hart.models.tokenizer import HybridTokenizer

    require(path.is_file(), f"--model_config: no such file: {path}")
    try:
        kwargs = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingError(f"--model_config: {path} is not a JSON file ({e})") from None
    require(isinstance(kwargs, dict), f"--model_config: {path} must hold a JSON object of HybridTokenizer arguments")
    try:
        with torch.device("meta"):  # sizes only: nothing is allocated
            HybridTokenizer(**kwargs)
    except Exception as e:  # a hand-written config can fail anywhere in the constructor
        raise SettingError(f"--model_config: {path} does not describe a HybridTokenizer "
                           f"({type(e).__name__}: {e})") from None


# ---- prior preservation (`hart.training.prior`) ----------------------------------------------------

WORLD_FILE = "bundled.json"  # a model folder's notes on itself: `world` names the world it was trained on
WORLDS = ("shapes",)
PRIOR_DIR = "prior"
PRIOR_INFO = "prior_info.json"


def model_notes(pretrained) -> dict:
    """A model folder's notes on itself (its `bundled.json`): `world` (the world it was trained on) and
    `decoder_refined` (its decoder was refined on latents its transformer drew, `hart.training.decoder_refine`);
    {} where the folder has none."""
    from hart.loading import detect_layout

    layout, folder = detect_layout(pretrained)
    path = folder / WORLD_FILE
    if layout != "pipeline" or not path.is_file():
        return {}
    try:
        notes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingError(f"--pretrained: {path} is not a JSON file ({e})") from None
    if not isinstance(notes, dict):
        raise SettingError(f"--pretrained: {path} must hold a JSON object, not {type(notes).__name__}")
    world = notes.get("world")
    if world is not None and world not in WORLDS:
        raise SettingError(f"--pretrained: {path} declares the world {world!r}; known worlds: {', '.join(WORLDS)}")
    return notes


def model_world(pretrained) -> Optional[str]:
    """The world a model folder declares (`"world"` in its `bundled.json`), or None."""
    return model_notes(pretrained).get("world")


def read_prompts(path) -> List[str]:
    """The non-empty lines of a `--prior_prompts` file."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"--prior_prompts: no such file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SettingError(f"--prior_prompts: {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SettingError(f"--prior_prompts: {path} holds no prompt (one per line)")
    return prompts


def check_prior_source(cfg) -> None:
    """A run with prior preservation has somewhere to take the prior images from."""
    if cfg.prior_prompts is not None:
        read_prompts(cfg.prior_prompts)
    elif model_world(cfg.pretrained) is None:
        raise SettingError(f"--prior_ratio: the model {cfg.pretrained} declares no world to render prior images from "
                           f"(no \"world\" in its {WORLD_FILE}): give --prior_prompts FILE, one prompt per line, for "
                           "the base model to draw them")
    if cfg.resume:  # the prior images of the run it continues must be the ones this run would make
        made_before(Path(cfg.output_dir) / PRIOR_DIR, prior_recipe(cfg))


def model_guidance(pretrained) -> float:
    """The guidance a model samples at by default (`HARTPipeline`'s config in its `model_index.json`; the
    release's for the official layout), read without loading the model."""
    from hart.loading import detect_layout
    from hart.pipelines.pipeline_hart import check_guidance

    layout, folder = detect_layout(pretrained)
    path = folder / "model_index.json"
    if layout != "pipeline" or not path.is_file():
        return GUIDANCE_SCALE
    try:
        guidance = json.loads(path.read_text(encoding="utf-8")).get("guidance_scale", GUIDANCE_SCALE)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SettingError(f"--pretrained: {path} is not a JSON object ({e})") from None
    try:
        check_guidance(guidance, f"the `guidance_scale` of {path}")
    except ValueError as e:
        raise SettingError(f"--pretrained: {e}") from None
    return float(guidance)


def prior_recipe(cfg) -> dict:
    """What decides the prior images (recorded in `prior_info.json`)."""
    if cfg.prior_prompts is not None:
        source = {"prompts": read_prompts(cfg.prior_prompts), "guidance_scale": model_guidance(cfg.pretrained)}
    else:
        source = {"world": model_world(cfg.pretrained)}
    return {"num_images": cfg.prior_images, "seed": cfg.seed, **source}


def made_before(folder: Path, recipe: dict) -> bool:
    """True when `folder` holds the prior images of `recipe`; refused when it holds other ones."""
    if not (folder / PRIOR_INFO).is_file():
        return False
    made = json.loads((folder / PRIOR_INFO).read_text(encoding="utf-8"))
    if made != recipe:
        changed = ", ".join(_RECIPE_WORDS.get(k, k) for k in sorted(set(made) | set(recipe)) if made.get(k) != recipe.get(k))
        raise SettingError(f"{folder} holds prior images made otherwise ({changed} differ): resume with the same "
                           "--prior_images, --prior_prompts (and their contents) and --seed, or start over with --overwrite")
    return True


_RECIPE_WORDS = {"num_images": "--prior_images", "seed": "--seed", "prompts": "--prior_prompts",
                 "world": "the model's world", "guidance_scale": "guidance"}
