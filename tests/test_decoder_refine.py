"""Decoder refinement (hart.training.decoder_refine) on the bundled model: latents drawn after kept scales,
and decoder training that leaves the encoder and codebook alone."""
import numpy as np
import pytest
import torch

from hart.data.captions import caption
from hart.data.shapes import render, sample_scene
from hart.training.decoder_refine import drawn_latents, refine_decoder


@pytest.fixture(scope="module")
def renders():
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(4)]
    pixels = torch.stack([torch.from_numpy(np.array(render(s).convert("RGB"))).permute(2, 0, 1) for s in scenes])
    return pixels, [caption(s, rng) for s in scenes]


def test_more_kept_scales_draw_a_latent_closer_to_the_images_own(bundled, renders):
    pipe = bundled
    pixels, captions = renders
    images = pixels.float() / 127.5 - 1
    S = len(pipe.transformer.patch_nums)
    gap = {}
    for keep in (1, S - 1):
        drawn, own = drawn_latents(pipe, images, captions, keep_scales=keep, guidance_scale=3.0, seeds=range(4))
        again, _ = drawn_latents(pipe, images, captions, keep_scales=keep, guidance_scale=3.0, seeds=range(4))
        assert drawn.shape == own.shape == (4, pipe.vae.config.latent_channels, 16, 16)
        assert torch.equal(drawn, again)  # one seed per image: the same draw
        gap[keep] = (drawn - own).square().mean().item()
    assert gap[S - 1] < 0.5 * gap[1]


def test_drawn_latents_name_bad_arguments(bundled, renders):
    pipe = bundled
    pixels, captions = renders
    images = pixels.float() / 127.5 - 1
    S = len(pipe.transformer.patch_nums)
    for keep in (0, S):
        with pytest.raises(ValueError, match="keep_scales"):
            drawn_latents(pipe, images, captions, keep_scales=keep, guidance_scale=3.0, seeds=range(4))
    with pytest.raises(ValueError, match="one caption and one seed per image"):
        drawn_latents(pipe, images, captions[:3], keep_scales=2, guidance_scale=3.0, seeds=range(4))


def test_refine_decoder_fits_its_pairs_and_trains_only_the_decoding_half(renders):
    from hart import HybridTokenizer
    from hart.bundled import BUNDLED_MODEL

    pixels, _ = renders
    vae = HybridTokenizer.from_pretrained(f"{BUNDLED_MODEL}/vae")
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        idx, residual = vae.img_to_tokens(pixels.float() / 127.5 - 1)
        own = vae.quantize.idx_to_fhat(idx, vae.config.patch_nums, residual)
    drawn = own + 0.5 * torch.randn(own.shape, generator=torch.Generator().manual_seed(0))  # faulty latents
    torch.manual_seed(0)
    log = refine_decoder(vae, drawn, own, pixels, steps=40, lr=1e-3, batch_size=4, own_share=0.0, warmup_steps=1,
                         log_every=39)
    assert [s for s, _ in log] == [0, 39]
    assert log[-1][1] < 0.8 * log[0][1]
    after = vae.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder", "post_quant_conv"}
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_refine_decoder_names_bad_arguments(renders):
    from hart import HybridTokenizer
    from hart.bundled import BUNDLED_MODEL

    pixels, _ = renders
    vae = HybridTokenizer.from_pretrained(f"{BUNDLED_MODEL}/vae")
    z = torch.zeros(4, vae.config.latent_channels, 16, 16)
    with pytest.raises(ValueError, match="must pair up"):
        refine_decoder(vae, z, z[:3], pixels, steps=1, lr=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        refine_decoder(vae, z, z, pixels.float(), steps=1, lr=1e-4)
    with pytest.raises(ValueError, match="steps >= 1"):
        refine_decoder(vae, z, z, pixels, steps=0, lr=1e-4)
