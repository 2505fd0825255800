"""`hart inpaint`, `hart outpaint`, `hart vary`: zero-shot editing from the command line.

Each writes `OUT/NNNNN_II.png` (image II of the run; one per seed) carrying its settings in the PNG
text chunk, like `hart generate`. Masks follow diffusers: white = repaint, black = keep.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hart import limits
from hart.cli_args import (
    METADATA_KEY, NON_NEGATIVE_INT, OFFSET, PATH, PIXELS, POSITIVE_INT, UsageError, add_device_arguments, add_model_arguments,
    add_run_arguments, add_sampling_arguments, as_recorded, check_output_folder, check_run_size, check_settings_fit,
    checked, confirm_run, estimates_time, input_file, interactive, load_command_pipeline, package_version,
    sampling_settings, save_output,
)


def _read_image(flag: str, path: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(input_file(path, flag)) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise UsageError(f"{flag}: {path} is not a readable image ({e})") from None


def _fit(image, side: int, resize: bool, flag: str, resample):
    """The image at the model's resolution: resized with --resize, refused otherwise."""
    if image.size == (side, side):
        return image
    if not resize:
        raise UsageError(f"{flag}: the image is {image.width}x{image.height} but the model works at {side}x{side}; "
                         "pass --resize to scale it, or crop it first")
    return image.resize((side, side), resample)


def _check_prompt(args) -> None:
    if not args.prompt.strip():
        raise UsageError("PROMPT is empty")


def _run_edit(args, pipeline_class, make_inputs) -> int:
    """Check the run, load the model, build the edit pipeline, run it once per seed and save the PNGs
    (with the extra images `make_inputs` returns); nothing is written before the first image is made."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    settings = sampling_settings(args)
    first_seed = settings.pop("seed")
    check_run_size(args.num_images, first_seed, args.yes, interactive())
    out = Path(args.out)
    check_output_folder(out)
    t2i, _, _, dtype, model = load_command_pipeline(args)
    check_settings_fit(t2i, settings)
    pipe = pipeline_class.from_pipe(t2i)
    inputs, recorded, extra_images = make_inputs(pipe, pipe.resolution)
    common = dict(command=args.command, prompt=args.prompt.strip(), **settings, **recorded,
                  model=as_recorded(model), text_encoder=as_recorded(args.text_encoder), dtype=dtype,
                  hart_version=package_version())
    for i in range(args.num_images):
        seed = first_seed + i
        generate = lambda: pipe(args.prompt.strip(), **inputs, **settings,
                                generator=torch.Generator().manual_seed(seed)).images[0]
        try:
            if i == 0 and args.compile and estimates_time(args.num_images):
                generate()  # compiles, untimed (`estimates_time`)
            started = time.perf_counter()
            image = generate()
        except ValueError as e:  # the pipeline's own input checks (empty mask, sizes, ...)
            raise UsageError(" ".join(str(e).split())) from None
        if i == 0:
            confirm_run(args.command, args.num_images, 1, time.perf_counter() - started, args.yes)
            for name, extra in extra_images.items():
                save_output(extra.save, out / name)
        info = PngInfo()
        info.add_text(METADATA_KEY, json.dumps(dict(common, seed=seed)))
        name = out / f"00000_{i:02d}.png"
        save_output(lambda path: image.save(path, pnginfo=info), name)
        print(f"hart {args.command}: wrote {name} (seed {seed})")
    return 0


# ---- the three commands ---------------------------------------------------------------------------

def run_inpaint(args) -> int:
    _check_prompt(args)
    from PIL import Image

    from hart.pipelines import HARTInpaintPipeline

    image, mask = _read_image("--image", args.image, "RGB"), _read_image("--mask", args.mask, "L")

    def inputs(pipe, side):
        fitted = dict(image=_fit(image, side, args.resize, "--image", Image.BICUBIC),
                      mask_image=_fit(mask, side, args.resize, "--mask", Image.NEAREST))
        return (dict(fitted, blend_radius=args.blend_radius),
                dict(image=str(Path(args.image).resolve()), mask=str(Path(args.mask).resolve()),
                     blend_radius=args.blend_radius), {})

    return _run_edit(args, HARTInpaintPipeline, inputs)


def run_outpaint(args) -> int:
    _check_prompt(args)
    from PIL import Image

    from hart.editing import outpaint_canvas
    from hart.pipelines import HARTInpaintPipeline

    image = _read_image("--image", args.image, "RGB")

    def inputs(pipe, side):
        placed = image
        if args.image_size is not None:
            height = round(args.image_size * image.height / image.width)
            if not 1 <= height <= limits.MAX_IMAGE_SIDE:
                raise UsageError(f"--image-size: {args.image_size} px wide, the {image.width}x{image.height} image "
                                 f"would be {height} px high; keep it within [1, {limits.MAX_IMAGE_SIDE}]")
            placed = image.resize((args.image_size, height), Image.BICUBIC)
        try:
            canvas, mask = outpaint_canvas(placed, side, None if args.offset is None else tuple(args.offset),
                                           tuple(args.fill))
        except ValueError as e:
            raise UsageError(f"--offset/--image-size: {e}") from None
        return (dict(image=canvas, mask_image=mask, blend_radius=args.blend_radius),
                dict(image=str(Path(args.image).resolve()), image_size=list(placed.size),
                     offset=args.offset, fill=list(args.fill), blend_radius=args.blend_radius),
                {"canvas.png": canvas, "canvas_mask.png": mask} if args.save_canvas else {})

    return _run_edit(args, HARTInpaintPipeline, inputs)


def run_vary(args) -> int:
    _check_prompt(args)
    from PIL import Image

    from hart.pipelines import HARTVariationPipeline

    image = _read_image("--image", args.image, "RGB")

    def inputs(pipe, side):
        fitted = _fit(image, side, args.resize, "--image", Image.BICUBIC)
        return (dict(image=fitted, keep_scales=args.keep_scales),
                dict(image=str(Path(args.image).resolve()), keep_scales=args.keep_scales), {})

    return _run_edit(args, HARTVariationPipeline, inputs)


def _add_common(p, default_out: str) -> None:
    p.add_argument("prompt", help="what the new content should show")
    p.add_argument("-n", "--num-images", type=POSITIVE_INT, default=1, help="images (seeds seed..seed+n-1; default 1)")
    add_sampling_arguments(p, "the new content")
    add_run_arguments(p, default_out)
    add_model_arguments(p, required=False)
    add_device_arguments(p)


BLEND = dict(type=PIXELS, default=0,
             help="soft seam of this many pixels at the mask border (default 0: the kept area is the "
                  "tokenizer's reconstruction of the input)")


def _edit_parser(subparsers, name: str, out: str, summary: str, description: str, image_help: str):
    """A sub-command with the shared options, its default output folder `out` and `--image`."""
    p = subparsers.add_parser(name, help=summary, description=description)
    _add_common(p, out)
    p.add_argument("--image", type=PATH, required=True, help=image_help)
    return p


def add_inpaint_command(subparsers) -> None:
    p = _edit_parser(subparsers, "inpaint", "inpainted", "repaint the white area of a mask, keep the rest",
                     "Text-guided inpainting: the tokens of the kept area are imposed at every scale, only the "
                     "masked area is generated.", "the image to edit (RGB, at the model's resolution)")
    p.add_argument("--mask", type=PATH, required=True, help="same-size mask: white = repaint, black = keep")
    p.add_argument("--resize", action="store_true", help="scale image and mask to the model's resolution")
    p.add_argument("--blend-radius", **BLEND)
    p.set_defaults(run=run_inpaint)


def add_outpaint_command(subparsers) -> None:
    p = _edit_parser(subparsers, "outpaint", "outpainted", "extend an image beyond its borders",
                     "Place the image on a canvas at the model's resolution (centred, or at --offset; parts outside "
                     "the canvas are cut) and generate the rest.", "the image to extend")
    p.add_argument("--image-size", type=checked(int, lambda v: 1 <= v <= limits.MAX_IMAGE_SIDE,
                                                 f"an integer in [1, {limits.MAX_IMAGE_SIDE}]"), help="resize the image to this width first (keeps its aspect)")
    p.add_argument("--offset", type=OFFSET, nargs=2, metavar=("LEFT", "TOP"),
                   help="where the image's top-left corner goes on the canvas (may be negative; default: centred)")
    p.add_argument("--fill", type=checked(int, lambda v: 0 <= v <= 255, "an integer in [0, 255]"), nargs=3,
                   default=[128, 128, 128], metavar=("R", "G", "B"), help="colour of the new area before generation")
    p.add_argument("--save-canvas", action="store_true", help="also write canvas.png and canvas_mask.png")
    p.add_argument("--blend-radius", **BLEND)
    p.set_defaults(run=run_outpaint)


def add_vary_command(subparsers) -> None:
    p = _edit_parser(subparsers, "vary", "variations", "variations of an image: keep its coarse scales, resample the rest",
                     "Keep the first --keep-scales scales of the image's tokens (its layout) and sample the finer "
                     "ones with the prompt. 0 = plain text-to-image.", "the image to vary (RGB, at the model's resolution)")
    p.add_argument("--resize", action="store_true", help="scale the image to the model's resolution")
    p.add_argument("--keep-scales", type=NON_NEGATIVE_INT, default=4,
                   help="how many of the coarsest scales to keep (default 4)")
    p.set_defaults(run=run_vary)
