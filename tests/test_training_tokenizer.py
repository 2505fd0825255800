"""Hybrid tokenizer training: from scratch, decoder-only fine-tuning, the PatchGAN and exact resume."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from hart.loading import load_official_tokenizer
from hart.models.tokenizer import HybridTokenizer
from hart.training.runtime import read_metrics
from hart.training.tokenizer_training import PatchDiscriminator, TokenizerTrainConfig, code_statistics, train_tokenizer
from tests.test_training_data import make_folder
from tests.utils import fixture_sizes

TINY = {"vocab_size": 64, "latent_channels": 8, "base_channels": 32, "channel_multipliers": [1, 1, 1, 1, 1],
        "num_res_blocks": 1, "patch_nums": [1, 2]}  # 32 px images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tokenizer.json"
    path.write_text(json.dumps(TINY))
    return path


def tiny(data_dir, model_config, out, **kw):
    settings = dict(max_steps=8, batch_size=4, lr=3e-3, checkpoint_every=100)
    settings.update(kw)
    return TokenizerTrainConfig(data_dir=str(data_dir), output_dir=str(out), model_config=str(model_config), **settings)


def test_from_scratch_lowers_reconstruction_and_loads(data_dir, model_config, tmp_path):
    target = train_tokenizer(tiny(data_dir, model_config, tmp_path))
    rows = read_metrics(tmp_path / "logs" / "metrics.csv")
    recon = [r["recon_loss"] for r in rows]
    assert np.mean(recon[-4:]) < 0.6 * recon[0], recon
    assert {r["skipped_continuous"] for r in rows} == {0.0, 1.0}  # both halves of the alternating training
    assert all(0 < r["code_usage"] <= 1 and r["code_perplexity"] >= 1 for r in rows)

    loaded = HybridTokenizer.from_pretrained(target)
    assert loaded.config.patch_nums == [1, 2] and loaded.config.vocab_size == 64
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    idx, residual = loaded.img_to_tokens(img)
    assert [i.shape for i in idx] == [(2, 1), (2, 4)] and residual.shape == (2, 4, 8)
    assert loaded.tokens_to_img(idx, residual).shape == (2, 3, 32, 32)


def test_decoder_only_finetune_of_the_official_tokenizer(fixtures, tmp_path):
    start = load_official_tokenizer(fixtures / "ckpt" / "tokenizer")
    side = fixture_sizes().image_size  # the tokenizer trains at its model's resolution
    data_dir = make_folder(tmp_path / "data", n=4, size=(side + 8, side + 16))
    cfg = TokenizerTrainConfig(data_dir=str(data_dir), output_dir=str(tmp_path), pretrained=str(fixtures / "ckpt"),
                               trainable="decoder", max_steps=1, batch_size=2, lr=1e-3)
    tuned = HybridTokenizer.from_pretrained(train_tokenizer(cfg))
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


def test_gan_run_resumes_exactly(data_dir, model_config, tmp_path):
    gan = dict(max_steps=4, disc_weight=0.1, disc_start_step=2)
    train_tokenizer(tiny(data_dir, model_config, tmp_path / "a", **gan))
    expected = read_metrics(tmp_path / "a" / "logs" / "metrics.csv")
    assert [r["disc_loss"] > 0 for r in expected] == [False, False, True, True]

    def interrupt(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train_tokenizer(tiny(data_dir, model_config, tmp_path / "b", **gan), interrupt) is None
    train_tokenizer(tiny(data_dir, model_config, tmp_path / "b", resume="latest", **gan))
    resumed = read_metrics(tmp_path / "b" / "logs" / "metrics.csv")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        for key in ("loss", "recon_loss", "vq_loss", "gen_adv_loss", "disc_loss", "code_perplexity"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key)


def test_discriminator_layout_and_code_statistics():
    disc = PatchDiscriminator()
    keys = {k.split(".")[1] for k in disc.state_dict()}
    assert keys == {"0", "2", "3", "5", "6", "8", "9", "11"}  # the release's `disc.main.*` indices
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    hits = torch.tensor([[2.0, 0, 0, 2], [0, 0, 0, 0]])
    stats = code_statistics(hits)
    assert stats["code_usage"] == 0.5 and stats["code_perplexity"] == pytest.approx(2.0)


def test_dead_codes_move_onto_residuals_the_lookup_sees():
    from hart.models.quantizer import MultiScaleQuantizer, area_down

    torch.manual_seed(0)
    q = MultiScaleQuantizer(16, 4)
    with torch.no_grad():
        q.embedding.weight.fill_(100.0)  # far from every latent: nothing but code 0 is ever used
        q.embedding.weight[0] = 0.0
    before = q.embedding.weight.detach().clone()
    f = torch.randn(3, 4, 2, 2)
    dead = torch.ones(16, dtype=torch.bool)
    dead[0] = False
    assert q.restart_codes(dead, f, [1, 2], torch.Generator().manual_seed(0)) == 15
    after = q.embedding.weight.detach()
    assert torch.equal(after[0], before[0])
    # scale 0 sees the pooled latent; scale 1 the latent minus the scale-0 code (code 0 = zero, phi'd)
    first = area_down(f, 1).permute(0, 2, 3, 1).reshape(-1, 4)
    second = (f - q.apply_phi(torch.zeros(3, 4, 2, 2), 0, 2)).permute(0, 2, 3, 1).reshape(-1, 4)
    seen = torch.cat([first, second])
    assert all(torch.isclose(row, seen, atol=1e-6).all(dim=1).any() for row in after[1:])


def test_training_restarts_dead_codes_until_the_set_step(data_dir, model_config, tmp_path):
    train_tokenizer(tiny(data_dir, model_config, tmp_path, max_steps=6, restart_dead_codes_every=2,
                         restart_until_step=4))
    rows = read_metrics(tmp_path / "logs" / "metrics.csv")
    moved = {int(r["step"]): r["restarted_codes"] for r in rows}
    assert moved[2] > 0 and moved[1] == moved[3] == moved[5] == moved[6] == 0, moved
