"""Prior preservation and the old-world check of fine-tuning, on the bundled shapes-world model (which
declares its world) and the tiny fixture model (which declares none)."""
import json
import os
import signal
from collections import Counter

import pytest

import hart.training.prior as prior
from hart.bundled import BUNDLED_MODEL
from hart.data.shapes_dataset import write_dataset
from hart.training.checks import SettingError, made_before, model_guidance, model_world
from hart.training.config import with_defaults
from hart.training.finetune import FinetuneConfig, finetune
from hart.training.prior import MixedBatchSampler
from hart.training.runtime import read_metrics
from tests.test_training_finetune import assert_same_run

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(pretrained=BUNDLED_MODEL, max_steps=6, batch_size=2, lr=1e-3, checkpoint_every=3, prior_ratio=0.5,
           prior_images=8, validation_every=3, validation_world_prompts=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("concept"), 8, seed=3)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.3, 0.9])
def test_the_mix_holds_its_ratio_on_every_process_and_resumes_anywhere(ratio):
    world, batch, n_user, n_prior = 2, 4, 10, 7
    samplers = [MixedBatchSampler(n_user, n_prior, ratio, batch, world_size=world, rank=r, seed=1) for r in range(world)]
    streams = [iter(s) for s in samplers]
    steps = [[next(stream) for stream in streams] for _ in range(40)]  # 40 global micro-batches
    keys = [key for step in steps for rank_batch in step for key in rank_batch]
    counts = Counter(source for source, _, _ in keys)
    assert counts[1] == samplers[0].prior_seen(40) == int(len(keys) * ratio)
    assert all(0 <= i < (n_prior if s else n_user) for s, _, i in keys)
    for step in steps:  # the processes of one step never take the same user sample
        users = [(e, i) for rank_batch in step for s, e, i in rank_batch if s == 0]
        assert len(users) == len(set(users)) or len({e for e, _ in users}) > 1
    per_epoch = Counter((s, e) for s, e, _ in keys if e == 0)  # each epoch is a permutation
    assert per_epoch[(0, 0)] == n_user and per_epoch[(1, 0)] == n_prior
    resumed = iter(MixedBatchSampler(n_user, n_prior, ratio, batch, world_size=world, rank=1, seed=1, start=17))
    assert [next(resumed) for _ in range(5)] == [step[1] for step in steps[17:22]]


@pytest.fixture(scope="module")
def live_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("live")
    seen = Counter()
    get = prior.MixedExamples.__getitem__

    def counting(self, key):
        seen[key[0]] += 1
        return get(self, key)

    prior.MixedExamples.__getitem__ = counting
    try:
        result = finetune(FinetuneConfig(**RUN, data_dir=str(data_dir), output_dir=str(out),
                                         validation_prompts=("a green star",)))
    finally:
        prior.MixedExamples.__getitem__ = get
    return result, seen


def test_world_prior_mixes_in_half_of_the_images(live_run):
    result, seen = live_run
    assert seen == {0: 6, 1: 6}  # 6 steps x 2 images: user and prior samples in turn
    rows = read_metrics(result.log_path)
    assert [r["prior_images_seen"] for r in rows[1:]] == [r["images_seen"] / 2 for r in rows[1:]]
    # distillation (on by default with LoRA): nothing to correct at the first step, then the adapters pull away
    assert abs(rows[1]["prior_kl"]) < 1e-6 and all(r["prior_kl"] > 0 for r in rows[2:])
    folder = result.export_dir.parent / "prior"
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len(list(folder.glob("*.png"))) == 8
    assert json.loads((folder / "prior_info.json").read_text()) == {"num_images": 8, "seed": 0, "world": "shapes"}
    assert all(json.loads(line)["text"] for line in lines)


def test_old_world_score_is_logged_at_step_0_and_every_validation(live_run):
    result, _ = live_run
    rows = read_metrics(result.log_path)
    scored = {int(r["step"]): r["old_world_score"] for r in rows if "old_world_score" in r}
    assert sorted(scored) == [0, 3, 6] and all(0 <= v <= 1 for v in scored.values())
    assert "loss" not in rows[0]  # step 0: the starting model's score alone
    validation = result.export_dir.parent / "validation"
    report = json.loads((validation / "step-00000006.json").read_text())
    assert report["scores"]["overall"] == scored[6] and report["start"]["overall"] == scored[0]
    assert len(report["scores"]) == 9 and report["prompts"] == 8  # eight categories and 'overall'
    assert (validation / "world-step-00000003.png").is_file() and (validation / "step-00000006.png").is_file()
    assert model_world(result.export_dir) == "shapes"  # the export keeps the declaration
    # and the bundled model's own guidance, at which the validation sampled
    assert report["guidance_scale"] == model_guidance(result.export_dir) == model_guidance(BUNDLED_MODEL) == 3.0


def test_resume_with_the_mix_and_a_cache_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    cache = str(tmp_path / "cache")
    settings = dict(RUN, data_dir=str(data_dir), cache_dir=cache, flip=True, validation_world_prompts=0)
    full = finetune(FinetuneConfig(**settings, output_dir=str(tmp_path / "full")))

    def interrupt(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = str(tmp_path / "split")
    first = finetune(FinetuneConfig(**settings, output_dir=out), interrupt)
    assert first.stopped_early and first.step == 3
    made = (tmp_path / "split" / "prior" / "cache" / "cache_info.json").stat().st_mtime_ns
    second = finetune(FinetuneConfig(**settings, output_dir=out, resume="latest"))
    assert (tmp_path / "split" / "prior" / "cache" / "cache_info.json").stat().st_mtime_ns == made  # reused
    assert_same_run(full, second, ("loss", "token_loss", "diffusion_loss", "grad_norm", "prior_images_seen", "prior_kl"))
    with pytest.raises(SettingError, match="prior images made otherwise .--prior_images differ"):
        finetune(FinetuneConfig(**{**settings, "prior_images": 4}, output_dir=out, resume="latest"))
    with pytest.raises(Exception, match="prior_ratio: checkpoint 0.5, now 0.25"):
        finetune(FinetuneConfig(**{**settings, "prior_ratio": 0.25}, output_dir=out, resume="latest"))


def test_prompt_prior_is_drawn_by_the_base_model(fixtures, tmp_path):
    from tests.test_training_data import make_folder
    from tests.utils import fixture_sizes

    side = fixture_sizes().image_size
    data = make_folder(tmp_path / "data", n=4, size=(side, side))
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a red car  \n")
    base = dict(pretrained=str(fixtures / "ckpt"), text_encoder=str(fixtures / "ckpt" / "text_encoder"),
                data_dir=str(data), batch_size=2, max_steps=2, prior_ratio=0.5, prior_images=3)
    with pytest.raises(SettingError, match="declares no world.*--prior_prompts"):
        finetune(FinetuneConfig(**base, output_dir=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()
    result = finetune(FinetuneConfig(**base, output_dir=str(tmp_path / "out"), prior_prompts=str(tmp_path / "prompts.txt")))
    folder = tmp_path / "out" / "prior"
    captions = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert captions == ["a cat", "a red car", "a cat"]
    from PIL import Image

    assert Image.open(folder / "00002.png").size == (side, side)
    rows = read_metrics(result.log_path)
    assert [r["prior_images_seen"] for r in rows] == [1.0, 2.0] and "old_world_score" not in rows[-1]
    recipe = json.loads((folder / "prior_info.json").read_text())
    assert made_before(folder, recipe) and recipe["guidance_scale"] == 4.5  # the official layout's own
    with pytest.raises(SettingError, match="--prior_prompts differ"):
        made_before(folder, {**recipe, "prompts": ["a dog"]})


def test_prior_distillation_defaults_and_refusals(data_dir, tmp_path):
    base = dict(pretrained=BUNDLED_MODEL, data_dir=str(data_dir), output_dir=str(tmp_path / "o"))
    assert with_defaults(FinetuneConfig(**base)).prior_distill == 1.0  # LoRA + the world's prior samples
    assert with_defaults(FinetuneConfig(**base, lora_rank=0)).prior_distill == 0.0
    assert with_defaults(FinetuneConfig(**base, prior_ratio=0)).prior_distill == 0.0
    assert with_defaults(FinetuneConfig(**base, prior_distill=0)).prior_distill == 0.0
    with pytest.raises(SettingError, match="--prior_distill.*--lora_rank 0"):
        FinetuneConfig(**base, lora_rank=0, prior_distill=1.0)
    with pytest.raises(SettingError, match="--prior_distill.*--prior_ratio 0"):
        FinetuneConfig(**base, prior_ratio=0, prior_distill=1.0)
    with pytest.raises(SettingError, match="--prior_distill"):
        FinetuneConfig(**base, prior_distill=-1)
