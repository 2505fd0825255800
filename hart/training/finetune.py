"""Fine-tuning the HART transformer on a captioned image folder, on any `accelerate` set-up.

One run: load a pipeline, read (or pre-encode) the data, then train with the HART objective
(`objective.hart_loss`), AdamW with warm-up and cosine decay, gradient accumulation and clipping,
optional bf16 autocast, gradient checkpointing, EMA and LoRA. The global batch is
`batch_size x processes x grad_accum` images per optimizer step. Checkpoints are atomic and resume
exactly (model, EMA, optimizer, scheduler, data position, every random state); SIGTERM saves one
before exiting. The result is exported as a `HARTPipeline` folder (EMA weights, LoRA merged).
Every setting and path is checked before the model loads, and nothing is written until everything
that can refuse the run has run; an `output_dir` holding another run is refused unless the run resumes
it or `overwrite` moves it aside (`hart.training.checks`). Optionally, batches mix in samples of the
base model's own world (`hart.training.prior`), and validation scores how well the model still draws
that world (`hart.training.heldout`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hart.pipelines import HARTPipeline
from hart.text import SYSTEM_PROMPT, encode_prompts, split_words
from hart.training.cache import CacheSpec, CachedExamples, build_cache, read_cache_info
from hart.training.checkpoint import (CheckpointError, CheckpointManager, describe_mismatch, load_train_state,
                                      load_training_files, out_of_space, save_training_files, space_error)
from hart.training.checks import check_finetune_folders, model_world, move_earlier_run_aside, prior_recipe
from hart.training.config import FinetuneConfig, with_defaults
from hart.training.data import DataError, ImageCaptionFolder, SkipReport
from hart.training.ema import EMA, local_part
from hart.training.encoding import encode_examples, loss_inputs
from hart.training.export import export_pipeline
from hart.training.heldout import WorldCheck, report as validation_report
from hart.training.lora import add_lora, base_model_kl, unused_adapters
from hart.training.new_words import add_words, pick_new_words
from hart.training.objective import hart_loss
from hart.training.tokenizer_adapt import check_and_adapt
from hart.training.prior import MixedBatchSampler, MixedExamples, describe as describe_prior, make_prior_folder, prior_examples
from hart.training.runtime import (MetricsLog, StopRequest, any_process, full_parameters,
                                   mean_over_processes, report_step, sum_over_processes, warmup_cosine)
from hart.training.sampler import ResumableBatchSampler, check_enough_samples
from hart.training.validation import sample_images, save_grid

logger = logging.getLogger(__name__)

METRICS = ["loss", "token_loss", "diffusion_loss", "lr", "grad_norm", "epoch", "images_seen", "images_per_sec",
           "prior_images_seen", "prior_kl", "old_world_score"]
# settings a resumed run must share with the checkpoint (they decide the data order and the state shapes)
RESUME_KEYS = ("batch_size", "grad_accum", "seed", "lora_rank", "lora_targets", "ema_decay", "prior_ratio",
               "prior_images", "new_words")


@dataclasses.dataclass
class FinetuneResult:
    step: int
    stopped_early: bool
    export_dir: Optional[Path]
    log_path: Path
    skipped: SkipReport


class TransformerObjective(torch.nn.Module):
    """The transformer and its loss as one module, so DDP/FSDP see the whole step inside `forward`.

    The frozen quantizer is kept outside the module tree (it is neither trained nor sharded).
    """

    def __init__(self, transformer, quantizer, prior_distill: float = 0.0):
        super().__init__()
        self.transformer = transformer
        self._frozen = (quantizer,)
        self.prior_distill = prior_distill

    def forward(self, cond, x_BLCv_wo_first_l, gt_idx, target_BLCv, generator, *, prior_B=None):
        """(loss, token loss, diffusion loss, prior KL); `prior_B` marks the prior samples of the batch."""
        out = hart_loss(self.transformer, self._frozen[0], cond, x_BLCv_wo_first_l, gt_idx, target_BLCv,
                        generator=generator)
        if not self.prior_distill or prior_B is None:
            return out.loss, out.token_loss, out.diffusion_loss, out.loss.new_zeros(())
        rows_B = prior_B.to(out.logits_BLV.device).bool()
        kl = base_model_kl(self.transformer, cond, x_BLCv_wo_first_l, out, rows_B).mean()
        return out.loss + self.prior_distill * kl, out.token_loss, out.diffusion_loss, kl


def finetune(cfg: FinetuneConfig, step_callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> FinetuneResult:
    """Run (or resume) a fine-tune; `step_callback(step, metrics)` is called after every step."""
    return _Run(with_defaults(cfg)).train(step_callback)


class _Run:
    def __init__(self, cfg: FinetuneConfig):
        check_finetune_folders(cfg)  # the values were checked when `cfg` was made
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision)
        self.device = self.acc.device
        self.pipe = HARTPipeline.from_folder(cfg.pretrained, cfg.text_encoder)
        self.transformer, self.vae = self.pipe.transformer, self.pipe.vae.requires_grad_(False).eval()
        self.patch_nums = self.transformer.patch_nums
        self.resolution = self.patch_nums[-1] * self.vae.downsample_factor
        self.system_prompt = SYSTEM_PROMPT if cfg.use_system_prompt else None
        self.text_encoder = self.pipe.text_encoder.requires_grad_(False).eval().to(self.device)
        self.vae.to(self.device)
        self.dataset = self._dataset()
        self.val_cond = None
        if cfg.validation_prompts:
            self.val_cond = self._encode(list(cfg.validation_prompts))
        self.guidance = self.pipe.config.guidance_scale if cfg.validation_guidance is None else cfg.validation_guidance
        self.world_check = None
        if cfg.validation_world_prompts and model_world(cfg.pretrained) == "shapes":
            self.world_check = WorldCheck(cfg.validation_world_prompts, self._encode, cfg.seed, self.guidance)
        if cfg.cache_dir and not cfg.prior_ratio:  # batches come from the cache (prior samples: once they are cached)
            self._drop_encoders()

    def _encode(self, prompts):
        return encode_prompts(prompts, self.text_encoder, self.pipe.tokenizer, self.transformer.config.context_tokens,
                              self.system_prompt)

    def _drop_encoders(self) -> None:
        """Free the encoders' memory: training batches come from a cache."""
        self.text_encoder = self.pipe.text_encoder = None
        self.vae.encoder.to("cpu")

    # ---- set-up --------------------------------------------------------------------------------
    def _new_words(self, captions) -> None:
        """Tokens of their own for the captions' new words (`hart.training.new_words`); a warning for the
        other words the tokenizer spells out."""
        cfg, tokenizer = self.cfg, self.pipe.tokenizer
        known = prior_recipe(cfg) if cfg.new_words == "auto" and cfg.prior_ratio else None  # what the model's captions say
        self.new_words = pick_new_words(cfg.new_words, tokenizer, captions, known)
        if self.new_words:
            add_words(tokenizer, self.text_encoder, self.new_words, cfg.seed)
            logger.info("new words get text tokens of their own (the tokenizer spelled them letter by letter, and the "
                        "model's own captions never use them): %s", ", ".join(self.new_words))
        words = split_words(tokenizer, captions)
        if words:
            logger.warning("the text tokenizer spells out %d caption word(s) letter by letter (%s): the model "
                           "learns such words slowly, if at all; words it knows whole learn faster (--new_words gives "
                           "words tokens of their own)",
                           len(words), ", ".join(words[:10]) + (", ..." if len(words) > 10 else ""))

    def _dataset(self):
        cfg = self.cfg
        if cfg.cache_dir is None:
            folder = ImageCaptionFolder(cfg.data_dir, self.resolution, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed,
                                        min_size=cfg.min_image_size)
            self._new_words([entry.caption for entry in folder.entries])
            return folder
        cache, source = Path(cfg.cache_dir), None
        if not cache.exists() or not any(cache.iterdir()):  # else it must be a cache (checked when read)
            if cfg.data_dir is None:
                raise DataError(f"no cache in {cfg.cache_dir} yet: give the data folder (--data_dir) to build it")
            source = ImageCaptionFolder(cfg.data_dir, self.resolution, crop="center", flip=False, seed=cfg.seed,
                                        min_size=cfg.min_image_size)
        self._new_words([e.caption for e in source.entries] if source else read_cache_info(cache).get("captions", []))
        spec = CacheSpec.create(self.vae, self.text_encoder, self.pipe.tokenizer, system_prompt=self.system_prompt,
                                max_length=self.transformer.config.context_tokens, patch_nums=self.patch_nums,
                                resolution=self.resolution, crop=cfg.crop, flip=cfg.flip,
                                features_dtype=cfg.cache_dtype)
        if source is not None:
            check_enough_samples(len(source), cfg.batch_size, self.acc.num_processes)  # before the work of caching
            build_cache(cfg.cache_dir, source, spec, self.vae, self.text_encoder, self.pipe.tokenizer,
                        system_prompt=self.system_prompt, state=self.acc, batch_size=cfg.batch_size)
        return CachedExamples(cfg.cache_dir, spec, cfg.seed)

    def _model(self):
        cfg, tr = self.cfg, self.transformer
        if cfg.cond_drop_rate is not None:
            tr.register_to_config(cond_drop_rate=cfg.cond_drop_rate)
        tr.gradient_checkpointing = cfg.gradient_checkpointing
        self.lora_targets = []
        if cfg.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the adapters' initialisation
                self.lora_targets = add_lora(tr, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_targets)
            if self.tokenizer_adapted:  # the head draws the residual, part of what the adapted decoder reads
                tr.diffusion_head.requires_grad_(True)
                logger.info("the tokenizer was adapted: the diffusion head trains in full, besides the adapters")
        tr.to(self.device).train()
        params = [p for p in tr.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        objective = TransformerObjective(tr, self.vae.quantize, cfg.prior_distill)
        self.objective, self.optimizer = self.acc.prepare(objective, optimizer)
        named = [(n, p) for n, p in self.acc.unwrap_model(self.objective).named_parameters() if p.requires_grad]
        self.ema = EMA(named, cfg.ema_decay) if cfg.ema_decay > 0 else None
        rank = self.acc.process_index
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + rank)
        self.step, self.consumed, self.images_seen = 0, 0, 0

    def _run_info(self) -> dict:
        cfg, acc = self.cfg, self.acc
        return {
            "num_processes": acc.num_processes, "distributed_type": acc.distributed_type.name,
            "per_process_batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "global_batch_size": cfg.batch_size * acc.num_processes * cfg.grad_accum,
            "mixed_precision": acc.mixed_precision, "resolution": self.resolution, "num_samples": len(self.dataset),
            "trainable_parameters": sum(p.numel() for p in self.objective.parameters() if p.requires_grad),
            "lora_layers": len(self.lora_targets), "config": dataclasses.asdict(self.cfg),
        }

    # ---- checkpoints ---------------------------------------------------------------------------
    def _train_state(self) -> dict:
        trained = [local_part(p).detach().double().sum() for p in self.acc.unwrap_model(self.objective).parameters()
                   if p.requires_grad]
        return {"step": self.step, "consumed": self.consumed, "images_seen": self.images_seen,
                "world_size": self.acc.num_processes, "generator": self.generator.get_state(),
                "scheduler": self.scheduler.state_dict(), "weights_checksum": float(torch.stack(trained).sum()),
                "settings": {k: getattr(self.cfg, k) for k in RESUME_KEYS}}

    def save_checkpoint(self, manager: CheckpointManager) -> Path:
        return manager.save(self.step, lambda folder: save_training_files(self.acc, folder, self.ema, self._train_state()),
                            {"images_seen": self.images_seen})

    def resume(self, manager: CheckpointManager) -> None:
        folder = manager.resolve(self.cfg.resume)
        state = load_train_state(folder, self.acc.process_index, self.acc.num_processes)
        current = {k: getattr(self.cfg, k) for k in RESUME_KEYS}
        saved = {k: getattr(FinetuneConfig, k) for k in RESUME_KEYS}  # the defaults of keys newer than the checkpoint
        problem = describe_mismatch({**saved, **state["settings"]}, current, RESUME_KEYS)
        if problem:
            raise CheckpointError(f"cannot resume from {folder}: the run's settings changed ({problem})")
        load_training_files(self.acc, folder, self.ema)
        self.step, self.consumed, self.images_seen = state["step"], state["consumed"], state["images_seen"]
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        self.scheduler.load_state_dict(state["scheduler"])
        logger.info("resumed from %s at step %d", folder, self.step)

    # ---- one optimizer step --------------------------------------------------------------------
    def _batch_inputs(self, batch: dict):
        if self.cfg.cache_dir:
            enc = {k: batch[k].to(self.device) for k in ("features", "mask", "tokens", "residual")}
        else:
            enc = encode_examples(batch["pixel_values"].to(self.device), batch["caption"], self.vae, self.text_encoder,
                                  self.pipe.tokenizer, patch_nums=self.patch_nums,
                                  max_length=self.transformer.config.context_tokens, system_prompt=self.system_prompt)
        with torch.autocast(self.device.type, enabled=False):
            return loss_inputs(enc, self.vae.quantize, self.patch_nums)

    def _step(self, batches, replaced: SkipReport) -> Dict[str, float]:
        cfg, totals, images = self.cfg, torch.zeros(4, dtype=torch.float64), 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            self.consumed += 1
            images += len(batch["index"])
            for name in batch["replaced"]:
                if name:
                    replaced.add("unreadable", name)
            inputs = self._batch_inputs(batch)
            sync = micro == cfg.grad_accum - 1
            with self.acc.no_sync(self.objective) if not sync else nullcontext():
                losses = self.objective(*inputs, self.generator, prior_B=batch.get("prior"))
                self.acc.backward(losses[0] / cfg.grad_accum)
            totals += torch.stack([l.detach().double().cpu() for l in losses])
        if self.step == 0 and self.lora_targets:
            unused = unused_adapters(self.acc.unwrap_model(self.objective))
            if unused:
                raise RuntimeError(f"{len(unused)} LoRA weights got no gradient (e.g. {unused[:2]}): their layers are bypassed")
        norm = self.acc.clip_grad_norm_(self.objective.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        self.images_seen += sum_over_processes(self.acc, images)
        mean = (totals / cfg.grad_accum).tolist()
        metrics = mean_over_processes(self.acc, {"loss": mean[0], "token_loss": mean[1], "diffusion_loss": mean[2],
                                                 **({"prior_kl": mean[3]} if cfg.prior_distill else {})})
        return {**metrics, "lr": lr, "grad_norm": float(norm), "images_seen": self.images_seen}

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, step_callback=None) -> FinetuneResult:
        cfg, acc = self.cfg, self.acc
        manager = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints, acc)
        log_path = self.out / "logs" / "metrics.csv"
        if cfg.cache_only:
            return FinetuneResult(0, False, None, log_path, self.dataset.report)
        # the tokenizer check (all processes: whether it adapts decides what trains); the main one adapts
        self.tokenizer_adapted, adapted = check_and_adapt(self.vae, cfg, self.resolution, acc.is_main_process)
        self._model()
        if cfg.resume:
            self.resume(manager)
        where = dict(world_size=acc.num_processes, rank=acc.process_index, seed=cfg.seed, start=self.consumed)
        if cfg.prior_ratio:
            sampler = MixedBatchSampler(len(self.dataset), cfg.prior_images, cfg.prior_ratio, cfg.batch_size, **where)
        else:
            sampler = ResumableBatchSampler(len(self.dataset), cfg.batch_size, **where)
        # everything that can refuse the run has run (on every process): from here on it writes into output_dir
        acc.wait_for_everyone()
        if acc.is_main_process:
            if cfg.overwrite and (aside := move_earlier_run_aside(self.out)) is not None:
                logger.warning("--overwrite: moved the earlier run in %s to %s", self.out, aside)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_info.json").write_text(json.dumps(self._run_info(), indent=1, default=str))
            if adapted is not None:
                self.vae.save_pretrained(self.out / "tokenizer")
                adapted.save(self.out / "tokenizer" / "check.json")
        acc.wait_for_everyone()
        log = MetricsLog(log_path, METRICS, self.step if cfg.resume else None,
                         self.out / "logs" / "tensorboard" if cfg.tensorboard else None) if acc.is_main_process else None
        dataset = MixedExamples(self.dataset, self._prior()) if cfg.prior_ratio else self.dataset
        if cfg.cache_dir and cfg.prior_ratio:
            self._drop_encoders()
        if self.world_check is not None and self.step == 0:  # the starting model's score, for the comparison
            start = self.validate()
            if log is not None:
                log.log(0, start)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
        batches, replaced, stopped = iter(loader), SkipReport(), False
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="fine-tuning", disable=not acc.is_main_process)
        with StopRequest().installed() as stop:
            while self.step < cfg.max_steps and not stopped:
                t0 = time.perf_counter()
                metrics = self._step(batches, replaced)
                metrics["epoch"] = sampler.position(self.consumed - 1)[0]
                metrics["images_per_sec"] = cfg.batch_size * acc.num_processes * cfg.grad_accum / (time.perf_counter() - t0)
                if cfg.prior_ratio:
                    metrics["prior_images_seen"] = sampler.prior_seen(self.consumed)
                if self._validation_due() and not any_process(acc, stop.requested):
                    metrics.update(self.validate())  # before the step's row is written: its score joins the row
                report_step(self.step, metrics, log, bar, step_callback)
                stopped = any_process(acc, stop.requested)
                if stopped or self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint(manager)
        bar.close()
        if log is not None:
            log.close()
        report = SkipReport.from_dict(self.dataset.report.to_dict())
        report.merge(replaced)
        if report.total:
            logger.warning("data: %s", report.summary())
        export_dir = None if stopped else self.export()
        if cfg.prior_ratio:
            logger.info("prior preservation: %d of the %d images trained on were prior samples",
                        sampler.prior_seen(self.consumed), self.images_seen)
        return FinetuneResult(self.step, stopped, export_dir, log_path, report)

    # ---- prior samples and validation ----------------------------------------------------------
    def _prior(self):
        """The prior samples, made into OUTPUT/prior by the first run and read like the user's data."""
        cfg = self.cfg
        recipe = prior_recipe(cfg)
        folder = make_prior_folder(self.out, recipe, self.acc, self._draw)
        encoders = (self.vae, self.text_encoder, self.pipe.tokenizer, self.system_prompt)
        spec = self.dataset.spec if cfg.cache_dir else None  # prior samples are cached as the user's data is
        prior = prior_examples(folder, self.resolution, cfg.seed, spec, encoders, self.acc)
        logger.info("prior preservation: %g of the training images are prior samples, from %d images %s (%s)",
                    cfg.prior_ratio, len(prior), describe_prior(recipe), folder)
        return prior

    def _draw(self, prompts, seeds, guidance_scale):
        """Images of the model as it is now (before any step: the base model), for prior samples."""
        transformer = self.acc.unwrap_model(self.objective).transformer
        with full_parameters(self.acc, self.objective):
            return sample_images(transformer, self.vae, self._encode(list(prompts)), seeds, guidance_scale)

    def _validation_due(self) -> bool:
        every = self.cfg.validation_every
        return (self.val_cond is not None or self.world_check is not None) and \
            (self.step == self.cfg.max_steps or bool(every) and self.step % every == 0)

    def validate(self) -> Dict[str, float]:
        """The validation grid and the old world's score with the current (EMA) weights -> the step's metrics."""
        transformer = self.acc.unwrap_model(self.objective).transformer
        images = world_images = grid = None
        with (self.ema.swapped() if self.ema is not None else nullcontext()), full_parameters(self.acc, self.objective):
            if self.val_cond is not None:
                seeds = [self.cfg.seed + i for i in range(self.val_cond.batch_size)]
                images = sample_images(transformer, self.vae, self.val_cond, seeds, self.guidance)
            if self.world_check is not None:
                world_images = self.world_check.sample(transformer, self.vae)
        if not self.acc.is_main_process:
            return {}
        if images is not None:
            grid = save_grid(images, self.out / "validation" / f"step-{self.step:08d}.png")
        return validation_report(self.out, self.step, grid, self.world_check, world_images)

    def export(self) -> Optional[Path]:
        use_ema = self.ema is not None and self.cfg.export_weights == "ema"
        try:
            return export_pipeline(self.acc, self.objective, self.ema if use_ema else None, self.cfg, self.out / "pipeline",
                                   vae=self.vae, new_words=self.new_words)
        except Exception as e:
            if not out_of_space(e):
                raise
            done = CheckpointManager(self.out / "checkpoints", self.cfg.keep_checkpoints, self.acc).complete()
            raise space_error(self.out, "exporting the pipeline", done[-1] if done else None, e) from e
