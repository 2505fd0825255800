"""Two CPU processes (gloo) under `accelerate launch`: both ranks train in step, on disjoint data.

`accelerate launch --cpu --num_processes 2` silently runs one process, so the process count is
asserted from what the scripts themselves recorded. Starting processes is the slow part here, so
one launch runs both entry points (`scripts/finetune.py`, `scripts/train_tokenizer.py`, then
`scripts/finetune.py` again with prior preservation from a cache, through their `main(argv)`).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from hart.training.runtime import read_metrics
from tests.test_training_data import make_folder
from tests.utils import REPO_ROOT, fixture_sizes, free_port

DRIVER = """
import sys
from scripts.finetune import main as finetune
from scripts.train_tokenizer import main as train_tokenizer

parts = [[]]
for arg in sys.argv[1:]:
    parts.append([]) if arg == "--then" else parts[-1].append(arg)
plain, tokenizer, with_prior = parts
assert finetune(plain) == 0 and train_tokenizer(tokenizer) == 0 and finetune(with_prior) == 0
"""


def test_two_process_gloo_runs(fixtures, tmp_path):
    side = fixture_sizes().image_size  # images a little larger than the fixture model's
    data, ckpt = make_folder(tmp_path / "data", size=(side + 8, side + 16)), fixtures / "ckpt"
    (data / "corrupt.png").write_bytes(b"not an image")  # skipped by both runs
    with (data / "metadata.jsonl").open("a") as f:
        f.write('\n{"file_name": "corrupt.png", "text": "a broken file"}')
    (data / "img00.png").rename(data / "uncaptioned.png")  # skipped by the fine-tune (metadata names img00.png)
    ft, tok, mix = tmp_path / "ft", tmp_path / "tok", tmp_path / "mix"
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"vocab_size": 64, "latent_channels": 8, "base_channels": 32, "channel_multipliers": [1, 1, 1, 1, 1],
         "num_res_blocks": 1, "patch_nums": [1, 2]}))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "bf16",
           "--dynamo_backend", "no", str(tmp_path / "driver.py"),
           "--pretrained", str(ckpt), "--text_encoder", str(ckpt / "text_encoder"), "--data_dir", str(data),
           "--output_dir", str(ft), "--max_steps", "3", "--batch_size", "2", "--grad_accum", "2", "--lr", "1e-3",
           "--gradient_checkpointing", "--checkpoint_every", "2", "--validation_prompt", "a cat",
           "--then", "--model_config", str(tmp_path / "tokenizer.json"), "--data_dir", str(data),
           "--output_dir", str(tok), "--max_steps", "2", "--batch_size", "2", "--lr", "3e-3",
           "--disc_weight", "0.1", "--disc_start_step", "1",
           "--then", "--pretrained", str(ckpt), "--text_encoder", str(ckpt / "text_encoder"), "--data_dir", str(data),
           "--output_dir", str(mix), "--max_steps", "2", "--batch_size", "2", "--prior_ratio", "0.25",
           "--prior_images", "5", "--prior_prompts", str(tmp_path / "prompts.txt"), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert "data: 3 skipped: 1 listed but missing (e.g. img00.png); 1 missing caption (e.g. uncaptioned.png); " \
           "1 unreadable (e.g. corrupt.png)" in proc.stderr
    assert "data: 1 skipped: 1 unreadable (e.g. corrupt.png)" in proc.stderr  # the tokenizer needs no captions
    info = json.loads((ft / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
    assert info["mixed_precision"] == "bf16" and info["global_batch_size"] == 2 * 2 * 2 and info["num_samples"] == 15
    rows = read_metrics(ft / "logs" / "metrics.csv")
    assert [r["images_seen"] for r in rows] == [8.0, 16.0, 24.0]  # counted over both ranks
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    final = ft / "checkpoints" / "checkpoint-00000003"
    states = [torch.load(final / f"train_state-rank{r:03d}.pt", weights_only=True) for r in (0, 1)]
    assert [s["consumed"] for s in states] == [6, 6]  # 3 steps x 2 micro-batches on each rank
    assert states[0]["weights_checksum"] == pytest.approx(states[1]["weights_checksum"], rel=0, abs=0)  # in sync
    assert (ft / "validation" / "step-00000003.png").is_file()
    assert (ft / "pipeline" / "model_index.json").is_file()

    tok_rows = read_metrics(tok / "logs" / "metrics.csv")
    assert len(tok_rows) == 2 and tok_rows[1]["disc_loss"] > 0
    assert {f.name for f in (tok / "checkpoints" / "checkpoint-00000002").glob("train_state-*")} == {
        "train_state-rank000.pt", "train_state-rank001.pt"}
    assert (tok / "tokenizer" / "config.json").is_file()

    # prior preservation: both processes draw the prior images (3 and 2 of 5), then train on the mix
    captions = [json.loads(line)["text"] for line in (mix / "prior" / "metadata.jsonl").read_text().splitlines()]
    assert captions == ["a cat", "a red car", "a cat", "a red car", "a cat"]
    assert len(list((mix / "prior").glob("*.png"))) == 5 and (mix / "prior" / "cache" / "cache_info.json").is_file()
    rows = read_metrics(mix / "logs" / "metrics.csv")
    assert [(r["images_seen"], r["prior_images_seen"]) for r in rows] == [(4.0, 1.0), (8.0, 2.0)]
    states = [torch.load(mix / "checkpoints" / "checkpoint-00000002" / f"train_state-rank{r:03d}.pt", weights_only=True)
              for r in (0, 1)]
    assert states[0]["weights_checksum"] == pytest.approx(states[1]["weights_checksum"], rel=0, abs=0)
