"""Transformer fine-tuning on the tiny fixture model: loss, export, LoRA, cache, resume, crash safety."""
import copy
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hart.models.transformer import HARTTransformer
from hart.text import SYSTEM_PROMPT
from hart.training.cache import CacheMismatchError, CacheSpec, CachedExamples, build_cache, read_cache_info
from hart.training.checkpoint import CheckpointError, CheckpointManager
from hart.training.checks import LORA_GROUP_NAMES
from hart.training.data import ImageCaptionFolder
from hart.training.ema import EMA
from hart.training.encoding import encode_examples
from hart.training.finetune import FinetuneConfig, finetune
from hart.training.lora import add_lora, merge_lora, unused_adapters
from hart.training.runtime import read_metrics, warmup_cosine
from tests.test_training_data import make_folder
from tests.utils import REPO_ROOT, fixture_sizes

PROMPTS = ("a cat", "a red car")
SIZES = fixture_sizes()  # the fixture model's
SIDE = SIZES.image_size
PHOTO = (SIDE + 8, SIDE + 16)  # training images a little larger than the model's, as photos are


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(fixtures):
    return {"pretrained": str(fixtures / "ckpt"), "text_encoder": str(fixtures / "ckpt" / "text_encoder")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), size=PHOTO)


@pytest.fixture(scope="module")
def cache_dir(base, data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "cache"
    finetune(FinetuneConfig(**base, data_dir=str(data_dir), output_dir=str(cache.parent / "unused"),
                            cache_dir=str(cache), cache_only=True, batch_size=4))
    return cache


def config(base, cache_dir, out, **kw) -> FinetuneConfig:
    settings = dict(max_steps=20, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=10, lora_rank=0)
    settings.update(kw)
    return FinetuneConfig(**base, cache_dir=str(cache_dir), output_dir=str(out), **settings)


@pytest.fixture(scope="module")
def full_run(base, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return finetune(config(base, cache_dir, out, validation_prompts=PROMPTS, validation_every=10))


def assert_same_run(expected, resumed, keys) -> None:
    """A resumed run logged the same metrics at every step as the uninterrupted one and exported the same weights."""
    want, got = read_metrics(expected.log_path), read_metrics(resumed.log_path)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, expected.step + 1))
    for a, b in zip(want, got):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(expected.export_dir / weights)), load_file(str(resumed.export_dir / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _first_last(rows, key, n=5):
    values = [r[key] for r in rows]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def test_full_finetune_lowers_loss_and_exports_ema(full_run):
    from hart import HARTPipeline

    rows = read_metrics(full_run.log_path)
    assert full_run.step == 20 and not full_run.stopped_early and len(rows) == 20
    first, last = _first_last(rows, "loss")
    tok_first, tok_last = _first_last(rows, "token_loss")
    assert last < first - 1.0 and tok_last < tok_first - 0.5, (first, last, tok_first, tok_last)
    assert [r["images_seen"] for r in rows] == [4.0 * s for s in range(1, 21)]

    pipe = HARTPipeline.from_pretrained(full_run.export_dir)
    exported = pipe.transformer.state_dict()
    ema = load_file(str(full_run.export_dir.parent / "checkpoints" / "checkpoint-00000020" / "ema.safetensors"))
    for name, value in exported.items():  # the export holds the EMA weights
        assert torch.equal(value, ema[f"transformer.{name}"]), name
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, SIDE, SIDE, 3) and np.isfinite(image).all()


def test_validation_grids_and_run_info(full_run):
    out = full_run.export_dir.parent
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-00000010.png", "step-00000020.png"]
    from PIL import Image

    assert Image.open(out / "validation" / grids[0]).size == (2 + 2 * (SIDE + 2), 2 + SIDE + 2)  # two images, 2 px borders
    assert [p.name for p in CheckpointManager(out / "checkpoints", 2, None).complete()] == [
        "checkpoint-00000010", "checkpoint-00000020"]


def test_resume_reproduces_the_uninterrupted_run(full_run, base, cache_dir, tmp_path):
    def interrupt(step, metrics):
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: checkpoint, then a clean stop

    first = finetune(config(base, cache_dir, tmp_path), interrupt)
    assert first.stopped_early and first.step == 10 and first.export_dir is None
    second = finetune(config(base, cache_dir, tmp_path, resume="latest"))
    assert second.step == 20 and not second.stopped_early
    assert_same_run(full_run, second, ("loss", "token_loss", "diffusion_loss", "lr", "grad_norm"))


KILL_WHILE_SAVING = """
import importlib.util, os, shutil, signal, sys
from pathlib import Path

# load the module alone: the `hart` package would import diffusers, slow to start on a busy machine
spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[3])
checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checkpoint)

class OneProcess:
    is_main_process, process_index, num_processes = True, 0, 1
    def wait_for_everyone(self):
        pass

def write(folder):
    shutil.copy(Path(sys.argv[2]) / "optimizer.bin", folder)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.CheckpointManager(Path(sys.argv[1]), 2, OneProcess()).save(21, write, {})
"""


def test_killed_while_saving_keeps_the_previous_checkpoint(full_run, base, cache_dir, tmp_path):
    previous = full_run.export_dir.parent / "checkpoints" / "checkpoint-00000020"
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(previous, ckpts / previous.name)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    module = REPO_ROOT / "hart" / "training" / "checkpoint.py"
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(ckpts), str(previous), str(module)],
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / ".tmp-checkpoint-00000021" / "model.safetensors").is_file()  # the torn write
    assert [p.name for p in CheckpointManager(ckpts, 2, None).complete()] == [previous.name]
    result = finetune(config(base, cache_dir, tmp_path, resume="latest", max_steps=21))
    assert result.step == 21 and [r["step"] for r in read_metrics(result.log_path)] == [21]
    assert not list(ckpts.glob(".tmp-*"))  # cleaned up by the next save


class OneProcess:
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


def test_checkpoint_manager_keeps_the_last_n_and_one_history(tmp_path):
    manager = CheckpointManager(tmp_path, 3, OneProcess())
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        manager.resolve("latest")
    for step in (1, 2, 3, 4):
        manager.save(step, lambda folder: (folder / "w.txt").write_text(f"first {step}"), {})
    assert [p.name for p in manager.complete()] == [f"checkpoint-0000000{s}" for s in (2, 3, 4)]
    # resuming from step 2 and saving step 3 again replaces the abandoned steps 3 and 4
    manager.resolve(str(tmp_path / "checkpoint-00000002"))
    manager.save(3, lambda folder: (folder / "w.txt").write_text("second 3"), {})
    assert [p.name for p in manager.complete()] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert (manager.resolve("latest") / "w.txt").read_text() == "second 3"
    (tmp_path / "checkpoint-00000009").mkdir()  # no completion marker
    assert manager.resolve("latest").name == "checkpoint-00000003"
    with pytest.raises(CheckpointError, match="not a finished checkpoint"):
        manager.resolve(str(tmp_path / "checkpoint-00000009"))


def test_lora_finetune_lowers_loss_and_merges_into_the_export(fixture_pipe, base, cache_dir, tmp_path):
    from hart import HARTPipeline

    result = finetune(config(base, cache_dir, tmp_path, lr=1e-2, lora_rank=8, lora_targets=("attention", "mlp", "diffusion"),
                             checkpoint_every=20))
    first, last = _first_last(read_metrics(result.log_path), "loss")
    assert last < first - 1.0, (first, last)
    exported = HARTPipeline.from_pretrained(result.export_dir).transformer.state_dict()
    original = fixture_pipe.transformer.state_dict()
    assert exported.keys() == original.keys()  # adapters merged away
    changed = {k for k in exported if not torch.equal(exported[k], original[k])}
    assert "blocks.0.attn.qkv_proj.weight" in changed and "blocks.1.ffn.down_proj.weight" in changed
    assert "diffusion_head.net.input_proj.weight" in changed
    assert not changed & {"word_embed.weight", "head.weight", "lvl_embed.weight", "blocks.0.ada_lin.1.weight"}
    assert (result.export_dir / "lora_weights.safetensors").is_file()


def test_cached_examples_match_live_encoding(fixture_pipe, data_dir, cache_dir):
    info = read_cache_info(cache_dir)
    spec = CacheSpec(**{**info["spec"], "patch_nums": tuple(info["spec"]["patch_nums"])})
    cached, live = CachedExamples(cache_dir, spec), ImageCaptionFolder(data_dir, SIDE)
    assert len(cached) == len(live) == 16
    item, ref = cached[(0, 5)], live[(0, 5)]
    enc = encode_examples(ref["pixel_values"][None], [ref["caption"]], fixture_pipe.vae, fixture_pipe.text_encoder,
                          fixture_pipe.tokenizer, patch_nums=SIZES.patch_nums, max_length=SIZES.context_tokens,
                          system_prompt=SYSTEM_PROMPT)
    assert torch.equal(item["tokens"].long(), enc["tokens"][0]) and torch.equal(item["mask"], enc["mask"][0])
    torch.testing.assert_close(item["features"], enc["features"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item["residual"], enc["residual"][0], atol=1e-5, rtol=1e-5)


def test_flip_cache_draws_the_flips_live_training_draws(fixture_pipe, tmp_path):
    from accelerate import PartialState

    data = make_folder(tmp_path / "data", n=4, size=PHOTO)
    pipe = fixture_pipe
    spec = CacheSpec.create(pipe.vae, pipe.text_encoder, pipe.tokenizer, system_prompt=None,
                            max_length=SIZES.context_tokens, patch_nums=SIZES.patch_nums, resolution=SIDE,
                            crop="center", flip=True, features_dtype="float32")
    build_cache(tmp_path / "cache", ImageCaptionFolder(data, SIDE), spec, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                system_prompt=None, state=PartialState(), batch_size=4)
    cached, live = CachedExamples(tmp_path / "cache", spec, seed=7), ImageCaptionFolder(data, SIDE, flip=True, seed=7)
    plain = ImageCaptionFolder(data, SIDE)
    flipped = 0
    for key in [(e, i) for e in range(3) for i in range(4)]:
        pixels = live[key]["pixel_values"]
        flipped += not torch.equal(pixels, plain[key]["pixel_values"])
        tokens = encode_examples(pixels[None], ["x"], pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                 patch_nums=SIZES.patch_nums, max_length=SIZES.context_tokens,
                                 system_prompt=None)["tokens"][0]
        assert torch.equal(cached[key]["tokens"].long(), tokens), key
    assert 0 < flipped < 12


def test_cache_for_another_model_or_setting_is_refused(fixture_pipe, base, cache_dir, tmp_path):
    from hart import HARTPipeline

    vae = copy.deepcopy(fixture_pipe.vae)
    with torch.no_grad():
        vae.quantize.embedding.weight.add_(0.01)
    other = HARTPipeline(tokenizer=fixture_pipe.tokenizer, text_encoder=fixture_pipe.text_encoder,
                         transformer=fixture_pipe.transformer, vae=vae)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CacheMismatchError, match="image_tokenizer: cache has"):
        finetune(FinetuneConfig(pretrained=str(tmp_path / "other"), cache_dir=str(cache_dir), output_dir=str(tmp_path / "o")))
    with pytest.raises(CacheMismatchError, match="system_prompt"):
        finetune(config(base, cache_dir, tmp_path / "p", use_system_prompt=False))


def test_lora_reaches_every_projection_and_merges_exactly():
    torch.manual_seed(0)
    model = HARTTransformer(patch_nums=(1, 2), context_tokens=4, context_dim=8, embed_dim=16, depth=1, num_heads=2,
                            vocab_size=32, latent_channels=4, diff_width=16, diff_depth=1)
    targets = add_lora(model, rank=2, alpha=4, groups=LORA_GROUP_NAMES)
    assert {"blocks.0.attn.qkv_proj", "blocks.0.attn.proj", "blocks.0.ffn.gate_proj"} <= set(targets)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ctx, mask, pos = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.arange(4).expand(2, 4)
    x = torch.randn(2, 4, 4)
    logits, hidden = model(ctx, mask, pos, x)
    diff = model.diffusion_head.loss(torch.randn(8, 4), hidden.flatten(0, 1), torch.Generator().manual_seed(0)).loss
    (logits.square().mean() + diff.mean()).backward()
    assert unused_adapters(model) == []  # qkv_proj included, although the attention reads its weight directly
    merged = merge_lora(copy.deepcopy(model))
    assert merged.state_dict().keys() == HARTTransformer.from_config(model.config).state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(merged(ctx, mask, pos, x)[0], model(ctx, mask, pos, x)[0], atol=1e-4, rtol=1e-4)


def test_ema_and_schedule():
    w = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", w)], decay=0.5)
    with torch.no_grad():
        w.fill_(1.0)
    ema.update()  # first update: decay min(0.5, 1/10)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    with ema.swapped():
        assert torch.equal(w.detach(), torch.full((3,), 0.9))
    assert torch.equal(w.detach(), torch.ones(3))
    restored = EMA([("w", w)], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.shadow[0], ema.shadow[0])
    f = warmup_cosine(2, 10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0, abs=1e-12)


def test_entry_point_flags_cover_the_config():
    import dataclasses

    from hart.training.cli import config_from_args
    from hart.training.config import TokenizerTrainConfig
    from scripts.finetune import build_parser
    from scripts.train_tokenizer import build_parser as tokenizer_parser

    args = build_parser().parse_args(["--pretrained", "p", "--output_dir", "o", "--data_dir", "d", "--validation_prompt", "a",
                                      "--validation-prompt", "b", "--lora-rank", "4", "--no_system_prompt"])
    cfg = config_from_args(args)
    assert cfg.validation_prompts == ("a", "b") and cfg.lora_rank == 4 and cfg.use_system_prompt is False
    assert set(vars(args)) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    targs = tokenizer_parser().parse_args(["--model_config", "c.json", "--data_dir", "d", "--output_dir", "o"])
    assert TokenizerTrainConfig(**vars(targs)).model_config == "c.json"
    assert set(vars(targs)) == {f.name for f in dataclasses.fields(TokenizerTrainConfig)}



def test_flags_left_out_take_the_config_defaults():
    from hart.training.cli import config_from_args, finetune_parser, tokenizer_parser
    from hart.training.config import TokenizerTrainConfig

    args = finetune_parser().parse_args(["--pretrained", "p", "--output_dir", "o", "--data_dir", "d"])
    assert config_from_args(args) == FinetuneConfig(pretrained="p", output_dir="o", data_dir="d")
    targs = tokenizer_parser().parse_args(["--model_config", "c.json", "--data_dir", "d", "--output_dir", "o"])
    assert TokenizerTrainConfig(**vars(targs)) == TokenizerTrainConfig(data_dir="d", output_dir="o", model_config="c.json")

def test_command_line_reports_bad_data_without_a_traceback(base, tmp_path, caplog):
    from scripts.finetune import main

    (tmp_path / "empty").mkdir()
    argv = ["--pretrained", base["pretrained"], "--text_encoder", base["text_encoder"],
            "--data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "no images" in caplog.text
