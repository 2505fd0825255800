"""HARTPipeline: text-to-image with HART, shaped like every diffusers pipeline."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from hart import rng
from hart.limits import MAX_GUIDANCE_SCALE
from hart.models.quantizer import area_down
from hart.models.tokenizer import HybridTokenizer
from hart.models.transformer import HARTTransformer
from hart.sampling import StageOutput, sample_scales
from hart.text import SYSTEM_PROMPT, TextConditioning, check_prompts, encode_prompts

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("f_hat", "idx", "logits", "preview")
# Far above any useful weight (1-10); larger ones overflow the guided logits to inf in float32.
PREVIEW_MAX_SIDE = 16  # latent tokens: previews stay at most 256 px, whatever the model's resolution

EXAMPLE_DOC = """
    Examples:
        ```py
        >>> import torch
        >>> from hart import HARTPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-pipeline")        # this package's layout
        >>> # or the official release: llm/ + tokenizer/ folders and a Qwen2 text encoder
        >>> pipe = HARTPipeline.from_official("hart-0.7b-1024px", text_encoder="Qwen2-VL-1.5B-Instruct")
        >>> pipe = pipe.to("cuda", torch.bfloat16)
        >>> image = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("fox.png")
        ```
"""


def _onload(module: torch.nn.Module) -> None:
    """Run the model-offload hook now: HART calls its models' methods, not only `forward`."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class HARTPipeline(DiffusionPipeline):
    r"""Text-to-image generation with HART (Hybrid Autoregressive Transformer).

    Components:
        tokenizer: the text model's tokenizer (Qwen2 for the release).
        text_encoder: a Hugging Face text model whose final hidden state conditions the image.
        transformer ([`HARTTransformer`]): predicts each scale's tokens; owns the residual diffusion head.
        vae ([`HybridTokenizer`]): HART's hybrid tokenizer (multi-scale codebook + continuous
            residual); decodes the latent into pixels.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = list(CALLBACK_TENSORS)

    def __init__(self, tokenizer, text_encoder, transformer: HARTTransformer, vae: HybridTokenizer):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @classmethod
    def from_official(cls, path, text_encoder, tokenizer_path=None, use_ema: bool = True, **text_kwargs) -> "HARTPipeline":
        """Build the pipeline from the official release layout (`llm/` + `tokenizer/`).

        `path` is the release folder (or its `llm/` folder); `text_encoder` a folder or hub name of
        the text model (with its tokenizer). See `hart.loading.load_official_pipeline`.
        """
        from hart.loading import load_official_components

        return cls(**load_official_components(path, text_encoder, tokenizer_path, use_ema, **text_kwargs))

    # ---- argument checks (all before any heavy work) -----------------------------------------
    def check_inputs(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, top_k, top_p,
                     output_type, generator, max_sequence_length, callback_on_step_end_tensor_inputs):
        prompts = check_prompts(prompt, "prompt")
        negatives = None
        if negative_prompt is not None:
            negatives = check_prompts(negative_prompt, "negative_prompt") if not isinstance(negative_prompt, str) else [negative_prompt]
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries but `prompt` has {len(prompts)}: give one "
                    "negative prompt, or one per prompt."
                )
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 and at most {MAX_GUIDANCE_SCALE:g} "
                             f"(usual values 1-10), got {guidance_scale!r}.")
        vocab = self.transformer.config.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
            raise ValueError(f"`top_k` must be an integer in [1, {vocab}] (the codebook size) or None, got {top_k!r}.")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be in (0, 1] or None, got {top_p!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if max_sequence_length is not None and max_sequence_length != self.transformer.config.context_tokens:
            raise ValueError(
                f"`max_sequence_length` must be {self.transformer.config.context_tokens}, the number of text tokens "
                f"this transformer was trained with; got {max_sequence_length!r}."
            )
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(CALLBACK_TENSORS)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has unknown names {sorted(unknown)}; allowed: {CALLBACK_TENSORS}.")
        rng.check_generator(generator, len(prompts) * num_images_per_prompt)
        return prompts, negatives

    def encode_prompt(
        self, prompts: List[str], device=None, use_system_prompt: bool = True, max_sequence_length: Optional[int] = None
    ) -> TextConditioning:
        """Text conditioning for a list of prompts (features in float32)."""
        max_sequence_length = max_sequence_length or self.transformer.config.context_tokens
        _onload(self.text_encoder)
        cond = encode_prompts(
            prompts, self.text_encoder, self.tokenizer, max_sequence_length,
            SYSTEM_PROMPT if use_system_prompt else None,
        )
        if cond.features_BTC.shape[-1] != self.transformer.config.context_dim:
            raise ValueError(
                f"the text encoder's hidden size {cond.features_BTC.shape[-1]} does not match the transformer's "
                f"context_dim {self.transformer.config.context_dim}: use the text encoder this model was trained with."
            )
        return TextConditioning(*(t.to(device) for t in cond)) if device is not None else cond

    def decode_latent(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> images in [-1, 1], in the tokenizer's dtype."""
        _onload(self.vae)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode_latent(f_hat_BChw.to(dtype)).float()

    def preview(self, f_hat_BChw: torch.Tensor, side: int) -> torch.Tensor:
        """A cheap coarse image of the current latent: decode it at `side` x `side` tokens."""
        return self.decode_latent(area_down(f_hat_BChw, side))

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 4.5,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        more_smooth: bool = True,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["HARTPipeline", int, int, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("f_hat",),
        use_system_prompt: bool = True,
        max_sequence_length: Optional[int] = None,
        stale_last_scale_guidance: bool = True,
        num_maskgit_iters: int = 1,
    ):
        r"""Generate images from text.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: what the image should not show. It replaces the unconditional branch of
                classifier-free guidance; when None, the release's unconditional input (all-zero
                text features) is used, as the released model was trained with.
            num_images_per_prompt: images per prompt.
            guidance_scale: classifier-free guidance weight in [0, 1000]; scale k of S uses `w * k / (S - 1)`.
            top_k: keep the k most likely tokens at every scale; None uses the release's schedule
                (600 for the first 7 scales, then 300).
            top_p: nucleus sampling threshold in (0, 1]; None (or 1) is off, as released.
            more_smooth: the release's gumbel-softmax soft codes (its scripts' default).
            generator: a `torch.Generator`, or a list with one per image, drives every random draw.
                A CPU generator works with a model on any device.
            output_type: "pil", "np" (HWC float in [0, 1]), "pt" (BCHW float in [0, 1]) or
                "latent" (the tokenizer latent f-hat, BChw).
            return_dict: return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: called after each scale as `fn(pipe, scale_index, side, tensors)`
                and returns a dict (may be empty). `tensors` holds the names asked for in
                `callback_on_step_end_tensor_inputs`: "f_hat" (latent so far), "idx" (the
                scale's tokens), "logits" (guided logits), "preview" (a cheap image in [0, 1],
                coarse to fine). Set `pipe._interrupt = True` inside it to stop early.
            use_system_prompt: prepend the release's prompt-enhancer system prompt to every prompt.
            max_sequence_length: text tokens per prompt; None (or the same number) is the model's
                own (300 for the release). Longer prompts are truncated with a warning.
            stale_last_scale_guidance: reproduce the release's last-scale guidance weight
                (`w (S-2)/(S-1)`, True) or use the full `w` (False).
            num_maskgit_iters: MaskGIT steps at the last scale (1, as released).

        Returns:
            `ImagePipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        prompts, negatives = self.check_inputs(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale, top_k, top_p, output_type,
            generator, max_sequence_length, callback_on_step_end_tensor_inputs,
        )
        f_hat = self.generate_latent(
            prompts, negatives, num_images_per_prompt, guidance_scale, top_k, top_p, more_smooth, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs, use_system_prompt, max_sequence_length,
            stale_last_scale_guidance=stale_last_scale_guidance, num_maskgit_iters=num_maskgit_iters,
        )
        return self.finish(f_hat, output_type, return_dict)

    def generate_latent(
        self, prompts, negatives, num_images_per_prompt, guidance_scale, top_k, top_p, more_smooth, generator,
        callback_on_step_end, callback_on_step_end_tensor_inputs, use_system_prompt, max_sequence_length,
        forced=None, **sampler_kwargs,
    ) -> torch.Tensor:
        """The shared body of the pipelines: encode the prompts and run the scale loop -> f-hat."""
        self._interrupt = False
        device = self._execution_device
        cond = self.encode_prompt(prompts, device, use_system_prompt, max_sequence_length)
        uncond = None
        if negatives is not None:
            uncond = self.encode_prompt(negatives, device, use_system_prompt, max_sequence_length)
            uncond = uncond.repeat_interleave(num_images_per_prompt)
        cond = cond.repeat_interleave(num_images_per_prompt)

        _onload(self.transformer)
        # model offload keeps the tokenizer on the CPU until decoding; the quantizer is tiny
        quantizer = self.vae.quantize
        if quantizer.embedding.weight.device != device:
            quantizer = copy.deepcopy(quantizer).to(device)
        pn = self.transformer.patch_nums
        wanted = set(callback_on_step_end_tensor_inputs or ())

        with self.progress_bar(total=len(pn)) as progress:

            def on_scale(stage: StageOutput):
                progress.update()
                if callback_on_step_end is not None:
                    tensors = {"f_hat": stage.f_hat_BChw, "idx": stage.idx_Bl, "logits": stage.logits_BlV}
                    tensors = {k: v for k, v in tensors.items() if k in wanted}
                    if "preview" in wanted:
                        side = min(pn[stage.si], PREVIEW_MAX_SIDE)
                        tensors["preview"] = (self.preview(stage.f_hat_BChw, side) + 1) / 2
                    callback_on_step_end(self, stage.si, pn[stage.si], tensors)
                return not self._interrupt

            return sample_scales(
                self.transformer, quantizer, cond, uncond, guidance_scale=float(guidance_scale),
                top_k=top_k, top_p=top_p or 0.0, more_smooth=more_smooth, generator=generator,
                forced=forced, callback=on_scale, **sampler_kwargs,
            )

    def finish(self, f_hat: torch.Tensor, output_type: str, return_dict: bool, postprocess=None):
        """Decode (unless `output_type="latent"`), convert and wrap the output.

        `postprocess` maps the decoded images (B, 3, H, W in [-1, 1]) before conversion.
        """
        if output_type == "latent":
            images = f_hat
        else:
            decoded = self.decode_latent(f_hat)
            if postprocess is not None:
                decoded = postprocess(decoded)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


HARTPipeline.__call__.__doc__ += EXAMPLE_DOC
