"""Command lines of the two training programs (`scripts/finetune.py`, `scripts/train_tokenizer.py`):
argument parsers mapping one to one onto `hart.training.config`.

Every `--an_option` is also accepted as `--an-option`. Every value is checked when parsed (the
checkers of `hart.training.checks`), then every path, before any model is loaded; a bad input, data,
cache or checkpoint ends the program with one line, `PROG: error: MESSAGE`, and exit status 2
(`HART_DEBUG=1` raises the error with its full traceback instead). Other exceptions are bugs and keep
their traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Callable, Optional, Sequence

from hart.cli_args import OneLineParser, debug_requested
from hart.training.cache import CacheMismatchError
from hart.training.checkpoint import CheckpointError, out_of_space
from hart.training.checks import (FINETUNE_RULES, TOKENIZER_RULES, SettingError,
                                  check_finetune_folders, check_tokenizer_folders)
from hart.training.config import FinetuneConfig, TokenizerTrainConfig
from hart.training.data import DataError

CHECKERS = {**FINETUNE_RULES, **TOKENIZER_RULES}  # the names they share have the same checker
USER_ERRORS = (DataError, CacheMismatchError, CheckpointError, SettingError, FileNotFoundError)
logger = logging.getLogger(__name__)


def flag(group, name: str, **kwargs) -> None:
    """Add `--an_option`, also spelled `--an-option` (the `hart` command line's style). A value is
    parsed by its setting's checker (`hart.training.checks`); `choices` lists stay for --help."""
    dest = kwargs.get("dest", name.lstrip("-"))
    if kwargs.get("action") in (None, "append") and "choices" not in kwargs and dest in CHECKERS:
        kwargs["type"] = CHECKERS[dest]
    spellings = [name] + ([name.replace("_", "-")] if "_" in name else [])
    group.add_argument(*spellings, **kwargs)


def config_defaults(parser: argparse.ArgumentParser, config_cls) -> argparse.ArgumentParser:
    """Give every flag without a default of its own its config field's default (each written once, in
    `hart.training.config`)."""
    parser.set_defaults(**{f.name: f.default for f in dataclasses.fields(config_cls)
                           if f.default is not dataclasses.MISSING and parser.get_default(f.name) is None})
    return parser


def run_program(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], make_config: Callable,
                work: Callable) -> int:
    """Parse `argv`, build and check the config (values, then paths), then `work(config)` -> exit status.

    Bad input of any kind is logged as one line and gives status 2; with `HART_DEBUG=1` it is raised.
    """
    _logging()
    try:
        args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    except SystemExit as e:  # --help (0), or a usage error already printed as one line (2)
        return int(e.code or 0)
    try:
        return work(make_config(args))
    except (*USER_ERRORS, OSError) as e:
        if debug_requested() or isinstance(e, OSError) and not out_of_space(e):
            raise
        if isinstance(e, OSError):  # a full disk outside a checkpoint save (those say more): the metrics log, a cache
            e = f"no space left on {e.filename or 'the disk'} ({e.strerror}): free some space, then continue the run " \
                "with --resume latest (or start it again with --overwrite if it saved no checkpoint)"
        logger.error("%s: error: %s", parser.prog, " ".join(str(e).split()))
        return 2


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def finetune_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="finetune.py", description="Fine-tune the HART transformer on captioned images.")
    g = p.add_argument_group("model and data")
    flag(g, "--pretrained", default="bundled",
         help="HARTPipeline folder, training run folder (its pipeline/), official HART folder (llm/ + tokenizer/), "
              "or `bundled`: the shipped shapes-world model (default)")
    flag(g, "--text_encoder", help="text model folder (only with an official HART folder)")
    flag(g, "--data_dir", help="images with metadata.jsonl, metadata.csv or .txt captions")
    flag(g, "--output_dir", required=True, help="checkpoints/, logs/, validation/ and the exported pipeline/")
    flag(g, "--crop", choices=("center", "random"))
    flag(g, "--flip", action="store_true", help="random horizontal flips")
    flag(g, "--min_image_size", help="skip smaller images (default: the model's resolution)")
    flag(g, "--num_workers", help="data loader worker processes")
    flag(g, "--no_system_prompt", dest="use_system_prompt", action="store_false",
         help="encode captions without the release's prompt-enhancer system prompt")
    g = p.add_argument_group("cache")
    flag(g, "--cache_dir", help="pre-encoded data: built here from --data_dir if absent, then trained on")
    flag(g, "--cache_dtype", choices=("float32", "bfloat16", "float16"),
         help="storage type of the cached text features")
    flag(g, "--cache_only", action="store_true", help="build the cache and stop")
    g = p.add_argument_group("optimisation")
    flag(g, "--max_steps")
    flag(g, "--batch_size", help="images per process and micro-batch")
    flag(g, "--grad_accum", help="micro-batches per optimizer step")
    flag(g, "--lr", help="default: 3e-3 with LoRA, 1e-4 for full fine-tuning")
    flag(g, "--weight_decay")
    flag(g, "--warmup_steps")
    flag(g, "--min_lr_ratio", help="cosine decay floor, as a fraction of --lr")
    flag(g, "--max_grad_norm", help="0 disables clipping")
    flag(g, "--mixed_precision", choices=("no", "bf16"),
         help="bf16 autocast (default: what the accelerate config or launch flags say)")
    flag(g, "--gradient_checkpointing", action="store_true")
    flag(g, "--cond_drop_rate", help="text dropout for guidance (default: the model's)")
    flag(g, "--ema_decay", help="0 disables the EMA")
    flag(g, "--seed")
    g = p.add_argument_group("LoRA")
    flag(g, "--lora_rank", help="adapter rank (default 16); 0: full fine-tuning")
    flag(g, "--lora_alpha", help="default: the rank")
    flag(g, "--lora_targets", nargs="+", metavar="GROUP",
         help="layer groups that get adapters, some of: attention mlp modulation context head diffusion")
    flag(g, "--new_words",
         help="caption words that get text tokens of their own: 'none' (default), 'auto' (words the tokenizer spells "
              "letter by letter and the model's own captions never use), or a comma-separated list")
    g = p.add_argument_group("image tokenizer")
    flag(g, "--adapt_tokenizer", choices=("auto", "always", "never"),
         help="train the tokenizer's decoder on your images first: 'auto' when they reconstruct 3 dB worse "
              "than the model's own world (default)")
    flag(g, "--tokenizer_steps", help="decoder training steps when adapting")
    flag(g, "--refine_decoder", choices=("auto", "always", "never"),
         help="after training, refine the exported decoder on latents the fine-tuned model draws for your images "
              "and the model's world: 'auto' when the model's decoder was refined so (the bundled model's was; default)")
    flag(g, "--refine_steps", help="decoder training steps when refining")
    g = p.add_argument_group("prior preservation")
    flag(g, "--prior_ratio",
         help="fraction of the training images that are prior samples of the base model's world (0: off; default "
              "0.5 where the model declares a world or --prior_prompts is given, else off)")
    flag(g, "--prior_images", help="how many prior samples to make (once, into OUTPUT/prior/)")
    flag(g, "--prior_prompts",
         help="a file of prompts, one per line, for the base model to draw the prior samples from "
              "(needed when the model declares no world)")
    flag(g, "--prior_distill",
         help="LoRA: weight of a loss that holds the token predictions on prior samples to the base model's "
              "(the adapters turned off); default 1 with prior samples, 0: off")
    g = p.add_argument_group("checkpoints and feedback")
    flag(g, "--checkpoint_every")
    flag(g, "--keep_checkpoints")
    flag(g, "--resume", help="'latest' or a checkpoint folder")
    flag(g, "--overwrite", action="store_true",
         help="start over in an --output_dir holding an earlier run: it is moved to OUTPUT_DIR.old-N, not deleted")
    flag(g, "--validation_prompt", dest="validation_prompts", action="append", default=[],
         help="a prompt for the validation grid (repeat the flag for several)")
    flag(g, "--validation_every", help="steps between validation grids (0: at the end)")
    flag(g, "--validation_guidance", help="guidance of the validation images and the old-world check (default: the "
                                         "base model's own)")
    flag(g, "--validation_world_prompts",
         help="with a model of the shapes world: ShapesEval prompts scored at each validation and at step 0, "
              "logged as old_world_score (0: none)")
    flag(g, "--tensorboard", action="store_true", help="also log to TensorBoard (needs `tensorboard`)")
    flag(g, "--export_weights", choices=("ema", "raw"))
    return config_defaults(p, FinetuneConfig)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = vars(args)
    values["validation_prompts"] = tuple(values["validation_prompts"])
    values["lora_targets"] = tuple(values["lora_targets"])
    return FinetuneConfig(**values)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The checked config of parsed arguments: values (`SettingError`), then every path."""
    cfg = config_from_args(args)
    check_finetune_folders(cfg)
    return cfg


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    return run_program(finetune_parser(), argv, finetune_config, _finetune)


def _finetune(cfg: FinetuneConfig) -> int:
    from hart.training.finetune import finetune  # the training stack loads only when used

    result = finetune(cfg)
    if result.stopped_early:
        logger.warning("stopped at step %d; resume with --resume latest", result.step)
    return 0


def tokenizer_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_tokenizer.py", description="Train or fine-tune the HART hybrid tokenizer.")
    g = p.add_argument_group("model and data")
    start = g.add_mutually_exclusive_group(required=True)
    flag(start, "--pretrained", help="HybridTokenizer, HARTPipeline or training run folder, or official tokenizer folder")
    flag(start, "--model_config", help="JSON file of HybridTokenizer arguments (train from scratch)")
    flag(g, "--data_dir", required=True, help="a folder of images (captions are not needed)")
    flag(g, "--output_dir", required=True, help="checkpoints/, logs/ and the trained tokenizer/")
    flag(g, "--trainable", choices=("all", "decoder"),
         help="'decoder': keep encoder, codebook and quant_conv frozen (the paper's hybrid stage)")
    flag(g, "--crop", choices=("center", "random"))
    flag(g, "--flip", action="store_true")
    flag(g, "--min_image_size", help="skip smaller images (default: the tokenizer's resolution)")
    flag(g, "--num_workers")
    g = p.add_argument_group("optimisation")
    flag(g, "--max_steps")
    flag(g, "--batch_size", help="images per process and micro-batch")
    flag(g, "--grad_accum")
    flag(g, "--lr")
    flag(g, "--weight_decay")
    flag(g, "--warmup_steps")
    flag(g, "--min_lr_ratio")
    flag(g, "--max_grad_norm", help="0 disables clipping")
    flag(g, "--mixed_precision", choices=("no", "bf16"),
         help="bf16 autocast (default: what the accelerate config or launch flags say)")
    flag(g, "--seed")
    g = p.add_argument_group("loss")
    flag(g, "--recon_weight")
    flag(g, "--skip_continuous_prob",
         help="probability of training a batch on the discrete latent alone")
    flag(g, "--restart_dead_codes_every",
         help="every N steps, move codes unused in those steps onto live residuals (0: off)")
    flag(g, "--restart_until_step", help="last step with restarts (default: 80%% of max_steps)")
    flag(g, "--disc_weight", help="PatchGAN generator loss weight (0: no GAN)")
    flag(g, "--disc_start_step", help="steps before the discriminator joins")
    g = p.add_argument_group("checkpoints and feedback")
    flag(g, "--checkpoint_every")
    flag(g, "--keep_checkpoints")
    flag(g, "--resume", help="'latest' or a checkpoint folder")
    flag(g, "--overwrite", action="store_true",
         help="start over in an --output_dir holding an earlier run: it is moved to OUTPUT_DIR.old-N, not deleted")
    flag(g, "--tensorboard", action="store_true")
    return config_defaults(p, TokenizerTrainConfig)


def tokenizer_config(args: argparse.Namespace) -> TokenizerTrainConfig:
    """The checked config of parsed arguments: values (`SettingError`), then every path."""
    cfg = TokenizerTrainConfig(**vars(args))
    check_tokenizer_folders(cfg)
    return cfg


def tokenizer_main(argv: Optional[Sequence[str]] = None) -> int:
    return run_program(tokenizer_parser(), argv, tokenizer_config, _train_tokenizer)


def _train_tokenizer(cfg: TokenizerTrainConfig) -> int:
    from hart.training.tokenizer_training import train_tokenizer  # the training stack loads only when used

    if train_tokenizer(cfg) is None:
        logger.warning("stopped early; resume with --resume latest")
    return 0
