"""Crash safety of fine-tuning: SIGKILL at random moments (one of them in the middle of a checkpoint
save) always leaves a loadable latest checkpoint, resuming from it finishes the run exactly as an
uninterrupted run does, and SIGTERM saves a checkpoint and exits cleanly.

The fine-tuning processes are real, separate processes running `hart.training.cli.finetune_main`
(the `scripts/finetune.py` entry point). To keep the test quick on a busy machine they are forked
from one helper process that imports the training stack once, instead of paying the import time
(torch, diffusers, transformers) for every run.
"""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hart.training.checkpoint import CheckpointManager, load_train_state
from hart.training.runtime import read_metrics
from tests.test_training_data import make_folder
from tests.utils import REPO_ROOT, fixture_sizes

MAX_STEPS = 20  # each kill below comes 2-3 steps and less than one step's time after a resume: steps are left to run
SEED = 20261129  # the kill moments are random, but the same on every run of the test
WAIT = 300  # seconds: generous for 2 busy CPU cores; nothing waits this long when it works

FORK_SERVER = r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import hart.training.finetune as ft
from hart.training.cli import finetune_main

original_save = ft.save_training_files
original_finetune = ft.finetune


def run(job):
    out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    progress = open(job["progress"], "a", buffering=1)
    tear_at = job.get("kill_during_save_at")

    def torn_save(accelerator, folder, ema, train_state):
        if train_state["step"] != tear_at:
            return original_save(accelerator, folder, ema, train_state)
        accelerator.save_state(str(folder))  # the model and optimizer are written ...
        with open(folder / "ema.safetensors", "wb") as f:  # ... the EMA half-way ...
            f.write(b"\0" * 100)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies

    def with_progress(cfg, step_callback=None):
        return original_finetune(cfg, lambda step, metrics: progress.write(f"step {step} {time.monotonic()}\n"))

    ft.save_training_files = torn_save
    ft.finetune = with_progress
    return finetune_main(job["argv"])


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run(job)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(f"started {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exited {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class ForkServer:
    """One helper process with the training stack imported; `start(argv)` forks a fine-tuning run."""

    def __init__(self, root: Path):
        self.root, self.runs, self.running = root, 0, None
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()

    def start(self, argv, kill_during_save_at=None) -> "Run":
        self.runs += 1
        run = Run(self, self.root / f"progress-{self.runs}.txt", self.root / f"log-{self.runs}.txt")
        job = dict(argv=[str(a) for a in argv], progress=str(run.progress), log=str(run.log),
                   kill_during_save_at=kill_during_save_at)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        kind, pid = self.lines.get(timeout=WAIT).split()
        assert kind == "started"
        run.pid = self.running = int(pid)
        return run

    def close(self):
        if self.running is not None:  # a test failed with a run still going
            try:
                os.kill(self.running, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Run:
    def __init__(self, server: ForkServer, progress: Path, log: Path):
        self.server, self.progress, self.log, self.pid = server, progress, log, None

    def _lines(self):
        return [x.split() for x in self.progress.read_text().splitlines()] if self.progress.is_file() else []

    def steps(self):
        return [int(x[1]) for x in self._lines()]

    def step_seconds(self) -> float:
        """How long the last step took, its checkpoint save included (monotonic clock of the same machine)."""
        times = [float(x[2]) for x in self._lines()]
        return times[-1] - times[-2]

    def wait_for_step(self, step: int) -> None:
        deadline = time.monotonic() + WAIT
        while not (self.steps() and self.steps()[-1] >= step):
            assert time.monotonic() < deadline, f"no step {step} after {WAIT} s:\n{self.log.read_text()}"
            time.sleep(0.01)

    def signal(self, sig) -> None:
        os.kill(self.pid, sig)

    def exit_code(self) -> int:
        kind, code = self.server.lines.get(timeout=WAIT).split()
        assert kind == "exited"
        self.server.running = None
        return int(code)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("forks"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def argv(fixtures, tmp_path_factory):
    side = fixture_sizes().image_size  # images a little larger than the fixture model's
    data = make_folder(tmp_path_factory.mktemp("data"), n=8, size=(side + 8, side + 16))
    return lambda out, *extra: [
        "--pretrained", fixtures / "ckpt", "--text_encoder", fixtures / "ckpt" / "text_encoder", "--data_dir", data,
        "--output_dir", out, "--max_steps", MAX_STEPS, "--batch_size", 2, "--lr", 1e-3, "--warmup_steps", 2,
        "--checkpoint_every", 1, "--keep_checkpoints", 2, "--ema_decay", 0.9, *extra]


def latest_checkpoint(out: Path) -> Path:
    """The latest finished checkpoint, after checking that every file of it loads."""
    done = CheckpointManager(out / "checkpoints", 2, None).complete()
    assert done, "no finished checkpoint"
    latest = done[-1]
    step = json.loads((latest / "complete.json").read_text())["step"]
    assert latest.name == f"checkpoint-{step:08d}"
    state = load_train_state(latest, 0, 1)
    assert state["step"] == step
    weights = load_file(str(latest / "model.safetensors"))
    trainable = [v.double().sum() for k, v in weights.items()]
    assert trainable and all(torch.isfinite(t) for t in trainable)
    assert load_file(str(latest / "ema.safetensors"))
    torch.load(latest / "optimizer.bin", map_location="cpu", weights_only=True)
    return latest


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def test_sigkill_at_random_moments_then_resume_finishes_the_run(server, argv, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "run"
    reached = 0

    # 1. killed in the middle of a checkpoint save: the torn folder is not taken for a checkpoint
    tear_at = rng.randint(2, 3)
    run = server.start(argv(out), kill_during_save_at=tear_at)
    assert run.exit_code() == -signal.SIGKILL
    assert (out / "checkpoints" / f".tmp-checkpoint-{tear_at:08d}" / "ema.safetensors").is_file()  # the torn save
    reached = step_of(latest_checkpoint(out))
    assert reached == tear_at - 1

    # 2. killed three times at random moments (during a step or a save), resuming each time
    for _ in range(3):
        run = server.start(argv(out, "--resume", "latest"))
        run.wait_for_step(reached + rng.randint(2, 3))
        # within the next step or its save, however fast this machine steps: a fixed delay would let a
        # fast machine run through all MAX_STEPS before the kills are done
        time.sleep(rng.uniform(0.0, 1.0) * run.step_seconds())
        run.signal(signal.SIGKILL)
        assert run.exit_code() == -signal.SIGKILL
        latest = step_of(latest_checkpoint(out))
        assert reached <= latest < MAX_STEPS
        reached = latest

    # 3. SIGTERM: a checkpoint of the step in progress, and a clean exit
    run = server.start(argv(out, "--resume", "latest"))
    run.wait_for_step(reached + 1)
    run.signal(signal.SIGTERM)
    assert run.exit_code() == 0
    stopped = run.steps()[-1]
    assert step_of(latest_checkpoint(out)) == stopped < MAX_STEPS
    assert "stopped at step" in run.log.read_text()
    assert not (out / "pipeline").exists()  # an interrupted run exports nothing

    # 4. the last resume finishes the run
    run = server.start(argv(out, "--resume", "latest"))
    assert run.exit_code() == 0, run.log.read_text()
    assert run.steps()[0] == stopped + 1 and run.steps()[-1] == MAX_STEPS
    assert step_of(latest_checkpoint(out)) == MAX_STEPS
    assert [r["step"] for r in read_metrics(out / "logs" / "metrics.csv")] == list(range(1, MAX_STEPS + 1))
    assert not list((out / "checkpoints").glob(".tmp-*")), "a torn save was left behind"

    # ... exactly as a run that was never interrupted
    whole = tmp_path / "whole"
    run = server.start(argv(whole))
    assert run.exit_code() == 0, run.log.read_text()
    expected, resumed = read_metrics(whole / "logs" / "metrics.csv"), read_metrics(out / "logs" / "metrics.csv")
    for a, b in zip(expected, resumed):
        for key in ("loss", "lr", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(whole / "pipeline" / weights)), load_file(str(out / "pipeline" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
