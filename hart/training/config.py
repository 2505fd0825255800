"""Settings of the two training programs (every field is also a command-line flag of its script)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


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
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    mixed_precision: Optional[str] = None  # "no" or "bf16"; None: the accelerate config's choice
    gradient_checkpointing: bool = False
    cond_drop_rate: Optional[float] = None  # None keeps the model's configured rate
    ema_decay: float = 0.9999  # 0 disables the EMA
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: Optional[float] = None  # None: equal to the rank
    lora_diffusion_head: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    validation_prompts: Tuple[str, ...] = ()
    validation_every: int = 0  # 0: only at the end
    validation_guidance: float = 4.5
    tensorboard: bool = False
    export_weights: str = "ema"  # "ema" or "raw"


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
