"""Zero-shot editing with HART: text-guided inpainting (and outpainting) and variations.

Both pipelines share `HARTPipeline`'s components; build one from another without reloading:

    >>> from hart import HARTPipeline
    >>> from hart.pipelines import HARTInpaintPipeline
    >>> pipe = HARTPipeline.from_pretrained("path/to/hart-pipeline")
    >>> inpaint = HARTInpaintPipeline.from_pipe(pipe)
    >>> image = inpaint("a red circle", image=photo, mask_image=mask).images[0]
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch

from hart.editing import blend_mask, inpaint_tokens, prepare_image, prepare_mask, variation_tokens
from hart.pipelines.pipeline_hart import HARTPipeline

# arguments shared with HARTPipeline.__call__, passed through unchanged
_T2I_DEFAULTS = dict(
    negative_prompt=None, num_images_per_prompt=1, guidance_scale=4.5, top_k=None, top_p=None, more_smooth=True,
    generator=None, output_type="pil", return_dict=True, callback_on_step_end=None,
    callback_on_step_end_tensor_inputs=("f_hat",), use_system_prompt=True, max_sequence_length=None,
)


class _EditPipeline(HARTPipeline):
    @property
    def resolution(self) -> int:
        return self.vae.downsample_factor * self.transformer.patch_nums[-1]

    def _arguments(self, prompt, kwargs) -> Dict:
        """All text-to-image arguments, checked before any heavy work."""
        unknown = set(kwargs) - set(_T2I_DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        args = {"prompt": prompt, **_T2I_DEFAULTS, **kwargs}
        args["prompts"], args["negatives"] = self.check_inputs(
            args["prompt"], args["negative_prompt"], args["num_images_per_prompt"], args["guidance_scale"],
            args["top_k"], args["top_p"], args["output_type"], args["generator"], args["max_sequence_length"],
            args["callback_on_step_end_tensor_inputs"],
        )
        return args

    def _encode_input(self, img_13HW: torch.Tensor):
        """The input as the tokenizer sees it: latent and per-scale codes."""
        img = img_13HW.to(self._execution_device, next(self.vae.parameters()).dtype)
        f_BChw = self.vae.encode_latent(img).float()
        idx_list, _ = self.vae.quantize.encode(f_BChw, self.transformer.patch_nums)
        return f_BChw, idx_list

    def _generate(self, args: Dict, forced, postprocess=None):
        f_hat = self.generate_latent(
            args["prompts"], args["negatives"], args["num_images_per_prompt"], args["guidance_scale"], args["top_k"],
            args["top_p"], args["more_smooth"], args["generator"], args["callback_on_step_end"],
            args["callback_on_step_end_tensor_inputs"], args["use_system_prompt"], args["max_sequence_length"],
            forced=forced,
        )
        return self.finish(f_hat, args["output_type"], args["return_dict"], postprocess)

    def _batch(self, args: Dict) -> int:
        return len(args["prompts"]) * args["num_images_per_prompt"]


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
        """Same arguments as `HARTPipeline.__call__`, plus `image` (RGB at the model's resolution),
        `mask_image` (same size; white = repaint) and `blend_radius` (pixels of soft seam; 0 = off)."""
        args = self._arguments(prompt, kwargs)
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`.")
        if isinstance(blend_radius, bool) or not isinstance(blend_radius, int) or blend_radius < 0:
            raise ValueError(f"`blend_radius` must be a non-negative integer, got {blend_radius!r}.")
        img = prepare_image(image, self.resolution)
        hole = prepare_mask(mask_image, img.shape[-2:])
        f_BChw, _ = self._encode_input(img)
        hole = hole.to(f_BChw.device)
        forced = inpaint_tokens(f_BChw, hole, self.transformer.patch_nums, self._batch(args))
        postprocess = None
        if blend_radius > 0:
            reconstruction = self.decode_latent(f_BChw)
            soft = blend_mask(hole, blend_radius)
            postprocess = lambda decoded: soft * decoded + (1 - soft) * reconstruction
        return self._generate(args, forced, postprocess)


class HARTVariationPipeline(_EditPipeline):
    r"""Variations: keep the first `keep_scales` scales of `image` (its layout) and sample the rest.

    `keep_scales = 0` is plain text-to-image; `len(patch_nums) - 1` keeps every discrete scale but
    the last, so only fine detail changes.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = None, image=None, keep_scales: int = 4, **kwargs):
        """Same arguments as `HARTPipeline.__call__`, plus `image` (RGB at the model's resolution) and
        `keep_scales` (how many of the coarsest scales to keep from it)."""
        args = self._arguments(prompt, kwargs)
        S = len(self.transformer.patch_nums)
        if isinstance(keep_scales, bool) or not isinstance(keep_scales, int) or not 0 <= keep_scales <= S - 1:
            raise ValueError(f"`keep_scales` must be an integer in [0, {S - 1}], got {keep_scales!r}.")
        if image is None:
            raise ValueError("variations need an input `image`.")
        _, idx_list = self._encode_input(prepare_image(image, self.resolution))
        return self._generate(args, variation_tokens(idx_list, keep_scales, self._batch(args)))
