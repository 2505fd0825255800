"""Pieces every training loop here needs: the LR schedule, SIGTERM handling, the metrics log,
and cross-process agreement."""
from __future__ import annotations

import csv
import logging
import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

logger = logging.getLogger(__name__)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier for optimizer step `s` (0-based): linear warm-up, then cosine decay to `min_ratio`."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StopRequest:
    """Turns SIGTERM into a flag the loop polls, so it can save a checkpoint before exiting.

    Installed only from the main thread (elsewhere Python cannot handle signals); the previous
    handler comes back when the context ends.
    """

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        logger.warning("received signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on at least one of them."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.gather(t).max().item() > 0)


def mean_over_processes(accelerator, values: Dict[str, float]) -> Dict[str, float]:
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(values, t.tolist()))


def sum_over_processes(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="sum").item())


class MetricsLog:
    """Per-step metrics as CSV (main process), optionally mirrored to TensorBoard.

    On resume, rows after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, fields: List[str], resume_step: Optional[int] = None,
                 tensorboard_dir: Optional[Path] = None):
        self.path, self.fields = Path(path), ["step", *fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, self.fields, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # its presence is checked with the settings

            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self._writer.writerow({"step": step, **metrics})
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def report_step(step: int, metrics: Dict[str, float], log: Optional["MetricsLog"], bar, step_callback) -> None:
    """After an optimizer step: the metrics row, the progress bar and the caller's callback."""
    if log is not None:
        log.log(step, metrics)
    bar.update()
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_sec']:.1f}")
    if step_callback is not None:
        step_callback(step, metrics)


def read_metrics(path) -> List[Dict[str, float]]:
    """The rows of a metrics CSV, as numbers."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@contextmanager
def full_parameters(accelerator, model: torch.nn.Module):
    """Gather FSDP-sharded parameters for use outside `forward` (validation); a no-op otherwise."""
    if accelerator.distributed_type.name != "FSDP":
        yield
        return
    if hasattr(model, "unshard"):  # FSDP2
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        yield

