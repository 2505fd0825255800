"""Command lines of the two training programs (`scripts/finetune.py`, `scripts/train_tokenizer.py`,
and the `hart` command): argument parsers mapping one to one onto `hart.training.config`.

Every `--an_option` is also accepted as `--an-option`. Errors about the data, a cache or a
checkpoint end the program with a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from hart.training.cache import CacheMismatchError
from hart.training.checkpoint import CheckpointError
from hart.training.config import FinetuneConfig, TokenizerTrainConfig
from hart.training.data import DataError

USER_ERRORS = (DataError, CacheMismatchError, CheckpointError, FileNotFoundError)


def flag(group, name: str, **kwargs) -> None:
    """Add `--an_option`, also spelled `--an-option` (the `hart` command line's style)."""
    spellings = [name] + ([name.replace("_", "-")] if "_" in name else [])
    group.add_argument(*spellings, **kwargs)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune the HART transformer on captioned images.")
    g = p.add_argument_group("model and data")
    flag(g, "--pretrained", required=True, help="HARTPipeline folder, or official HART folder (llm/ + tokenizer/)")
    flag(g, "--text_encoder", help="text model folder (only with an official HART folder)")
    flag(g, "--data_dir", help="images with metadata.jsonl, metadata.csv or .txt captions")
    flag(g, "--output_dir", required=True, help="checkpoints/, logs/, validation/ and the exported pipeline/")
    flag(g, "--crop", choices=("center", "random"), default="center")
    flag(g, "--flip", action="store_true", help="random horizontal flips")
    flag(g, "--min_image_size", type=int, help="skip smaller images (default: the model's resolution)")
    flag(g, "--num_workers", type=int, default=0, help="data loader worker processes")
    flag(g, "--no_system_prompt", dest="use_system_prompt", action="store_false",
         help="encode captions without the release's prompt-enhancer system prompt")
    g = p.add_argument_group("cache")
    flag(g, "--cache_dir", help="pre-encoded data: built here from --data_dir if absent, then trained on")
    flag(g, "--cache_dtype", choices=("float32", "bfloat16", "float16"), default="float32",
         help="storage type of the cached text features")
    flag(g, "--cache_only", action="store_true", help="build the cache and stop")
    g = p.add_argument_group("optimisation")
    flag(g, "--max_steps", type=int, default=1000)
    flag(g, "--batch_size", type=int, default=4, help="images per process and micro-batch")
    flag(g, "--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    flag(g, "--lr", type=float, default=1e-4)
    flag(g, "--weight_decay", type=float, default=0.0)
    flag(g, "--warmup_steps", type=int, default=0)
    flag(g, "--min_lr_ratio", type=float, default=0.0, help="cosine decay floor, as a fraction of --lr")
    flag(g, "--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    flag(g, "--mixed_precision", choices=("no", "bf16"),
         help="bf16 autocast (default: what the accelerate config or launch flags say)")
    flag(g, "--gradient_checkpointing", action="store_true")
    flag(g, "--cond_drop_rate", type=float, help="text dropout for guidance (default: the model's)")
    flag(g, "--ema_decay", type=float, default=0.9999, help="0 disables the EMA")
    flag(g, "--seed", type=int, default=0)
    g = p.add_argument_group("LoRA")
    flag(g, "--lora_rank", type=int, default=0, help="0: full fine-tuning")
    flag(g, "--lora_alpha", type=float, help="default: the rank")
    flag(g, "--lora_diffusion_head", action="store_true", help="adapters in the diffusion head too")
    g = p.add_argument_group("checkpoints and feedback")
    flag(g, "--checkpoint_every", type=int, default=500)
    flag(g, "--keep_checkpoints", type=int, default=2)
    flag(g, "--resume", help="'latest' or a checkpoint folder")
    flag(g, "--validation_prompt", dest="validation_prompts", action="append", default=[],
         help="a prompt for the validation grid (repeat the flag for several)")
    flag(g, "--validation_every", type=int, default=0, help="steps between validation grids (0: at the end)")
    flag(g, "--validation_guidance", type=float, default=4.5)
    flag(g, "--tensorboard", action="store_true", help="also log to TensorBoard (needs `tensorboard`)")
    flag(g, "--export_weights", choices=("ema", "raw"), default="ema")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = vars(args)
    values["validation_prompts"] = tuple(values["validation_prompts"])
    return FinetuneConfig(**values)


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    args = finetune_parser().parse_args(argv)
    _logging()
    from hart.training.finetune import finetune  # the training stack loads only when used

    try:
        result = finetune(config_from_args(args))
    except USER_ERRORS as e:
        logging.getLogger(__name__).error("%s", e)
        return 2
    if result.stopped_early:
        logging.getLogger(__name__).warning("stopped at step %d; resume with --resume latest", result.step)
    return 0


def tokenizer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train or fine-tune the HART hybrid tokenizer.")
    g = p.add_argument_group("model and data")
    start = g.add_mutually_exclusive_group(required=True)
    flag(start, "--pretrained", help="HybridTokenizer folder, HARTPipeline folder, or official tokenizer folder")
    flag(start, "--model_config", help="JSON file of HybridTokenizer arguments (train from scratch)")
    flag(g, "--data_dir", required=True, help="a folder of images (captions are not needed)")
    flag(g, "--output_dir", required=True, help="checkpoints/, logs/ and the trained tokenizer/")
    flag(g, "--trainable", choices=("all", "decoder"), default="all",
         help="'decoder': keep encoder, codebook and quant_conv frozen (the paper's hybrid stage)")
    flag(g, "--crop", choices=("center", "random"), default="center")
    flag(g, "--flip", action="store_true")
    flag(g, "--min_image_size", type=int, help="skip smaller images (default: the tokenizer's resolution)")
    flag(g, "--num_workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    flag(g, "--max_steps", type=int, default=1000)
    flag(g, "--batch_size", type=int, default=8, help="images per process and micro-batch")
    flag(g, "--grad_accum", type=int, default=1)
    flag(g, "--lr", type=float, default=1e-4)
    flag(g, "--weight_decay", type=float, default=0.0)
    flag(g, "--warmup_steps", type=int, default=0)
    flag(g, "--min_lr_ratio", type=float, default=0.0)
    flag(g, "--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    flag(g, "--mixed_precision", choices=("no", "bf16"),
         help="bf16 autocast (default: what the accelerate config or launch flags say)")
    flag(g, "--seed", type=int, default=0)
    g = p.add_argument_group("loss")
    flag(g, "--recon_weight", type=float, default=1.0)
    flag(g, "--skip_continuous_prob", type=float, default=0.5,
         help="probability of training a batch on the discrete latent alone")
    flag(g, "--restart_dead_codes_every", type=int, default=0,
         help="every N steps, move codes unused in those steps onto live residuals (0: off)")
    flag(g, "--restart_until_step", type=int, default=None, help="last step with restarts (default: 80%% of max_steps)")
    flag(g, "--disc_weight", type=float, default=0.0, help="PatchGAN generator loss weight (0: no GAN)")
    flag(g, "--disc_start_step", type=int, default=0, help="steps before the discriminator joins")
    g = p.add_argument_group("checkpoints and feedback")
    flag(g, "--checkpoint_every", type=int, default=500)
    flag(g, "--keep_checkpoints", type=int, default=2)
    flag(g, "--resume", help="'latest' or a checkpoint folder")
    flag(g, "--tensorboard", action="store_true")
    return p


def tokenizer_main(argv: Optional[Sequence[str]] = None) -> int:
    args = tokenizer_parser().parse_args(argv)
    _logging()
    from hart.training.tokenizer_training import train_tokenizer  # the training stack loads only when used

    try:
        target = train_tokenizer(TokenizerTrainConfig(**vars(args)))
    except USER_ERRORS as e:
        logging.getLogger(__name__).error("%s", e)
        return 2
    if target is None:
        logging.getLogger(__name__).warning("stopped early; resume with --resume latest")
    return 0
