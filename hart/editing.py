"""Zero-shot editing helpers: images and masks in, forced tokens out.

Next-scale models edit without training: tokens of the known region are imposed at every scale
and only the rest is sampled. Mask convention (as diffusers): white / 1 = repaint, black / 0 = keep.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import PIL.Image
import torch

from hart.models.quantizer import area_down
from hart.sampling import ForcedTokens

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

# A token is generated at a scale when at least this fraction of its area is to be repainted, and
# otherwise re-encoded from the input. The threshold is low: a coarse token that the hole barely touches
# is still generated, so new objects can form there (forcing it to the input's code keeps a coarse map
# of the old picture under the hole, on which the transformer draws nothing). Re-encoding the known
# tokens against what was drawn keeps the surroundings on course whatever the coarse tokens became.
GENERATE_IF_HOLE_FRACTION = 0.1


def _to_tensor(x: ImageInput, name: str, channels: int) -> torch.Tensor:
    """(C, H, W) float in [0, 1] from PIL, HWC/HW numpy (uint8 or [0, 1] floats) or CHW/BCHW torch."""
    if isinstance(x, PIL.Image.Image):
        try:
            x = x.convert("RGB" if channels == 3 else "L")
        except (OSError, ValueError) as e:
            raise ValueError(f"`{name}` cannot be converted to {'RGB' if channels == 3 else 'grey-scale'}: {e}") from e
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        arr = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        t = torch.from_numpy(arr)
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    elif isinstance(x, torch.Tensor):
        t = x.detach().float().cpu()
        t = t[0] if t.dim() == 4 else t
        t = t.unsqueeze(0) if t.dim() == 2 else t
    else:
        raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(x).__name__}.")
    if t.dim() != 3 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"`{name}` has shape {tuple(t.shape)}; expected an image of height x width pixels.")
    if channels == 3 and t.shape[0] in (1, 4):
        t = t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]  # grey-scale or RGBA: as convert("RGB")
    elif channels == 1 and t.shape[0] in (3, 4):
        t = t[:3].mean(0, keepdim=True)
    if t.shape[0] != channels:
        raise ValueError(f"`{name}` has {t.shape[0]} channels; expected {channels}.")
    return t.clamp(0, 1)


def prepare_image(image: ImageInput, resolution: int) -> torch.Tensor:
    """An RGB image at the model's resolution as (1, 3, H, W) in [-1, 1]."""
    t = _to_tensor(image, "image", 3)
    if t.shape[1:] != (resolution, resolution):
        raise ValueError(
            f"`image` is {t.shape[2]}x{t.shape[1]} pixels but this model works at {resolution}x{resolution}: "
            "resize or crop it first (or place it with `outpaint_canvas`)."
        )
    return t.unsqueeze(0) * 2 - 1


def prepare_mask(mask: ImageInput, image_size: Tuple[int, int]) -> torch.Tensor:
    """A repaint mask (1, 1, H, W) of 0/1 floats; refuses masks of another size, empty or full."""
    m = _to_tensor(mask, "mask_image", 1)
    if tuple(m.shape[1:]) != tuple(image_size):
        raise ValueError(
            f"`mask_image` is {m.shape[2]}x{m.shape[1]} but `image` is {image_size[1]}x{image_size[0]}: they must match."
        )
    m = (m > 0.5).float().unsqueeze(0)
    if m.sum() == 0:
        raise ValueError("`mask_image` is empty (nothing to repaint): white marks the area to generate.")
    if m.sum() == m.numel():
        raise ValueError("`mask_image` covers the whole image: use the text-to-image pipeline instead.")
    return m


def inpaint_tokens(f_BChw: torch.Tensor, hole_11HW: torch.Tensor, patch_nums, batch: int) -> ForcedTokens:
    """Forced tokens for inpainting: where less than `GENERATE_IF_HOLE_FRACTION` of a token is in the
    hole, the code that encodes the input's latent `f_BChw` from what was drawn so far; the final latent
    pinned to the input's on every latent position that the hole does not touch."""
    hole_11HW = hole_11HW.to(f_BChw.device)
    known = [(area_down(hole_11HW, p).flatten(1) < GENERATE_IF_HOLE_FRACTION).expand(batch, -1) for p in patch_nums]
    untouched_BPP = (area_down(hole_11HW, patch_nums[-1])[:, 0] == 0).expand(batch, -1, -1)
    f_BChw = f_BChw.expand(batch, -1, -1, -1)
    return ForcedTokens(mask=known, target_BChw=f_BChw, latent_BChw=f_BChw, latent_mask_Bhw=untouched_BPP)


def variation_tokens(idx_list, keep_scales: int, batch: int) -> ForcedTokens:
    """Forced tokens for variations: the first `keep_scales` scales of the input, whole."""
    return ForcedTokens(idx=[idx.expand(batch, -1) for idx in idx_list[:keep_scales]])


def blend_mask(hole_11HW: torch.Tensor, radius: int) -> torch.Tensor:
    """A soft repaint mask: the hole grown by `radius` pixels with a linear ramp outwards."""
    if radius <= 0:
        return hole_11HW
    k = 2 * radius + 1
    grown = torch.nn.functional.max_pool2d(hole_11HW, k, stride=1, padding=radius)
    return torch.nn.functional.avg_pool2d(grown, k, stride=1, padding=radius, count_include_pad=False).clamp(0, 1)


def outpaint_canvas(
    image: PIL.Image.Image, size: int, offset: Tuple[int, int] = None, fill=(128, 128, 128)
) -> Tuple[PIL.Image.Image, PIL.Image.Image]:
    """Place `image` on a `size` x `size` canvas: centred, or with its top-left corner at `offset` =
    (left, top), which may be negative or push it past the far edge (a shifted canvas: what falls
    outside is cut).

    Returns the canvas and the mask of the new area (white = to generate), ready for inpainting.
    """
    image = image.convert("RGB")
    w, h = image.size
    left, top = offset if offset is not None else ((size - w) // 2, (size - h) // 2)
    kept = (max(left, 0), max(top, 0), min(left + w, size), min(top + h, size))
    if kept[0] >= kept[2] or kept[1] >= kept[3]:
        raise ValueError(f"a {w}x{h} image at offset ({left}, {top}) falls outside the {size}x{size} canvas.")
    if kept == (0, 0, size, size):
        raise ValueError(f"a {w}x{h} image at offset ({left}, {top}) covers the whole {size}x{size} canvas: "
                         "nothing is left to generate; shrink it or shift it.")
    canvas = PIL.Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(image, (left, top))  # PIL cuts what falls outside the canvas
    mask = PIL.Image.new("L", (size, size), 255)
    mask.paste(0, kept)
    return canvas, mask
