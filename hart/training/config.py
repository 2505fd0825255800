"""Settings of the two training programs (every field is also a command-line flag of its script, whose
default is the field's: `hart.training.cli` reads it from here).

Both check their values when created (`hart.training.checks`): a bad value raises `SettingError`
naming the flag, the same message the command line prints.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from hart.training.checks import FINETUNE_RULES, LORA_GROUP_NAMES, TOKENIZER_RULES, check_settings, model_world, require

# Defaults chosen by measurement (docs/training.md, "Teach the bundled model a new shape"): LoRA on
# every group, and half of the images from the model's own world where it declares one, on which the
# model is held to the base model's predictions.
LORA_RANK = 16
LORA_LR = 3e-3
FULL_LR = 1e-4
PRIOR_RATIO = 0.5
PRIOR_DISTILL = 1.0
_RESUME_OR_OVERWRITE = "--overwrite starts a new run and --resume continues one: give only one of them"


@dataclasses.dataclass
class FinetuneConfig:
    pretrained: str  # HARTPipeline folder, or official layout (llm/ + tokenizer/) with `text_encoder`
    output_dir: str
    data_dir: Optional[str] = None  # may be omitted when `cache_dir` already holds a cache
    text_encoder: Optional[str] = None
    crop: str = "center"
    flip: bool = False
    min_image_size: Optional[int] = None  # None: the model's resolution
    num_workers: int = 0
    cache_dir: Optional[str] = None
    cache_dtype: str = "float32"
    cache_only: bool = False
    use_system_prompt: bool = True
    max_steps: int = 1000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: Optional[float] = None  # None: LORA_LR with LoRA, FULL_LR for full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    mixed_precision: Optional[str] = None  # "no" or "bf16"; None: the accelerate config's choice
    gradient_checkpointing: bool = False
    cond_drop_rate: Optional[float] = None  # None keeps the model's configured rate
    ema_decay: float = 0.9999  # 0 disables the EMA
    lora_rank: int = LORA_RANK  # 0: full fine-tuning
    lora_alpha: Optional[float] = None  # None: equal to the rank
    lora_targets: Tuple[str, ...] = LORA_GROUP_NAMES
    adapt_tokenizer: str = "auto"  # "auto": when the user's images reconstruct 3 dB worse than the world's; "always", "never"
    tokenizer_steps: int = 200  # decoder training steps when adapting
    # "auto": refine the exported decoder on the fine-tuned transformer's drawings when the model's decoder was
    # refined on its own (`"decoder_refined"` in its bundled.json); "always", "never"
    refine_decoder: str = "auto"
    refine_steps: Optional[int] = None  # decoder training steps when refining; None: 300 (`decoder_refine.FINETUNE_STEPS`)
    new_words: str = "none"  # words that get text tokens of their own: "none", "auto" or "word1,word2"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    validation_prompts: Tuple[str, ...] = ()
    validation_every: int = 0  # 0: only at the end
    validation_guidance: Optional[float] = None  # None: the base model's own (`HARTPipeline.config.guidance_scale`)
    validation_world_prompts: int = 64  # old-world prompts scored at each validation (0: none), world models only
    prior_ratio: Optional[float] = None  # fraction of the images that are prior samples (0: off); None: PRIOR_RATIO
    # where the model declares a world or `prior_prompts` is given, else 0
    prior_images: int = 256
    prior_prompts: Optional[str] = None  # a file of prompts for the base model to draw the prior images from
    prior_distill: Optional[float] = None  # weight of the KL to the base model on prior samples (LoRA only);
    # None: PRIOR_DISTILL with LoRA and prior samples, else 0
    tensorboard: bool = False
    export_weights: str = "ema"  # "ema" or "raw"
    overwrite: bool = False  # move an earlier run in output_dir aside (to OUTPUT_DIR.old-N) instead of refusing

    def __post_init__(self):
        check_settings(self, FINETUNE_RULES)
        require(bool(self.data_dir or self.cache_dir), "give --data_dir (the images), or a --cache_dir holding a cache")
        require(self.cache_dir is not None or not self.cache_only, "--cache_only needs --cache_dir (where to build it)")
        require(bool(self.lora_rank) or self.lora_alpha is None, "--lora_alpha configures LoRA: give --lora_rank too")
        require(bool(self.lora_targets), "--lora_targets needs at least one group")
        require(not (self.overwrite and self.resume), _RESUME_OR_OVERWRITE)
        require(self.prior_ratio != 0 or self.prior_prompts is None,
                "--prior_prompts configures prior preservation, which --prior_ratio 0 turns off: drop one of them")
        require(not self.prior_distill or bool(self.lora_rank),
                "--prior_distill compares the model with its LoRA adapters on and off; full fine-tuning "
                "(--lora_rank 0) has no base model at hand: drop --prior_distill")
        require(not self.prior_distill or self.prior_ratio != 0,
                "--prior_distill works on prior samples, which --prior_ratio 0 turns off: drop one of them")


def with_defaults(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with the defaults that depend on other settings filled in: the learning rate (by LoRA or
    full fine-tuning), prior preservation (on where the model declares a world or prompts are given)
    and its distillation (on with LoRA)."""
    lr = cfg.lr if cfg.lr is not None else (LORA_LR if cfg.lora_rank else FULL_LR)
    prior = cfg.prior_ratio
    if prior is None:
        prior = PRIOR_RATIO if cfg.prior_prompts is not None or model_world(cfg.pretrained) else 0.0
    distill = cfg.prior_distill
    if distill is None:
        distill = PRIOR_DISTILL if prior and cfg.lora_rank else 0.0
    require(not distill or bool(prior), f"--prior_distill works on prior samples, and {cfg.pretrained} declares no "
            "world to render them from: give --prior_prompts too, or drop --prior_distill")
    return dataclasses.replace(cfg, lr=lr, prior_ratio=prior, prior_distill=distill)


@dataclasses.dataclass
class TokenizerTrainConfig:
    data_dir: str
    output_dir: str
    pretrained: Optional[str] = None  # HybridTokenizer / HARTPipeline / official tokenizer folder
    model_config: Optional[str] = None  # JSON file of HybridTokenizer arguments, to start from scratch
    trainable: str = "all"  # "all", or "decoder": encoder, codebook and quant_conv frozen (hybrid stage)
    crop: str = "center"
    flip: bool = False
    min_image_size: Optional[int] = None
    num_workers: int = 0
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: Optional[str] = None  # "no" or "bf16"; None: the accelerate config's choice
    recon_weight: float = 1.0
    skip_continuous_prob: float = 0.5
    restart_dead_codes_every: int = 0  # every N steps, codes unused in those N steps move to live residuals (0: off)
    restart_until_step: Optional[int] = None  # no restarts after this step (None: 80% of max_steps)
    disc_weight: float = 0.0  # 0: no discriminator
    disc_start_step: int = 0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    tensorboard: bool = False
    overwrite: bool = False  # move an earlier run in output_dir aside (to OUTPUT_DIR.old-N) instead of refusing

    def __post_init__(self):
        check_settings(self, TOKENIZER_RULES)
        require((self.pretrained is None) != (self.model_config is None),
                "give exactly one of --pretrained (a tokenizer to fine-tune) and --model_config (to start from scratch)")
        require(not (self.overwrite and self.resume), _RESUME_OR_OVERWRITE)
