"""Training the hybrid tokenizer, from scratch or from a checkpoint.

The loss is `recon_weight * MSE(reconstruction, image) + vq_loss` (the VQ term plus the commitment
term, from the quantizer's training forward). Like the paper's alternating training, each batch
skips the continuous residual with probability `skip_continuous_prob`, so the decoder learns to
decode both the discrete-only and the full latent. An optional PatchGAN discriminator (hinge loss)
joins after `disc_start_step`. Codebook usage (fraction of codes hit, perplexity) is logged; the
quantizer sums the hit counts over processes when there are several. With `restart_dead_codes_every`
codes no scale used over that many steps are moved onto live residuals of the current batch (small
codebooks trained from scratch otherwise collapse onto a handful of codes); restarts stop at
`restart_until_step` so the last steps settle the codebook.

It runs alone or under `accelerate launch` with the same code; checkpoints, resume and SIGTERM work
as for the transformer fine-tune. The result is a `HybridTokenizer` folder (`save_pretrained`).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from hart.loading import load_image_tokenizer
from hart.models.tokenizer import HybridTokenizer
from hart.training.checkpoint import (CheckpointError, CheckpointManager, describe_mismatch, load_train_state,
                                      load_training_files, out_of_space, save_training_files, space_error)
from hart.training.checks import check_tokenizer_folders, move_earlier_run_aside
from hart.training.config import TokenizerTrainConfig
from hart.training.data import ImageCaptionFolder, SkipReport
from hart.training.runtime import (MetricsLog, StopRequest, any_process, mean_over_processes, report_step,
                                   warmup_cosine)
from hart.training.sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)

METRICS = ["loss", "recon_loss", "vq_loss", "gen_adv_loss", "disc_loss", "code_usage", "code_perplexity",
           "restarted_codes", "skipped_continuous", "lr", "grad_norm", "images_per_sec"]
# settings a resumed run must share with the checkpoint (data order, which states exist)
RESUME_KEYS = ("batch_size", "grad_accum", "seed", "trainable", "disc_weight")


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): strided 4x4 convs with BatchNorm, one logit per image patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, num_layers: int = 3):
        super().__init__()
        layers, mult = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.main(img_B3HW)


def load_tokenizer(pretrained: Optional[str], model_config: Optional[str]) -> HybridTokenizer:
    """The tokenizer to train: from a folder in any layout (`hart.loading.load_image_tokenizer`), or
    newly initialised from a JSON file of `HybridTokenizer` arguments (checked by `TokenizerTrainConfig`)."""
    if (pretrained is None) == (model_config is None):
        raise ValueError("give exactly one of `pretrained` (a tokenizer to fine-tune) and `model_config` (to start from scratch)")
    if model_config is not None:
        return HybridTokenizer(**json.loads(Path(model_config).read_text(encoding="utf-8")))
    return load_image_tokenizer(pretrained)


def code_statistics(hits_SV: torch.Tensor) -> Dict[str, float]:
    """Fraction of the codebook hit at any scale, and the perplexity of the code distribution."""
    counts_V = hits_SV.sum(0).float()
    p_V = counts_V / counts_V.sum().clamp(min=1)
    entropy = -(p_V * p_V.clamp(min=1e-12).log()).sum()
    return {"code_usage": float((counts_V > 0).float().mean()), "code_perplexity": float(entropy.exp())}


def train_tokenizer(cfg: TokenizerTrainConfig,
                    step_callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Optional[Path]:
    """Train, save `output_dir/tokenizer` (a `HybridTokenizer` folder) and return its path; None when
    a stop request (SIGTERM) ended the run early, after saving a checkpoint."""
    return _TokenizerRun(cfg).train(step_callback)


class _TokenizerRun:
    def __init__(self, cfg: TokenizerTrainConfig):
        check_tokenizer_folders(cfg)  # the values were checked when `cfg` was made
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.acc = acc = Accelerator(mixed_precision=cfg.mixed_precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # initialisation of a new tokenizer and of the discriminator
            tokenizer = load_tokenizer(cfg.pretrained, cfg.model_config)
            self.disc = PatchDiscriminator().to(acc.device) if cfg.disc_weight > 0 else None
        if cfg.trainable == "decoder":
            for part in (tokenizer.encoder, tokenizer.quant_conv, tokenizer.quantize):
                part.requires_grad_(False)
        S = len(tokenizer.config.patch_nums)
        used_phi = {tokenizer.quantize.phi_index(si, S) for si in range(S)}
        for i, phi in enumerate(tokenizer.quantize.phi):  # phi convs no scale uses (few scales) stay as they are
            if i not in used_phi:
                phi.requires_grad_(False)
        resolution = tokenizer.config.patch_nums[-1] * tokenizer.downsample_factor
        self.dataset = ImageCaptionFolder(cfg.data_dir, resolution, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed,
                                          min_size=cfg.min_image_size, require_captions=False)
        optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.model, self.optimizer = acc.prepare(tokenizer.train(), optimizer)
        if self.disc is not None:  # kept out of DDP: its gradients are averaged by hand in `_step`
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
            acc.register_for_checkpointing(self.disc, self.d_opt)
        self.generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1_000_003 + acc.process_index)
        self.step, self.consumed, self.replaced = 0, 0, SkipReport()
        self.window_hits_V = torch.zeros(tokenizer.config.vocab_size, device=acc.device)
        self.settings = {k: getattr(cfg, k) for k in RESUME_KEYS}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, manager: CheckpointManager) -> None:
        state = {"step": self.step, "consumed": self.consumed, "world_size": self.acc.num_processes,
                 "generator": self.generator.get_state(), "scheduler": self.scheduler.state_dict(),
                 "settings": self.settings}
        manager.save(self.step, lambda folder: save_training_files(self.acc, folder, None, state), {})

    def resume(self, manager: CheckpointManager) -> None:
        folder = manager.resolve(self.cfg.resume)
        state = load_train_state(folder, self.acc.process_index, self.acc.num_processes)
        problem = describe_mismatch(state["settings"], self.settings, RESUME_KEYS)
        if problem:
            raise CheckpointError(f"cannot resume from {folder}: the run's settings changed ({problem})")
        load_training_files(self.acc, folder, None)
        self.step, self.consumed = state["step"], state["consumed"]
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        self.scheduler.load_state_dict(state["scheduler"])

    # ---- one optimizer step --------------------------------------------------------------------
    def _micro_step(self, img: torch.Tensor, sync: bool, use_disc: bool) -> Tuple[Dict[str, float], torch.Tensor]:
        cfg, disc = self.cfg, self.disc
        skip = bool(torch.rand((), generator=self.generator, device=self.generator.device) < cfg.skip_continuous_prob)
        with self.acc.no_sync(self.model) if not sync else nullcontext():
            rec, vq_loss, hits_SV = self.model(img, skip_continuous=skip)
            recon = F.mse_loss(rec.float(), img)
            loss, adv = cfg.recon_weight * recon + vq_loss, torch.zeros(())
            if use_disc:
                disc.requires_grad_(False)  # the generator's adversarial term trains the tokenizer only
                adv = -disc(rec).float().mean()
                loss = loss + cfg.disc_weight * adv
            self.acc.backward(loss / cfg.grad_accum)
        d_loss = torch.zeros(())
        if use_disc:  # hinge loss on real images and the detached reconstructions
            disc.requires_grad_(True)
            d_loss = (F.relu(1 - disc(img)).mean() + F.relu(1 + disc(rec.detach())).mean()).float()
            (d_loss / cfg.grad_accum).backward()
        values = {"loss": loss, "recon_loss": recon, "vq_loss": vq_loss, "gen_adv_loss": adv, "disc_loss": d_loss,
                  "skipped_continuous": float(skip)}
        return {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in values.items()}, hits_SV

    def _step(self, batches) -> Dict[str, float]:
        cfg, acc = self.cfg, self.acc
        use_disc = self.disc is not None and self.step >= cfg.disc_start_step
        totals: Dict[str, float] = {}
        hits_SV = 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            self.consumed += 1
            for name in batch["replaced"]:
                if name:
                    self.replaced.add("unreadable", name)
            img = batch["pixel_values"].to(acc.device)
            values, hits = self._micro_step(img, micro == cfg.grad_accum - 1, use_disc)
            hits_SV = hits_SV + hits
            totals = {k: totals.get(k, 0.0) + v / cfg.grad_accum for k, v in values.items()}
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if use_disc:
            for p in self.disc.parameters():  # the discriminator is not wrapped: average its gradients here
                if p.grad is not None and acc.num_processes > 1:
                    p.grad = acc.reduce(p.grad, reduction="mean")
            self.d_opt.step()
            self.d_opt.zero_grad(set_to_none=True)
        self.step += 1
        restarted = self._restart_dead_codes(hits_SV, img)
        return {**mean_over_processes(acc, totals), **code_statistics(hits_SV), "restarted_codes": restarted,
                "lr": lr, "grad_norm": float(norm)}

    def _restart_dead_codes(self, hits_SV: torch.Tensor, img: torch.Tensor) -> int:
        cfg = self.cfg
        every, until = cfg.restart_dead_codes_every, cfg.restart_until_step
        if every <= 0:
            return 0
        self.window_hits_V += hits_SV.sum(0).to(self.window_hits_V.device)  # already summed over processes
        if self.step % every or self.step > (int(0.8 * cfg.max_steps) if until is None else until):
            return 0
        tokenizer = self.acc.unwrap_model(self.model)
        with torch.no_grad():
            f_BChw = tokenizer.encode_latent(img)
        moved = tokenizer.quantize.restart_codes(self.window_hits_V == 0, f_BChw, tokenizer.config.patch_nums,
                                                 self.generator)
        self.window_hits_V.zero_()
        return moved

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, step_callback=None) -> Optional[Path]:
        cfg, acc = self.cfg, self.acc
        manager = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints, acc)
        if cfg.resume:
            self.resume(manager)
        sampler = ResumableBatchSampler(len(self.dataset), cfg.batch_size, world_size=acc.num_processes,
                                        rank=acc.process_index, seed=cfg.seed, start=self.consumed)
        batches = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers))
        # everything that can refuse the run has run (on every process): from here on it writes into output_dir
        acc.wait_for_everyone()
        if acc.is_main_process and cfg.overwrite and (aside := move_earlier_run_aside(self.out)) is not None:
            logger.warning("--overwrite: moved the earlier run in %s to %s", self.out, aside)
        acc.wait_for_everyone()
        log = MetricsLog(self.out / "logs" / "metrics.csv", METRICS, self.step if cfg.resume else None,
                         self.out / "logs" / "tensorboard" if cfg.tensorboard else None) if acc.is_main_process else None
        stopped = False
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="tokenizer", disable=not acc.is_main_process)
        with StopRequest().installed() as stop:
            while self.step < cfg.max_steps and not stopped:
                t0 = time.perf_counter()
                metrics = self._step(batches)
                metrics["images_per_sec"] = cfg.batch_size * acc.num_processes * cfg.grad_accum / (time.perf_counter() - t0)
                report_step(self.step, metrics, log, bar, step_callback)
                stopped = any_process(acc, stop.requested)
                if stopped or self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint(manager)
        bar.close()
        if log is not None:
            log.close()
        report = SkipReport.from_dict(self.dataset.report.to_dict())
        report.merge(self.replaced)
        if report.total:
            logger.warning("data: %s", report.summary())
        return None if stopped else self.save_tokenizer()

    def save_tokenizer(self) -> Path:
        target = self.out / "tokenizer"
        if self.acc.is_main_process:
            tmp = self.out / ".tmp-tokenizer"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.acc.unwrap_model(self.model).save_pretrained(tmp)
            except Exception as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if not out_of_space(e):
                    raise
                done = CheckpointManager(self.out / "checkpoints", self.cfg.keep_checkpoints, self.acc).complete()
                raise space_error(self.out, "saving the tokenizer", done[-1] if done else None, e) from e
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            logger.info("saved the tokenizer to %s", target)
        self.acc.wait_for_everyone()
        return target
