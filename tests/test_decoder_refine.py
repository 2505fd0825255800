"""Decoder refinement (hart.training.decoder_refine) on the bundled model: latents drawn after kept scales,
decoder training that leaves the encoder and codebook alone, and a fine-tune refining its exported decoder."""
import json
import logging
from pathlib import Path

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
    images, captions = renders
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
    images, captions = renders
    S = len(pipe.transformer.patch_nums)
    for keep in (0, S):
        with pytest.raises(ValueError, match="keep_scales"):
            drawn_latents(pipe, images, captions, keep_scales=keep, guidance_scale=3.0, seeds=range(4))
    with pytest.raises(ValueError, match="one caption and one seed per image"):
        drawn_latents(pipe, images, captions[:3], keep_scales=2, guidance_scale=3.0, seeds=range(4))
    with pytest.raises(ValueError, match="uint8"):
        drawn_latents(pipe, images.float() / 127.5 - 1, captions, keep_scales=2, guidance_scale=3.0, seeds=range(4))


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


def _model_with_notes(folder, notes):
    """The bundled model's components under `folder`, with `notes` as its bundled.json."""
    from hart.bundled import BUNDLED_MODEL

    folder.mkdir()
    for entry in Path(BUNDLED_MODEL).iterdir():
        if entry.name != "bundled.json":
            (folder / entry.name).symlink_to(entry)
    (folder / "bundled.json").write_text(json.dumps(notes))
    return folder


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    from hart.data.shapes_dataset import write_dataset

    return write_dataset(tmp_path_factory.mktemp("concept"), 4, seed=2)


@pytest.mark.parametrize("refined_before,mode,refined_after", [
    (True, "auto", True), (True, "never", False), (False, "auto", False), (False, "always", True)])
def test_finetune_refines_the_exported_decoder_when_the_model_says_its_decoder_was_refined(
        tmp_path, concept, one_thread, caplog, refined_before, mode, refined_after):
    from hart import HybridTokenizer
    from hart.training.finetune import FinetuneConfig, finetune

    notes = {"world": "shapes", **({"decoder_refined": True} if refined_before else {})}
    model = _model_with_notes(tmp_path / "model", notes)
    with caplog.at_level(logging.INFO, logger="hart.training.export"):
        result = finetune(FinetuneConfig(pretrained=str(model), data_dir=str(concept), output_dir=str(tmp_path / "run"),
                                         max_steps=1, batch_size=2, prior_ratio=0, validation_world_prompts=0,
                                         adapt_tokenizer="never", refine_decoder=mode))
    base = HybridTokenizer.from_pretrained(model / "vae").state_dict()
    exported = HybridTokenizer.from_pretrained(result.export_dir / "vae").state_dict()
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], exported[k])}
    assert changed == ({"decoder", "post_quant_conv"} if refined_after else set())  # codes keep their meaning
    saved_notes = json.loads((result.export_dir / "bundled.json").read_text())
    assert saved_notes == {**notes, **({"decoder_refined": True} if refined_after else {})}
    said = [r.getMessage() for r in caplog.records if "refined the decoder" in r.getMessage()]
    assert said == (["refined the decoder for 2 steps on 8 latents the fine-tuned model drew "
                     "(4 for your 4 images, 4 scenes of its world)"] if refined_after else [])


def test_a_run_from_a_cache_alone_says_it_cannot_refine_the_decoder(tmp_path, concept, one_thread, caplog):
    from hart import HybridTokenizer
    from hart.training.finetune import FinetuneConfig, finetune

    model = _model_with_notes(tmp_path / "model", {"world": "shapes", "decoder_refined": True})
    run = dict(pretrained=str(model), cache_dir=str(tmp_path / "cache"), max_steps=1, batch_size=2, prior_ratio=0,
               validation_world_prompts=0, adapt_tokenizer="never")
    finetune(FinetuneConfig(**run, data_dir=str(concept), output_dir=str(tmp_path / "cached"), cache_only=True))
    with caplog.at_level(logging.WARNING, logger="hart.training.decoder_refine"):
        result = finetune(FinetuneConfig(**run, output_dir=str(tmp_path / "run")))
    assert any("not refined" in r.getMessage() and "--data_dir" in r.getMessage() for r in caplog.records)
    base = HybridTokenizer.from_pretrained(model / "vae").state_dict()
    exported = HybridTokenizer.from_pretrained(result.export_dir / "vae").state_dict()
    assert all(torch.equal(base[k], exported[k]) for k in base)
