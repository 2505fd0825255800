"""Zero-shot editing: inpainting, outpainting and variations (fixture checkpoint, CPU)."""
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch

from hart.editing import outpaint_canvas
from hart.pipelines import HARTInpaintPipeline, HARTPipeline, HARTVariationPipeline
from tests.utils import fixture_sizes

SIDE = fixture_sizes().image_size  # the fixture checkpoint's image size
HOLE = (SIDE // 4, SIDE // 4, 3 * SIDE // 4, 3 * SIDE // 4)  # the middle quarter of the image


@pytest.fixture(scope="module")
def pipes(fixture_pipe):
    fixture_pipe.set_progress_bar_config(disable=True)
    return HARTInpaintPipeline.from_pipe(fixture_pipe), HARTVariationPipeline.from_pipe(fixture_pipe)


@pytest.fixture(scope="module")
def picture(recorded):
    img = recorded("tokenizer/tokenizer")["input_images"][0]  # (3, H, W) in [-1, 1]
    return PIL.Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())


def hole_mask(size, box):
    m = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return PIL.Image.fromarray(m)


def psnr(a, b):
    return 10 * torch.log10(1 / ((a - b) ** 2).mean()).item()


def reconstruction(pipe, picture):
    img = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return ((pipe.vae.decode_latent(pipe.vae.encode_latent(img)) + 1) / 2).clamp(0, 1)


def to_tensor(picture):
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_inpainting_keeps_the_known_latent_and_repaints_the_hole(pipes, picture):
    # The random-weight fixture decoder mixes the whole latent (global attention), so pixels
    # are compared with blending on; the latent itself must be exact outside the hole.
    inpaint, _ = pipes
    size, box = SIDE, HOLE
    latent = inpaint("a red circle", image=picture, mask_image=hole_mask(size, box), output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images
    f_in = inpaint.vae.encode_latent(to_tensor(picture))
    d = inpaint.vae.downsample_factor
    known = torch.ones(size // d, size // d, dtype=torch.bool)
    known[box[1] // d : box[3] // d, box[0] // d : box[2] // d] = False
    assert torch.equal(latent[0][:, known], f_in[0][:, known])
    assert (latent[0][:, ~known] - f_in[0][:, ~known]).abs().mean() > 0.05

    radius = 4
    out = inpaint("a red circle", image=picture, mask_image=hole_mask(size, box), output_type="pt",
                  blend_radius=radius, generator=torch.Generator().manual_seed(0)).images[0]
    recon = reconstruction(inpaint, picture)[0]
    far = torch.ones(size, size, dtype=torch.bool)
    far[box[1] - 2 * radius : box[3] + 2 * radius, box[0] - 2 * radius : box[2] + 2 * radius] = False
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[box[1] : box[3], box[0] : box[2]] = True
    assert psnr(out[:, far], recon[:, far]) >= 35
    assert (out[:, hole] - recon[:, hole]).abs().mean() > 0.02


def test_known_tokens_are_re_encoded_against_what_was_drawn(pipes, picture):
    # Nothing to repaint: re-encoding reproduces the tokenizer's own codes at every scale. With the
    # 1 x 1 scale drawn freely, the next scale's known codes change so as to head back to the input.
    from hart.sampling import ForcedTokens

    inpaint, _ = pipes
    pn = inpaint.transformer.patch_nums
    f_BChw = inpaint.vae.encode_latent(to_tensor(picture)).float()
    codes, _ = inpaint.vae.quantize.encode(f_BChw, pn)

    def drawn(first_scale_known):
        seen = {}
        known = [torch.full((1, p * p), si > 0 or first_scale_known) for si, p in enumerate(pn)]
        with mock.patch.object(inpaint, "known_tokens", lambda batch: ForcedTokens(mask=known, target_BChw=f_BChw)):
            HARTPipeline.__call__(
                inpaint, "a red circle", generator=torch.Generator().manual_seed(1), output_type="latent", top_k=1,
                callback_on_step_end=lambda p, si, side, t: seen.__setitem__(si, t["idx"]) or {},
                callback_on_step_end_tensor_inputs=["idx"])
        return seen

    everything_known = drawn(True)
    assert all(torch.equal(everything_known[si], codes[si]) for si in range(len(pn)))
    first_drawn = drawn(False)
    assert not torch.equal(first_drawn[0], codes[0])  # the model's own 1 x 1 code is not the input's...
    assert not torch.equal(first_drawn[1], codes[1])  # ...so the 2 x 2 codes that encode the input change


def test_outpainting_keeps_the_original_latent_in_place(pipes, picture):
    inpaint, _ = pipes
    size, d = picture.size[0], inpaint.vae.downsample_factor
    canvas, mask = outpaint_canvas(picture.resize((size // 2, size // 2)), size, offset=(0, 0))
    assert np.asarray(mask)[: size // 2, : size // 2].max() == 0 and np.asarray(mask)[size // 2 :].min() == 255
    latent = inpaint("a garden", image=canvas, mask_image=mask, output_type="latent",
                     generator=torch.Generator().manual_seed(1)).images
    f_in = inpaint.vae.encode_latent(to_tensor(canvas))
    q = size // 2 // d
    assert torch.equal(latent[0, :, :q, :q], f_in[0, :, :q, :q])
    with pytest.raises(ValueError, match="covers the whole"):
        outpaint_canvas(picture, size // 2)
    with pytest.raises(ValueError, match="falls outside"):
        outpaint_canvas(picture, size, offset=(size, 0))


def test_shifted_canvas_cuts_what_falls_outside(picture):
    size = picture.size[0]
    canvas, mask = outpaint_canvas(picture, size, offset=(-size // 4, 0), fill=(0, 0, 255))
    canvas, mask = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(canvas[:, : 3 * size // 4], np.asarray(picture)[:, size // 4 :])
    assert (canvas[:, 3 * size // 4 :] == (0, 0, 255)).all()
    assert mask[:, : 3 * size // 4].max() == 0 and mask[:, 3 * size // 4 :].min() == 255


def test_variations_keep_the_structure_of_kept_scales(pipes, picture, fixture_pipe):
    _, vary = pipes
    pn = vary.transformer.patch_nums
    img = to_tensor(picture)
    idx_list, _ = vary.vae.img_to_tokens(img, pn)
    seen = {}
    grab = lambda p, si, side, t: seen.__setitem__(si, t["idx"]) or {}
    vary("a lemur", image=picture, keep_scales=len(pn) - 1, generator=torch.Generator().manual_seed(2),
         output_type="latent", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["idx"])
    assert all(torch.equal(seen[si], idx_list[si]) for si in range(len(pn) - 1))
    a = vary("a lemur", image=picture, keep_scales=0, generator=torch.Generator().manual_seed(2), output_type="pt")
    b = fixture_pipe("a lemur", generator=torch.Generator().manual_seed(2), output_type="pt")
    assert torch.equal(a.images, b.images)  # keep_scales=0 is plain text-to-image


@pytest.mark.parametrize(
    "change,words",
    [
        ({"mask_image": hole_mask(SIDE // 2, (0, 0, SIDE // 8, SIDE // 8))}, "must match"),
        ({"mask_image": hole_mask(SIDE, (0, 0, 0, 0))}, "empty"),
        ({"mask_image": hole_mask(SIDE, (0, 0, SIDE, SIDE))}, "whole image"),
        ({"image": PIL.Image.new("RGB", (3 * SIDE // 4, 3 * SIDE // 4))}, "resize"),
        ({"image": "not an image"}, "PIL image"),
        ({"blend_radius": -1}, "blend_radius"),
        ({"mask_image": None}, "mask_image"),
    ],
)
def test_bad_edit_inputs_are_refused(pipes, picture, change, words):
    inpaint, _ = pipes
    kwargs = {"image": picture, "mask_image": hole_mask(SIDE, HOLE), **change}
    with pytest.raises((ValueError, TypeError), match=words):
        inpaint("a cat", **kwargs)


def test_grey_and_rgba_images_are_converted(pipes, picture):
    inpaint, _ = pipes
    for mode in ("L", "RGBA"):
        out = inpaint("a cat", image=picture.convert(mode), mask_image=hole_mask(SIDE, HOLE),
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, SIDE, SIDE, 3)
