"""Atomic training checkpoints: write to a temporary folder, then rename; keep the last N.

A checkpoint folder `checkpoint-{step:08d}` holds what `accelerate` saves (model, optimizer, the
global RNG states of every process; sharded under FSDP), the EMA weights, and one
`train_state-rank{r}.pt` per process: step, data position, the run's explicit generators and the
LR scheduler. It only counts once `complete.json` is inside and the folder has its final name, so a
run killed while saving leaves the previous checkpoint as the latest valid one.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import torch
from safetensors.torch import load_file, save_file

# one error type for every checkpoint problem, loading or resuming (no usable checkpoint where one
# was asked for, or one saved by an incompatible run)
from hart.loading import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
COMPLETE = "complete.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# How a full disk shows when it is not an OSError: torch's zip writer (torch.save) and safetensors.
_SPACE_MESSAGES = ("No space left on device", "os error 28", "unexpected pos", "file write failed")


def out_of_space(error: BaseException) -> bool:
    """Whether `error` is a write that failed because the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(m in str(error) for m in _SPACE_MESSAGES)


def space_error(path: Path, doing: str, last: Optional[Path], error: BaseException) -> CheckpointError:
    """The one-line report of a full disk: where, what was lost, what is intact and how to go on."""
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = f"no space left on {path} while {doing} ({said})"
    if last is None:
        return CheckpointError(f"{where}: no checkpoint was saved yet; free some space and start the run again "
                               "with --overwrite")
    return CheckpointError(f"{where}: the last good checkpoint is {last}; free some space and continue the run with "
                           "--resume latest")




def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Checkpoints of one run under `root`; `state` is the run's Accelerator (or PartialState)."""

    def __init__(self, root, keep_last: int, state):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.root, self.keep_last, self.state = Path(root), keep_last, state

    def complete(self) -> List[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.match(p.name)) and (p / COMPLETE).is_file()]
        return [p for _, p in sorted(found)]

    def resolve(self, resume: str) -> Path:
        """`"latest"` or a checkpoint folder -> a finished checkpoint folder."""
        if resume == "latest":
            done = self.complete()
            if not done:
                raise CheckpointError(f"no finished checkpoint in {self.root} to resume from")
            return done[-1]
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path} is not a finished checkpoint (no {COMPLETE}); it may have been interrupted while saving")
        later = [p.name for p in self.complete() if p.name > path.name]
        if later:
            logger.warning("resuming from %s: the later checkpoints %s will be replaced as this run saves", path.name, later)
        return path

    def save(self, step: int, write: Callable[[Path], None], meta: dict) -> Path:
        """Every process calls this; `write(folder)` writes that process's files."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        try:
            if self.state.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.state.wait_for_everyone()
            write(tmp)
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                with open(tmp / COMPLETE, "w") as f:
                    json.dump({"step": step, **meta}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
        except Exception as e:
            if not out_of_space(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the torn save took; the last one is intact
            done = self.complete()
            raise space_error(self.root, f"saving {final.name}", done[-1] if done else None, e) from e
        if self.state.is_main_process:
            if final.exists():  # saving the same step again (a resumed run that stops at once)
                old = self.root / f".old-{final.name}"
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._prune(step)
            logger.info("saved checkpoint %s", final)
        self.state.wait_for_everyone()
        return final

    def _prune(self, step: int) -> None:
        done = self.complete()
        # later steps come from a run this one resumed before the end of: that history is replaced
        later = [p for p in done if int(_NAME.match(p.name).group(1)) > step]
        for old in later + [p for p in done if p not in later][: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:  # left by runs killed while saving
            shutil.rmtree(stale, ignore_errors=True)


def save_train_state(folder: Path, rank: int, state: dict) -> None:
    torch.save(state, folder / f"train_state-rank{rank:03d}.pt")


def load_train_state(folder: Path, rank: int, world_size: int) -> dict:
    path = folder / f"train_state-rank{rank:03d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no training state for process {rank}: was it saved with fewer processes?")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"{folder} was saved by {state['world_size']} processes, this run has {world_size}: the data order "
            "and generators are per process, so resume with the same number of processes"
        )
    return state


def describe_mismatch(saved: dict, current: dict, keys) -> Optional[str]:
    """A message naming the settings a resumed run changed, or None."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs) if diffs else None


def _ema_file(accelerator, folder: Path) -> Optional[Path]:
    """Where this process's EMA lives: one file, or one per process when FSDP shards the weights."""
    if accelerator.distributed_type.name == "FSDP":
        return folder / f"ema-rank{accelerator.process_index:03d}.safetensors"
    return folder / "ema.safetensors" if accelerator.is_main_process else None


def save_training_files(accelerator, folder: Path, ema, train_state: dict) -> None:
    """This process's share of a checkpoint: accelerate's state, the EMA and the training state."""
    accelerator.save_state(str(folder))
    path = _ema_file(accelerator, folder)
    if ema is not None and path is not None:
        save_file(ema.state_dict(), str(path))
    save_train_state(folder, accelerator.process_index, train_state)


def load_training_files(accelerator, folder: Path, ema) -> None:
    try:
        accelerator.load_state(str(folder))
    except RuntimeError as e:  # torch's state-dict mismatch: a checkpoint of another model
        raise CheckpointError(f"cannot resume from {folder}: it was saved for another model ({str(e)[:300]})") from e
    if ema is not None:
        path = _ema_file(accelerator, folder)
        if path is None:  # non-main processes of a replicated run read the main process's copy
            path = folder / "ema.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{folder} has no EMA weights ({path.name}); was it saved with the EMA disabled?")
        ema.load_state_dict(load_file(str(path)))
