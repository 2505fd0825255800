"""Zero-shot editing with HART: text-guided inpainting (and outpainting) and variations.

Both pipelines share `HARTPipeline`'s components; build one from another without reloading:

    >>> from hart import HARTPipeline
    >>> from hart.pipelines import HARTInpaintPipeline
    >>> pipe = HARTPipeline.from_pretrained("path/to/hart-pipeline")
    >>> inpaint = HARTInpaintPipeline.from_pipe(pipe)
    >>> image = inpaint("a red circle", image=photo, mask_image=mask).images[0]
"""
from __future__ import annotations

import threading
from typing import List, Union

import torch
from diffusers.utils.accelerate_utils import apply_forward_hook

from hart.editing import blend_mask, inpaint_tokens, prepare_image, prepare_mask, variation_tokens
from hart.models.tokenizer import HybridTokenizer
from hart.pipelines.pipeline_hart import HARTPipeline
from hart.sampling import ForcedTokens


@apply_forward_hook  # model offload: the tokenizer moves to the device for this call too
def _encode(vae: HybridTokenizer, img_B3HW: torch.Tensor) -> torch.Tensor:
    return vae.encode_latent(img_B3HW.to(vae.device, vae.dtype))


# The checked edit inputs of the call running in this thread, read by the hooks. Per thread: the
# app serves concurrent requests with one pipeline object.
_CALL = threading.local()


class _EditPipeline(HARTPipeline):
    """Text-to-image whose `known_tokens` hook imposes tokens of an input image.

    `__call__` checks the edit's own arguments, keeps them for the hooks and runs the text-to-image
    call with every other argument unchanged."""

    @property
    def _edit(self) -> dict:
        return _CALL.edit

    @property
    def resolution(self) -> int:
        return self.vae.downsample_factor * self.transformer.patch_nums[-1]

    def _encode_input(self, img_13HW: torch.Tensor) -> torch.Tensor:
        """The input's latent, as the tokenizer encodes it (float32)."""
        return _encode(self.vae, img_13HW).float()

    def _run(self, prompt, edit: dict, kwargs: dict):
        _CALL.edit = edit
        try:
            return super().__call__(prompt, **kwargs)
        finally:
            del _CALL.edit


class HARTInpaintPipeline(_EditPipeline):
    r"""Text-guided inpainting: repaint the white area of `mask_image`, keep the rest.

    At every scale the tokens less than a tenth inside the hole encode the input (re-encoded against
    what was drawn so far), so the new content fits its surroundings; at the end the latent outside the hole
    is exactly the input's, so outside the mask the result is the tokenizer's reconstruction of the
    input (up to the decoder's reach across the border; `blend_radius` > 0 pastes the reconstruction
    back with a soft seam).
    For outpainting, place the image with `hart.editing.outpaint_canvas` and pass its mask.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = None, image=None, mask_image=None, blend_radius: int = 0,
                 **kwargs):
        """Every argument of `HARTPipeline.__call__`, plus `image` (RGB at the model's resolution),
        `mask_image` (same size; white = repaint) and `blend_radius` (pixels of soft seam; 0 = off)."""
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`.")
        if isinstance(blend_radius, bool) or not isinstance(blend_radius, int) or blend_radius < 0:
            raise ValueError(f"`blend_radius` must be a non-negative integer, got {blend_radius!r}.")
        img = prepare_image(image, self.resolution)
        hole = prepare_mask(mask_image, img.shape[-2:])
        return self._run(prompt, dict(image=img, hole=hole, blend_radius=blend_radius), kwargs)

    def known_tokens(self, batch_size: int) -> ForcedTokens:
        f_BChw = self._encode_input(self._edit["image"])
        self._edit.update(f_BChw=f_BChw, hole=self._edit["hole"].to(f_BChw.device))
        return inpaint_tokens(f_BChw, self._edit["hole"], self.transformer.patch_nums, batch_size)

    def postprocess_decoded(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if self._edit["blend_radius"] == 0:
            return images_B3HW
        reconstruction = self.decode_latent(self._edit["f_BChw"])
        soft = blend_mask(self._edit["hole"], self._edit["blend_radius"]).to(images_B3HW.device)
        return soft * images_B3HW + (1 - soft) * reconstruction.to(images_B3HW.device)


class HARTVariationPipeline(_EditPipeline):
    r"""Variations: keep the first `keep_scales` scales of `image` (its layout) and sample the rest.

    `keep_scales = 0` is plain text-to-image; `len(patch_nums) - 1` keeps every discrete scale but
    the last, so only fine detail changes.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = None, image=None, keep_scales: int = 4, **kwargs):
        """Every argument of `HARTPipeline.__call__`, plus `image` (RGB at the model's resolution) and
        `keep_scales` (how many of the coarsest scales to keep from it)."""
        S = len(self.transformer.patch_nums)
        if isinstance(keep_scales, bool) or not isinstance(keep_scales, int) or not 0 <= keep_scales <= S - 1:
            raise ValueError(f"`keep_scales` must be an integer in [0, {S - 1}], got {keep_scales!r}.")
        if image is None:
            raise ValueError("variations need an input `image`.")
        return self._run(prompt, dict(image=prepare_image(image, self.resolution), keep_scales=keep_scales), kwargs)

    def known_tokens(self, batch_size: int) -> ForcedTokens:
        idx_list, _ = self.vae.quantize.encode(self._encode_input(self._edit["image"]), self.transformer.patch_nums)
        return variation_tokens(idx_list, self._edit["keep_scales"], batch_size)
