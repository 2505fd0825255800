"""HARTPipeline: text-to-image with HART, shaped like every diffusers pipeline."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.accelerate_utils import apply_forward_hook

from hart import limits, rng
from hart.models.quantizer import area_down
from hart.models.tokenizer import HybridTokenizer
from hart.models.transformer import HARTTransformer
from hart.pruning import pruned_scales
from hart.quantize import quantize_transformer_int8
from hart.sampling import COMPACT_TEXT, ForcedTokens, SamplingOptions, StageOutput, sample_scales
from hart.text import SYSTEM_PROMPT, TextConditioning, check_prompts, encode_prompts

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("f_hat", "idx", "logits", "preview")
REPLACEABLE_TENSORS = ("f_hat",)  # the loop's own state: a callback may return a replacement
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


# Model offload moves a model to the device when its `forward` runs; the tokenizer is used through
# other methods, so they get the same hook (as diffusers' AutoencoderKL.decode).
@apply_forward_hook
def _decode(vae: HybridTokenizer, f_hat_BChw: torch.Tensor) -> torch.Tensor:
    return vae.decode_latent(f_hat_BChw)


def check_guidance(guidance_scale, name: str) -> None:
    """A clear error for a guidance weight that is not a number in [0, MAX_GUIDANCE_SCALE]."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= limits.MAX_GUIDANCE_SCALE:
        raise ValueError(f"{name} must be a finite number >= 0 and at most {limits.MAX_GUIDANCE_SCALE:g} "
                         f"(usual values 1-10), got {guidance_scale!r}.")


class HARTPipeline(DiffusionPipeline):
    r"""Text-to-image generation with HART (Hybrid Autoregressive Transformer).

    Components:
        tokenizer: the text model's tokenizer (Qwen2 for the release).
        text_encoder: a Hugging Face text model whose final hidden state conditions the image.
        transformer ([`HARTTransformer`]): predicts each scale's tokens; owns the residual diffusion head.
        vae ([`HybridTokenizer`]): HART's hybrid tokenizer (multi-scale codebook + continuous
            residual); decodes the latent into pixels.

    Config:
        guidance_scale: the model's own classifier-free guidance weight, used when a call gives none
            (saved in `model_index.json`; the release's 4.5 where a folder names none).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = list(CALLBACK_TENSORS)

    def __init__(self, tokenizer, text_encoder, transformer: HARTTransformer, vae: HybridTokenizer,
                 guidance_scale: float = limits.GUIDANCE_SCALE):
        super().__init__()
        check_guidance(guidance_scale, "the model's `guidance_scale`")
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.register_to_config(guidance_scale=float(guidance_scale))
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @classmethod
    def from_official(cls, path, text_encoder, tokenizer_path=None, use_ema: bool = True,
                      torch_dtype: torch.dtype = torch.float32) -> "HARTPipeline":
        """Build the pipeline from the official release layout (`llm/` + `tokenizer/`).

        `path` is the release folder (or its `llm/` folder); `text_encoder` a folder or hub name of
        the text model (with its tokenizer). Every model is loaded in `torch_dtype`, each tensor cast
        as it is read. See `hart.loading.load_official_components`.
        """
        from hart.loading import load_official_components

        return cls(**load_official_components(path, text_encoder, tokenizer_path, use_ema, torch_dtype))

    @classmethod
    def from_folder(cls, path, text_encoder=None, use_ema: bool = True, torch_dtype: Optional[torch.dtype] = None
                    ) -> "HARTPipeline":
        """The pipeline in any layout (`hart.loading.detect_layout`): this package's (`model_index.json`), a
        training run folder (its exported `pipeline/`) or the official release, for which `text_encoder` is
        needed (and only allowed there). Every loading failure is a `CheckpointError` naming the file.
        `torch_dtype`: every model's dtype, each tensor cast as it is read (None: fp32, as diffusers loads)."""
        from hart import loading

        layout, folder = loading.detect_layout(path)
        if layout == "official":
            if text_encoder is None:
                raise loading.CheckpointError(f"{folder} is in the official layout (llm/ + tokenizer/), which has "
                                              "no text encoder: give the text encoder folder too")
            return cls.from_official(folder, text_encoder=loading.resolve_folder(text_encoder), use_ema=use_ema,
                                     torch_dtype=torch_dtype or torch.float32)
        if text_encoder is not None:
            raise loading.CheckpointError(f"{folder} has its own text encoder (model_index.json): give no other "
                                          "text encoder")
        loading.check_pipeline_folder(folder)
        try:
            return cls.from_pretrained(folder, dtype=torch_dtype)
        except (OSError, ValueError) as e:  # what is left: the text encoder or its tokenizer
            raise loading.CheckpointError(f"cannot load the pipeline in {folder}: {loading.first_line(e)}") from e

    # ---- argument checks (all before any heavy work) -----------------------------------------
    def check_inputs(self, prompt, negative_prompt, num_images_per_prompt, *, options: SamplingOptions, output_type,
                     generator, max_sequence_length, callback_on_step_end_tensor_inputs):
        """The prompts and negative prompts as lists; a clear error for any argument out of range."""
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
        check_guidance(options.guidance_scale, "`guidance_scale`")
        top_k, top_p = options.top_k, options.top_p
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
        if options.prune < 1 and not pruned_scales(self.transformer.patch_nums, options.prune):
            raise ValueError(f"`prune` needs at least three scales; this transformer has {self.transformer.patch_nums}.")
        rng.check_generator(generator, len(prompts) * num_images_per_prompt)
        return prompts, negatives

    def quantize_int8(self) -> "HARTPipeline":
        """int8 weights and per-token int8 activations for the transformer blocks (`hart.quantize`,
        needs torchao), in place and irreversibly: for CPUs without native bf16. Returns the pipeline."""
        quantize_transformer_int8(self.transformer.eval())
        return self

    def compile_transformer(self) -> "HARTPipeline":
        """torch.compile the transformer's blocks and its diffusion head's MLP, in place
        (`HARTTransformer.compile_blocks`). Images change only by float rounding. The first call compiles
        (a minute or more on a CPU, where a C++ compiler is needed); later calls, at any size the model
        supports, reuse the graphs. Returns the pipeline.

        Examples:
            ```py
            >>> pipe = HARTPipeline.from_pretrained("path/to/hart-pipeline").compile_transformer()
            >>> pipe("a red circle", generator=torch.Generator().manual_seed(0))  # compiles; the next call is faster
            ```
        """
        self.transformer.eval().compile_blocks()
        return self

    def set_head_and_decoder_dtype(self, dtype: torch.dtype) -> "HARTPipeline":
        """Run the residual diffusion head and the tokenizer's decoder in `dtype`, in place, the transformer
        and the quantizer as they are: bf16 in an fp32 pipeline where the device multiplies bf16 natively
        (`hart.device.head_and_decoder_dtype`) speeds those two stages and changes the image only by float
        rounding. Returns the pipeline."""
        self.transformer.diffusion_head.to(dtype)
        self.vae.decoder_to(dtype)
        return self

    # ---- the pieces of a call ----------------------------------------------------------------
    def encode_prompt(
        self, prompts: List[str], device=None, use_system_prompt: bool = True, max_sequence_length: Optional[int] = None
    ) -> TextConditioning:
        """Text conditioning for a list of prompts (features in float32)."""
        max_sequence_length = max_sequence_length or self.transformer.config.context_tokens
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

    def known_tokens(self, batch_size: int) -> Optional[ForcedTokens]:
        """The one hook of the edit pipelines: what the scale loop imposes instead of sampling
        (None for text-to-image). Called after the prompts are encoded, before the scale loop."""
        return None

    def postprocess_decoded(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Decoded images in [-1, 1] before conversion; the inpaint pipeline blends its seam here."""
        return images_B3HW

    def scale_loop(
        self, cond: TextConditioning, uncond: Optional[TextConditioning], options: SamplingOptions, *, generator,
        forced: Optional[ForcedTokens] = None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=(),
    ) -> torch.Tensor:
        """The scale loop with the progress bar and `callback_on_step_end` -> the latent f-hat."""
        pn = self.transformer.patch_nums
        wanted = set(callback_on_step_end_tensor_inputs or ())

        with self.progress_bar(total=len(pn)) as progress:

            def on_scale(stage: StageOutput):
                progress.update()
                if callback_on_step_end is not None:
                    self._run_callback(callback_on_step_end, stage, wanted)
                return not self._interrupt

            return sample_scales(self.transformer, self.vae.quantize, cond, uncond, options,
                                 generator=generator, forced=forced, callback=on_scale)

    def _run_callback(self, callback_on_step_end, stage: StageOutput, wanted) -> None:
        """Call `callback_on_step_end` with the tensors asked for; a returned "f_hat" replaces the loop's."""
        side = self.transformer.patch_nums[stage.si]
        tensors = {"f_hat": stage.f_hat_BChw, "idx": stage.idx_Bl, "logits": stage.logits_BlV}
        tensors = {k: v for k, v in tensors.items() if k in wanted}
        if "preview" in wanted:
            tensors["preview"] = (self.preview(stage.f_hat_BChw, min(side, PREVIEW_MAX_SIDE)) + 1) / 2
        returned = callback_on_step_end(self, stage.si, side, tensors)
        if returned is None:
            returned = {}
        if not isinstance(returned, dict):
            raise TypeError(f"`callback_on_step_end` must return a dict (may be empty), got {type(returned).__name__}.")
        for name, value in returned.items():
            if name in REPLACEABLE_TENSORS:
                if not isinstance(value, torch.Tensor) or value.shape != stage.f_hat_BChw.shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"`callback_on_step_end` returned {name!r} of shape {got}; it must be a "
                                     f"tensor of shape {tuple(stage.f_hat_BChw.shape)}.")
                stage.f_hat_BChw = value.to(stage.f_hat_BChw)
            elif value is not tensors.get(name):
                raise ValueError(f"`callback_on_step_end` returned a new {name!r}; only {REPLACEABLE_TENSORS} can be "
                                 "replaced (the other tensors are read-only views of the scale).")

    def decode_latent(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> images in [-1, 1], float32."""
        return _decode(self.vae, f_hat_BChw).float()

    def preview(self, f_hat_BChw: torch.Tensor, side: int) -> torch.Tensor:
        """A cheap coarse image of the current latent: decode it at `side` x `side` tokens."""
        return self.decode_latent(area_down(f_hat_BChw, side))

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        *,
        num_images_per_prompt: int = 1,
        guidance_scale: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        more_smooth: bool = limits.MORE_SMOOTH,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["HARTPipeline", int, int, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("f_hat",),
        use_system_prompt: bool = True,
        max_sequence_length: Optional[int] = None,
        stale_last_scale_guidance: bool = limits.STALE_LAST_SCALE_GUIDANCE,
        num_maskgit_iters: int = limits.NUM_MASKGIT_ITERS,
        prune: float = 1.0,
        compact_text: bool = COMPACT_TEXT,
        bf16_cache: bool = False,
    ):
        r"""Generate images from text.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: what the image should not show. It replaces the unconditional branch of
                classifier-free guidance; when None, the release's unconditional input (all-zero
                text features) is used, as the released model was trained with.
            num_images_per_prompt: images per prompt.
            guidance_scale: classifier-free guidance weight in [0, 1000]; scale k of S uses `w * k / (S - 1)`.
                None: the model's own (`pipe.config.guidance_scale`).
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
                coarse to fine). A returned "f_hat" (same shape) replaces the loop's latent: the next
                scales continue from it. Set `pipe._interrupt = True` inside it to stop early.
            use_system_prompt: prepend the release's prompt-enhancer system prompt to every prompt.
            max_sequence_length: text tokens per prompt; None (or the same number) is the model's
                own (300 for the release). Longer prompts are truncated with a warning.
            stale_last_scale_guidance: reproduce the release's last-scale guidance weight
                (`w (S-2)/(S-1)`, True) or use the full `w` (False).
            num_maskgit_iters: MaskGIT steps at the last scale (1, as released).
            prune: the fraction of tokens forwarded at the largest scale, twice that at the scale before
                and so on while under 1, the others restored from the scale before, and the residual
                diffusion at the forwarded tokens only (`hart.pruning`); 1.0
                (default) is off, 0.25 the usual value. Faster, changes images slightly; with
                `num_maskgit_iters` > 1 the last scale is not pruned.
            compact_text: attend to each prompt's distinct text positions plus one weighted key for its
                padding (`hart.text_keys`) instead of all of them: the same images up to float rounding.
            bf16_cache: store the attention KV cache (and the pruning cache) in bf16: a pruned 1024 px
                image in fp32 then peaks 0.7 GB lower. Changes images by rounding.

        Returns:
            `ImagePipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        # 1. Check inputs, all before any heavy work
        if guidance_scale is None:
            guidance_scale = self.config.guidance_scale
        options = SamplingOptions(
            guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
            stale_last_scale_guidance=stale_last_scale_guidance, num_maskgit_iters=num_maskgit_iters,
            prune=prune, compact_text=compact_text, bf16_cache=bf16_cache,
        )
        prompts, negatives = self.check_inputs(
            prompt, negative_prompt, num_images_per_prompt, options=options, output_type=output_type,
            generator=generator, max_sequence_length=max_sequence_length,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompts (and the negative prompts: the unconditional branch)
        text = dict(device=device, use_system_prompt=use_system_prompt, max_sequence_length=max_sequence_length)
        cond = self.encode_prompt(prompts, **text).repeat_interleave(num_images_per_prompt)
        uncond = None
        if negatives is not None:
            uncond = self.encode_prompt(negatives, **text).repeat_interleave(num_images_per_prompt)

        # 3. Prepare what is known in advance (the edit pipelines' input tokens)
        forced = self.known_tokens(cond.batch_size)

        # 4. Scale loop, coarse to fine; 5. at the last scale, the residual diffusion (hart.sampling)
        f_hat = self.scale_loop(
            cond, uncond, options, generator=generator, forced=forced,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 6. Decode, 7. post-process
        return self.finish(f_hat, output_type, return_dict)

    def finish(self, f_hat: torch.Tensor, output_type: str, return_dict: bool):
        """Decode (unless `output_type="latent"`), post-process, convert and wrap the output."""
        if output_type == "latent":
            images = f_hat
        else:
            decoded = self.postprocess_decoded(self.decode_latent(f_hat))
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


HARTPipeline.__call__.__doc__ += EXAMPLE_DOC
