"""The Gradio UI: `build_demo(pipe)` returns a queued `gr.Blocks` ready to `launch()`.

Two tabs. "Text to image": the event `generate` (API name `/generate`) is a generator: it yields
`(preview, gallery, seed, status)` once per scale with a cheap decode of the image so far, then once
more with the finished images. The pipeline runs in a worker thread that hands each scale's preview
over a queue. "Inpaint": an image editor whose brush strokes are the area to repaint; the event
`inpaint` (API name `/inpaint`) returns `(image, seed, status)`.
Nothing here reads a file path from the browser: the model is whatever the caller loaded, and its
example prompts come from its own folder (`examples.json`, see `example_prompts`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no outbound calls

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hart.limits import (MAX_GUIDANCE_SCALE, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS,  # noqa: E402
                         MAX_SEED)
from hart.text import count_tokens  # noqa: E402

logger = logging.getLogger(__name__)

GUIDANCE_SLIDER_MAX = 20.0  # the slider's range; the API accepts up to hart.limits.MAX_GUIDANCE_SCALE
PREVIEW_TILE = 256  # display side of each image in the live preview (upscaled, nearest neighbour)
EXAMPLES_FILE = "examples.json"  # optional in a pipeline folder: a JSON list of prompts the model draws well
PHOTO_EXAMPLES = (  # for a model folder without its own examples (the released text-to-image model)
    "An astronaut riding a horse on the moon, oil painting by Van Gogh.",
    "A close-up photo of a red fox in fresh snow, golden hour.",
    "A cozy wooden cabin by a mountain lake at sunrise, mist over the water.",
    "A glass teapot filled with a tiny galaxy, studio lighting.",
    "A watercolor map of an imaginary island with a lighthouse.",
    "A bowl of ramen drawn in the style of a 1980s anime still.",
)


# Runs in the browser when an event starts: closes the toasts of earlier errors, passes the inputs on.
CLEAR_TOASTS_JS = "(...inputs) => { document.querySelectorAll('.toast-close').forEach(b => b.click()); " \
                  "return inputs; }"


def example_prompts(pipe) -> List[str]:
    """The example prompts of the loaded model: its folder's `examples.json`, else PHOTO_EXAMPLES."""
    folder = getattr(pipe, "name_or_path", None)  # set by `from_pretrained`; None for the official layout
    path = Path(folder) / EXAMPLES_FILE if folder else None
    if path is None or not path.is_file():
        return list(PHOTO_EXAMPLES)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) and x.strip() for x in prompts):
        raise ValueError(f"{path} must be a JSON list of non-empty prompt strings")
    return prompts


def token_notes(tokenizer, max_tokens: int, **texts: str) -> str:
    """A note (e.g. "Prompt cut: 32 of 45 tokens kept.") for each text longer than the model reads."""
    notes = []
    for name, text in texts.items():
        n = count_tokens(tokenizer, [text])[0] if text else 0
        if n > max_tokens:
            notes.append(f"{name.replace('_', ' ').capitalize()} cut: {max_tokens} of {n} tokens kept.")
    return " ".join(notes)


class LastRun:
    """The banner's line on where the model runs and how long the last image took, measured, not guessed."""

    def __init__(self, pipe):
        self.where = f"`{pipe._execution_device}` with {str(pipe.transformer.dtype).removeprefix('torch.')} weights"
        self.seconds_per_image: Optional[float] = None

    def record(self, seconds: float, num_images: int) -> None:
        self.seconds_per_image = seconds / num_images

    def banner(self) -> str:
        if self.seconds_per_image is None:
            return f"Running on {self.where}; no image generated yet."
        return f"Running on {self.where}; the last image took {self.seconds_per_image:.2f} s."


class _Cancelled(Exception):
    """Raised inside the pipeline's callback when the browser went away."""


def _invalid(message: str) -> gr.Error:
    """A user-input problem: shown to the user, not logged as a server error."""
    return gr.Error(message, title="Invalid input", print_exception=False)


def _whole(value, name: str, low: int, high: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise _invalid(f"{name} must be a whole number from {low} to {high}{hint}; got {value!r}.")
    return int(value)


def _number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
        raise _invalid(f"{name} must be a number {interval}; got {value!r}.")
    return float(value)


def validate(prompt, negative_prompt, seed, randomize_seed, guidance_scale, top_k, top_p, more_smooth,
             num_images, prune=1.0, *, vocab_size: int, max_images: int) -> dict:
    """The UI's raw values as pipeline arguments, or a `gr.Error` that names the field to fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("Please enter a prompt: describe the image you want.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid(f"The prompt is {len(prompt)} characters long; please keep it under {MAX_PROMPT_CHARS}.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise _invalid("The negative prompt must be text.")
    if negative_prompt and len(negative_prompt) > MAX_PROMPT_CHARS:
        raise _invalid(f"The negative prompt is too long; please keep it under {MAX_PROMPT_CHARS} characters.")
    top_k = _whole(top_k, "Top-k", 0, vocab_size, " (0 uses the model's own schedule)")
    top_p = _number(top_p, "Top-p", 0.0, 1.0, low_open=True)
    return dict(
        prompt=prompt.strip(),
        negative_prompt=negative_prompt.strip() if negative_prompt and negative_prompt.strip() else None,
        seed=random.randint(0, MAX_SEED) if randomize_seed else _whole(seed, "Seed", 0, MAX_SEED),
        guidance_scale=_number(guidance_scale, "Guidance scale", 0.0, MAX_GUIDANCE_SCALE),
        top_k=top_k or None,
        top_p=None if top_p == 1.0 else top_p,
        more_smooth=bool(more_smooth),
        num_images=_whole(num_images, "Number of images", 1, max_images),
        prune=_number(prune, "Token pruning", 0.0, 1.0, low_open=True),
    )


def preview_grid(preview_BChw: torch.Tensor) -> Image.Image:
    """The batch's previews (values in [0, 1]) tiled in a square-ish grid, each PREVIEW_TILE px."""
    pixels = (preview_BChw.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    columns = math.ceil(math.sqrt(len(pixels)))
    rows = math.ceil(len(pixels) / columns)
    grid = Image.new("RGB", (columns * PREVIEW_TILE, rows * PREVIEW_TILE), "white")
    for i, tile in enumerate(pixels):
        tile = Image.fromarray(tile).resize((PREVIEW_TILE, PREVIEW_TILE), Image.NEAREST)
        grid.paste(tile, ((i % columns) * PREVIEW_TILE, (i // columns) * PREVIEW_TILE))
    return grid


def _failure(what: str, error: BaseException) -> gr.Error:
    """A server-side failure: logged with its traceback, and shown to the user in one line."""
    logger.error(what, exc_info=error)
    return gr.Error(f"{what}: {type(error).__name__}: {error}", title=what, print_exception=False)


def _screen(prompt: str, safety_checker: Optional[Callable[[str], bool]]) -> None:
    """Refuse a prompt the safety checker flags (no checker: every prompt passes)."""
    if safety_checker is None:
        return
    try:
        flagged = safety_checker(prompt)
    except Exception as e:
        raise _failure("The safety checker failed", e) from None
    if flagged:
        logger.info("prompt refused by the safety checker")
        raise gr.Error("The safety checker flagged this prompt; please try a different one.",
                       title="Prompt refused", print_exception=False)


def make_generate(pipe, max_images: int, last_run: LastRun, safety_checker: Optional[Callable[[str], bool]] = None):
    """The event handler: a generator over `(preview, gallery, seed, status)` updates."""
    num_scales = len(pipe.transformer.patch_nums)
    vocab_size, max_tokens = pipe.transformer.config.vocab_size, pipe.transformer.config.context_tokens

    def generate(prompt, negative_prompt, seed, randomize_seed, guidance_scale, top_k, top_p, more_smooth,
                 num_images, prune=1.0):
        args = validate(prompt, negative_prompt, seed, randomize_seed, guidance_scale, top_k, top_p, more_smooth,
                        num_images, prune, vocab_size=vocab_size, max_images=max_images)
        _screen(args["prompt"], safety_checker)
        seed, n = args.pop("seed"), args.pop("num_images")
        notes = token_notes(pipe.tokenizer, max_tokens, prompt=args["prompt"], negative_prompt=args["negative_prompt"])
        notes = f" {notes}" if notes else ""
        updates: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def on_scale(_pipe, scale_index, side, tensors):
            if cancelled.is_set():
                raise _Cancelled()
            updates.put(("preview", scale_index, side, tensors["preview"].cpu()))
            return {}

        def work():
            try:
                images = pipe(
                    **args, num_images_per_prompt=n,
                    generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
                    callback_on_step_end=on_scale, callback_on_step_end_tensor_inputs=["preview"],
                ).images
                updates.put(("done", images))
            except BaseException as e:  # handed to the UI thread, which reports it
                updates.put(("error", e))

        start = time.perf_counter()
        threading.Thread(target=work, name="hart-generate", daemon=True).start()
        try:
            while True:
                kind, *payload = updates.get()
                if kind == "preview":
                    scale_index, side, preview = payload
                    status = f"Scale {scale_index + 1}/{num_scales} ({side}x{side} tokens)...{notes}"
                    yield preview_grid(preview), None, seed, status
                elif kind == "done":
                    gallery = [(image, f"seed {seed + i}") for i, image in enumerate(payload[0])]
                    seeds = f"seeds {seed} to {seed + n - 1}" if n > 1 else f"seed {seed}"
                    seconds = time.perf_counter() - start
                    last_run.record(seconds, n)
                    status = f"Done in {seconds:.1f} s: {n} image{'s' * (n > 1)}, {seeds}.{notes}"
                    yield gr.skip(), gallery, seed, status
                    return
                else:
                    raise _failure("Generation failed", payload[0])
        finally:
            cancelled.set()  # stops the worker at its next scale if the browser left early

    return generate


def editor_inputs(value, side: int):
    """The image editor's value as (RGB image, repaint mask) at `side` x `side`.

    The background is the picture; every brush layer's painted pixels (alpha > 0) form the mask.
    A non-square upload is centre-cropped to a square first, the same way for both.
    """
    if not isinstance(value, dict) or value.get("background") is None:
        raise _invalid("Please upload an image to edit, then paint over the area to repaint.")
    background = value["background"]
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if not isinstance(background, Image.Image):
        raise _invalid("The image could not be read; please upload a PNG or JPEG.")
    mask = Image.new("L", background.size, 0)
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        mask.paste(255, (0, 0), alpha.resize(background.size, Image.NEAREST))
    if mask.getbbox() is None:
        raise _invalid("Paint over the area to repaint with the brush: the mask is empty.")
    w, h = background.size
    crop = ((w - min(w, h)) // 2, (h - min(w, h)) // 2)
    box = (*crop, crop[0] + min(w, h), crop[1] + min(w, h))
    image = background.convert("RGB").crop(box).resize((side, side), Image.BICUBIC)
    mask = mask.crop(box).resize((side, side), Image.NEAREST)
    if mask.getextrema() == (255, 255):
        raise _invalid("The mask covers the whole image: use the text-to-image tab instead.")
    if mask.getbbox() is None:
        raise _invalid("The painted area lies outside the centre square that is edited; paint inside it.")
    return image, mask


def make_inpaint(pipe, last_run: LastRun, safety_checker: Optional[Callable[[str], bool]] = None):
    """The inpainting handler: `(image, seed, status)` from the editor, prompt and options."""
    from hart.pipelines import HARTInpaintPipeline

    inpaint_pipe = HARTInpaintPipeline(**pipe.components)  # the same modules, no copy
    side = inpaint_pipe.resolution
    vocab_size, max_tokens = pipe.transformer.config.vocab_size, pipe.transformer.config.context_tokens

    def inpaint(editor, prompt, seed, randomize_seed, guidance_scale, blend_radius):
        args = validate(prompt, None, seed, randomize_seed, guidance_scale, 0, 1.0, True, 1,
                        vocab_size=vocab_size, max_images=1)
        radius = _whole(blend_radius, "Blend radius", 0, side // 4)
        _screen(args["prompt"], safety_checker)
        image, mask = editor_inputs(editor, side)
        start = time.perf_counter()
        try:
            result = inpaint_pipe(args["prompt"], image=image, mask_image=mask, blend_radius=radius,
                                  guidance_scale=args["guidance_scale"],
                                  generator=torch.Generator().manual_seed(args["seed"])).images[0]
        except Exception as e:
            raise _failure("Inpainting failed", e) from None
        seconds = time.perf_counter() - start
        last_run.record(seconds, 1)
        notes = token_notes(pipe.tokenizer, max_tokens, prompt=args["prompt"])
        return result, args["seed"], f"Done in {seconds:.1f} s, seed {args['seed']}." + (f" {notes}" if notes else "")

    return inpaint


def build_demo(pipe, *, max_images: int = MAX_IMAGES_PER_REQUEST, concurrency: int = 1, max_queue: int = 20,
               safety_checker: Optional[Callable[[str], bool]] = None) -> gr.Blocks:
    """A queued Blocks app around a loaded `HARTPipeline`.

    `concurrency` generations run at once (1: one per device), at most `max_queue` wait; more are
    refused with "Queue is full". `safety_checker(prompt) -> True` refuses a prompt (see `hart.app.safety`).
    The example prompts and the guidance the sliders start at are the model's own (`example_prompts`,
    `pipe.config.guidance_scale`).
    """
    config = pipe.transformer.config
    side = pipe.transformer.patch_nums[-1] * pipe.vae.downsample_factor
    model_guidance = pipe.config.guidance_scale  # the sliders start at the model's own guidance
    last_run = LastRun(pipe)
    # Each event shows its progress and error badge on its status box only, so that an error leaves the
    # seed, preview and result as they were; CLEAR_TOASTS_JS closes earlier error toasts when a run starts.
    with gr.Blocks(title="HART text-to-image", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# HART text-to-image\n"
            "Hybrid autoregressive generation draws the image coarse to fine: the preview below sharpens "
            f"scale by scale ({len(pipe.transformer.patch_nums)} scales, {side}x{side} px images, "
            f"prompts of up to {config.context_tokens} tokens)."
            + ("\n\nPrompts are screened by a safety checker." if safety_checker is not None else "")
        )
        banner = gr.Markdown(last_run.banner(), elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Text to image", id="text-to-image"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt = gr.Textbox(label="Prompt", placeholder="Describe the image, then press Enter", lines=1,
                                            max_lines=4, elem_id="prompt")
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        negative_prompt = gr.Textbox(label="Negative prompt (optional)", max_lines=3,
                                                     placeholder="What the image should not show")
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=42, precision=0, minimum=0, maximum=MAX_SEED,
                                             info="The seed used is shown here; untick 'Randomize' to reuse it.",
                                             elem_id="seed")
                            randomize_seed = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize-seed")
                        num_images = gr.Slider(1, max_images, value=1, step=1, label="Number of images")
                        with gr.Accordion("Sampling options", open=False):
                            guidance_scale = gr.Slider(0.0, GUIDANCE_SLIDER_MAX, value=model_guidance, step=0.1,
                                                       label="Guidance scale")
                            top_k = gr.Slider(0, config.vocab_size, value=0, step=1, label="Top-k",
                                              info="0 uses the model's own schedule")
                            top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p", info="1 is off")
                            more_smooth = gr.Checkbox(label="More smooth (soft codes)", value=True)
                            prune = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Token pruning",
                                              info="Share of the last scale's tokens computed, twice that at the "
                                                   "scale before: 1 is off, 0.25 about halves a large image's time")
                        gr.Examples([[e] for e in example_prompts(pipe)], inputs=[prompt], label="Example prompts",
                                    elem_id="examples")
                    with gr.Column(scale=1):
                        preview = gr.Image(label="Live preview (coarse to fine)", type="pil", format="png",
                                           interactive=False, buttons=["fullscreen"], elem_id="preview")
                        status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                        gallery = gr.Gallery(label="Result", format="png", columns=2, object_fit="contain",
                                             buttons=["download", "download_all", "fullscreen"], interactive=False,
                                             elem_id="gallery")
                gr.on(
                    [run.click, prompt.submit], make_generate(pipe, max_images, last_run, safety_checker),
                    inputs=[prompt, negative_prompt, seed, randomize_seed, guidance_scale, top_k, top_p, more_smooth,
                            num_images, prune],
                    outputs=[preview, gallery, seed, status], api_name="generate", show_progress_on=[status],
                    # raw values reach `validate`, which names the field in its message (gradio's own bound
                    # checks would not)
                    preprocess=False, js=CLEAR_TOASTS_JS,
                ).then(last_run.banner, outputs=banner, queue=False, show_progress="hidden", api_visibility="private")
            with gr.Tab("Inpaint", id="inpaint"):
                with gr.Row():
                    with gr.Column(scale=1):
                        editor = gr.ImageEditor(label="Image: paint over the area to repaint", type="pil",
                                                image_mode="RGBA", sources=["upload", "clipboard"],
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                layers=False, transforms=(), elem_id="inpaint-editor")
                        inpaint_prompt = gr.Textbox(label="What to paint there", max_lines=3,
                                                    elem_id="inpaint-prompt")
                        inpaint_run = gr.Button("Inpaint", variant="primary", elem_id="inpaint-run")
                        with gr.Row():
                            inpaint_seed = gr.Number(label="Seed", value=42, precision=0, minimum=0,
                                                     maximum=MAX_SEED)
                            inpaint_randomize = gr.Checkbox(label="Randomize seed", value=True)
                        with gr.Accordion("Options", open=False):
                            inpaint_guidance = gr.Slider(0.0, GUIDANCE_SLIDER_MAX, value=model_guidance, step=0.1,
                                                         label="Guidance scale")
                            blend_radius = gr.Slider(0, side // 4, value=0, step=1, label="Blend radius (px)",
                                                     info="soft seam at the mask border; 0 keeps the rest exactly")
                    with gr.Column(scale=1):
                        inpaint_result = gr.Image(label="Result", type="pil", format="png", interactive=False,
                                                  buttons=["download", "fullscreen"], elem_id="inpaint-result")
                        inpaint_status = gr.Textbox(label="Status", interactive=False, elem_id="inpaint-status")
                gr.on(
                    [inpaint_run.click, inpaint_prompt.submit], make_inpaint(pipe, last_run, safety_checker),
                    inputs=[editor, inpaint_prompt, inpaint_seed, inpaint_randomize, inpaint_guidance, blend_radius],
                    outputs=[inpaint_result, inpaint_seed, inpaint_status], api_name="inpaint",
                    show_progress_on=[inpaint_status], js=CLEAR_TOASTS_JS,
                ).then(last_run.banner, outputs=banner, queue=False, show_progress="hidden", api_visibility="private")
    return demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
