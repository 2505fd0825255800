"""Checking and adapting the image tokenizer before a fine-tune (`hart.training.tokenizer_adapt`)."""
import copy

import numpy as np
import pytest
import torch

from hart.data.concepts import CONCEPT_COLOURS, render_concept
from hart.training.tokenizer_adapt import (TokenizerCheck, adapt_decoder, needs_adapting, reconstruction_psnr,
                                           world_images)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    from hart import HARTPipeline

    return HARTPipeline.from_folder("bundled").vae


def pink_rings(n: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [np.asarray(render_concept("ring", CONCEPT_COLOURS["pink"], *rng.integers(4, 70, 2), int(rng.integers(40, 53))))
              for _ in range(n)]
    return torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def test_the_bundled_tokenizer_falls_short_on_an_unseen_colour(vae):
    check = TokenizerCheck(reconstruction_psnr(vae, pink_rings(8)), reconstruction_psnr(vae, world_images("shapes", 16)))
    assert check.short_by > 3  # pink comes back orange
    assert needs_adapting(check, "auto") and not needs_adapting(check, "never")
    assert not needs_adapting(TokenizerCheck(30.0, 31.0), "auto") and needs_adapting(TokenizerCheck(30.0, 31.0), "always")
    assert not needs_adapting(TokenizerCheck(20.0, None), "auto")  # no world: nothing to compare with
    assert world_images("photos") is None


def test_adapting_the_decoder_learns_the_images_and_keeps_the_codes(vae):
    vae = copy.deepcopy(vae)
    rings, world = pink_rings(8), world_images("shapes", 8)
    before = reconstruction_psnr(vae, rings)
    frozen = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    with torch.no_grad():
        codes_before = vae.img_to_tokens(rings)[0]
    adapt_decoder(vae, rings, world, steps=30, seed=0)
    assert reconstruction_psnr(vae, rings) > before + 2
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in frozen.items())  # encoder and codebook as they were
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(vae.img_to_tokens(rings)[0], codes_before))
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_finetune_adapts_saves_exports_and_resumes_with_the_adapted_tokenizer(fixtures, tmp_path):
    from hart import HARTPipeline
    from hart.training.finetune import FinetuneConfig, finetune
    from tests.test_training_data import make_folder
    from tests.utils import fixture_sizes

    side = fixture_sizes().image_size
    data = make_folder(tmp_path / "data", n=8, size=(side, side))
    base = dict(pretrained=str(fixtures / "ckpt"), text_encoder=str(fixtures / "ckpt" / "text_encoder"))
    settings = dict(data_dir=str(data), output_dir=str(tmp_path / "run"), batch_size=4, lr=1e-3, lora_rank=0,
                    checkpoint_every=2, validation_world_prompts=0, adapt_tokenizer="always", tokenizer_steps=3)
    first = finetune(FinetuneConfig(**base, max_steps=2, **settings))
    check = TokenizerCheck.load(tmp_path / "run" / "tokenizer" / "check.json")
    assert check.adapted and check.steps == 3 and check.reference_psnr is None  # the fixture declares no world
    original = HARTPipeline.from_folder(base["pretrained"], base["text_encoder"]).vae.state_dict()
    exported = HARTPipeline.from_folder(str(first.export_dir)).vae.state_dict()
    decoder = [k for k in original if k.startswith("decoder.")]
    assert any(not torch.equal(original[k], exported[k]) for k in decoder)
    assert all(torch.equal(original[k], exported[k]) for k in original if k.startswith(("encoder.", "quantize.")))
    saved = HARTPipeline.from_folder(str(first.export_dir)).vae  # the run's tokenizer, then resumed: kept, not redone
    resumed = finetune(FinetuneConfig(**base, max_steps=4, resume="latest", **settings))
    again = HARTPipeline.from_folder(str(resumed.export_dir)).vae.state_dict()
    assert all(torch.equal(again[k], v) for k, v in saved.state_dict().items())
