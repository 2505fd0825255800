"""Exporting a fine-tuned transformer as a complete `HARTPipeline` folder.

The text encoder, its tokenizer and the image tokenizer are taken unchanged from the pipeline the
run started from; the transformer gets the trained (by default EMA) weights with any LoRA adapters
merged, so `HARTPipeline.from_pretrained(folder)` loads it like any other. With LoRA, the adapter
weights alone are also written beside it (`lora_weights.safetensors`). The base model's own guidance
(its pipeline config) and its `bundled.json` (the world it draws) are kept. Where the run refines the
decoder (`hart.training.decoder_refine.refining_due`), the exported pipeline's decoder is refined on what
the exported transformer draws before it is written, and its `bundled.json` says so.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from hart.models.transformer import HARTTransformer
from hart.pipelines import HARTPipeline
from hart.training.checks import WORLD_FILE, model_notes
from hart.training.decoder_refine import refine_after_finetune, refining_due
from hart.training.lora import add_lora, lora_state_dict, merge_lora
from hart.training.new_words import add_words

logger = logging.getLogger(__name__)


def export_pipeline(accelerator, objective, ema, cfg, out_dir, *, vae=None, new_words=()) -> Optional[Path]:
    """Write the pipeline to `out_dir` (atomically); every process calls this, the main one writes.

    `ema`: the averaged weights to export, or None for the trained weights as they are; `vae`: the image
    tokenizer to export (the run's adapted one), None for the base pipeline's; `new_words`: the words the run gave
    text tokens of their own (`hart.training.new_words`), added again, identically, to the exported text model.
    """
    with ema.swapped() if ema is not None else nullcontext():
        state_dict = accelerator.get_state_dict(objective)  # gathers FSDP shards (a collective)
        # copy now: without FSDP these are the parameters themselves, which the swap restores
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        prefix = "transformer."
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        trained = accelerator.unwrap_model(objective).transformer
        transformer = HARTTransformer.from_config(trained.config)
        if cfg.lora_rank:
            with torch.random.fork_rng(devices=[]):
                add_lora(transformer, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_targets)
            transformer.load_state_dict(state_dict)
            adapters = lora_state_dict(transformer)
            merge_lora(transformer)
        else:
            transformer.load_state_dict(state_dict)
        transformer.requires_grad_(True).eval()

        base = HARTPipeline.from_folder(cfg.pretrained, cfg.text_encoder)
        if new_words:
            add_words(base.tokenizer, base.text_encoder, new_words, cfg.seed)
        notes = model_notes(cfg.pretrained)  # the model's notes on itself (its world) stay true
        pipe = type(base)(tokenizer=base.tokenizer, text_encoder=base.text_encoder, transformer=transformer,
                          vae=base.vae if vae is None else vae, guidance_scale=base.config.guidance_scale)
        if refining_due(cfg):
            done = refine_after_finetune(pipe.to(accelerator.device), cfg, notes.get("world"))
            if done is not None:
                logger.info("%s", done)
                notes["decoder_refined"] = True
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            pipe.save_pretrained(tmp)
            if notes:
                (tmp / WORLD_FILE).write_text(json.dumps(notes, indent=2) + "\n", encoding="utf-8")
            if cfg.lora_rank:
                save_file(adapters, str(tmp / "lora_weights.safetensors"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a torn export (a full disk) must not keep the space
            raise
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        logger.info("exported the pipeline to %s (%s weights)", out_dir, "EMA" if ema is not None else "trained")
    accelerator.wait_for_everyone()
    return out_dir if accelerator.is_main_process else None
