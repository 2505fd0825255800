"""The `hart` command: `hart generate ...`, `hart convert --model ... --text-encoder ... --out ...`.

A sub-command is one `add_<name>_command(subparsers)` function that sets `run=` to its handler,
listed in `SUBCOMMANDS` (`hart inpaint/outpaint/vary` live in `hart/cli_edit.py`, `hart benchmark`
and `hart app` in `hart/cli_tools.py`). Without `--model` the bundled shapes-world model is used. Handlers raise `UsageError` (or `CheckpointError`) for bad input: `main`
prints the message as one line and returns exit status 2, without a traceback (`HART_DEBUG=1`
raises it with its traceback instead); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from hart.cli_args import (
    METADATA_KEY, PATH, POSITIVE_INT, SAMPLING_DEFAULTS, TORCH_DTYPES, OneLineParser, UsageError, add_device_arguments,
    add_model_arguments, add_run_arguments, add_sampling_arguments, as_recorded, check_output_folder, check_run_size,
    check_settings_fit, confirm_run, debug_requested, device_and_dtype, estimates_time, input_file, interactive,
    load_pipeline, package_version, resolve_model, sampling_settings, save_output,
)
from hart.cli_edit import add_inpaint_command, add_outpaint_command, add_vary_command
from hart.cli_tools import add_app_command, add_benchmark_command


@dataclass
class Job:
    """One image: the prompt's index in the run, the image's index for that prompt, its seed."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.prompt_index:05d}_{self.image_index:02d}.png"


# ---- hart generate --------------------------------------------------------------------------------

def read_prompts(path: Path) -> List[str]:
    """One prompt per line (blank lines skipped), or JSON lines with a "prompt" field (`.jsonl`)."""
    try:
        text = input_file(path, "--prompts-file").read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts-file: {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"--prompts-file: {path}:{n} is not a JSON object with a \"prompt\" field") from None
        if not str(line).strip():
            raise UsageError(f"--prompts-file: {path}:{n} has an empty prompt")
        prompts.append(str(line).strip())
    if not prompts:
        raise UsageError(f"--prompts-file: {path} holds no prompts")
    return prompts


def plan_from_args(args) -> dict:
    """Jobs, batches and settings of a run described on the command line."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise UsageError("give a PROMPT or --prompts-file (one of them), or --from-png")
    prompts = read_prompts(Path(args.prompts_file)) if args.prompts_file else [args.prompt.strip()]
    if not prompts[0]:
        raise UsageError("PROMPT is empty")
    settings = sampling_settings(args)
    seed = settings.pop("seed")
    n = args.num_images
    check_run_size(len(prompts) * n, seed, args.yes, interactive())
    jobs = [Job(p, i, prompt, seed + p * n + i) for p, prompt in enumerate(prompts) for i in range(n)]
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    return dict(batches=batches, keep=None, settings=settings,
                model=as_recorded(resolve_model(args.model)), text_encoder=as_recorded(args.text_encoder),
                dtype=args.dtype, int8=args.int8, grid_columns=n if n > 1 else math.ceil(math.sqrt(len(jobs))))


def plan_from_png(args) -> dict:
    """The run that made a PNG: its whole batch is replayed (batch peers change the float rounding)."""
    from PIL import Image

    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_DEFAULTS if getattr(args, k) is not None]
    given += [flag for flag, v in (("PROMPT", args.prompt), ("--prompts-file", args.prompts_file)) if v is not None]
    if given:
        raise UsageError(f"--from-png takes the prompt and sampling settings from the image; drop {', '.join(given)}")
    png = input_file(args.from_png, "--from-png")
    try:
        meta = json.loads(Image.open(png).text[METADATA_KEY])
    except (OSError, AttributeError, KeyError, json.JSONDecodeError):
        raise UsageError(f"--from-png: {png} carries no hart metadata (not written by `hart generate`?)") from None
    if (Path(args.out) / png.name).resolve() == png.resolve():
        raise UsageError(f"--out: regenerating {png} into its own folder would overwrite it; choose another --out")
    batch = [Job(**job) for job in meta["batch"]]
    return dict(batches=[batch], keep={(meta["prompt_index"], meta["image_index"])},
                settings={k: meta.get(k, SAMPLING_DEFAULTS[k]) for k in SAMPLING_DEFAULTS if k != "seed"},
                model=args.model or meta["model"],
                text_encoder=args.text_encoder if args.model else meta["text_encoder"],
                dtype=args.dtype or meta["dtype"], int8=args.int8 or meta.get("int8", False), grid_columns=1)


def generate_batch(pipe, batch: List[Job], settings: dict, save_steps: bool):
    """Images of one batch (one CPU generator per image) and, with `save_steps`, per-scale previews."""
    import torch

    previews = []

    def keep_preview(pipe, scale_index, side, tensors):
        previews.append(tensors["preview"].float().clamp(0, 1).cpu())
        return {}

    negative = settings["negative_prompt"]
    images = pipe(
        prompt=[job.prompt for job in batch], negative_prompt=None if negative is None else [negative] * len(batch),
        guidance_scale=settings["guidance_scale"], top_k=settings["top_k"], top_p=settings["top_p"],
        more_smooth=settings["more_smooth"], prune=settings["prune"], compact_text=settings["compact_text"],
        bf16_cache=settings["bf16_cache"],
        generator=[torch.Generator().manual_seed(job.seed) for job in batch],
        callback_on_step_end=keep_preview if save_steps else None,
        callback_on_step_end_tensor_inputs=("preview",) if save_steps else (),
    ).images
    return images, previews


def tile(images, columns: int):
    """Same-size PIL images on a grid, row by row."""
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * math.ceil(len(images) / columns)))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


def steps_strip(previews, index: int, final):
    """The coarse-to-fine previews of image `index`, then the final image, side by side."""
    from PIL import Image

    side = min(final.height, 256)
    panels = [Image.fromarray((p[index].permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in previews]
    panels = [p.resize((side, side), Image.NEAREST) for p in panels] + [final.resize((side, side), Image.BICUBIC)]
    return tile(panels, len(panels))


def write_manifest(out: Path, plan: dict, rows: List[dict], summary: dict) -> None:
    """manifest.jsonl (one row per image, in run order) and run.json, after checking the split."""
    expected = sorted((j.prompt_index, j.image_index) for b in plan["batches"] for j in b
                      if plan["keep"] is None or (j.prompt_index, j.image_index) in plan["keep"])
    got = sorted((r["prompt_index"], r["image_index"]) for r in rows)
    if got != expected:  # a gap or a duplicate: the split is broken, not the user's input
        raise RuntimeError(f"the processes wrote {len(got)} images ({len(set(got))} distinct) for the run's "
                           f"{len(expected)}: the split has a gap or a duplicate")
    rows = sorted(rows, key=lambda r: (r["prompt_index"], r["image_index"]))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    save_output(lambda path: path.write_text(lines), out / "manifest.jsonl")
    run = json.dumps(dict(summary, num_images=len(rows)), indent=2) + "\n"
    save_output(lambda path: path.write_text(run), out / "run.json")


def run_generate(args) -> int:
    from accelerate.utils import gather_object
    from PIL.PngImagePlugin import PngInfo
    from tqdm.auto import tqdm

    plan = plan_from_png(args) if args.from_png else plan_from_args(args)
    out = Path(args.out)
    check_output_folder(out)
    state, device, dtype = device_and_dtype(args.device, plan["dtype"])
    total = sum(map(len, plan["batches"]))
    if state.num_processes > 1:  # only a lone process can ask at the terminal
        check_run_size(total, 0, args.yes, interactive=False)
    pipe = load_pipeline(plan["model"], plan["text_encoder"], device, dtype, int8=plan["int8"],
                         compile_model=bool(args.compile))
    check_settings_fit(pipe, plan["settings"])
    common = dict(plan["settings"], model=plan["model"], text_encoder=plan["text_encoder"], dtype=dtype,
                  int8=plan["int8"], hart_version=package_version())

    written = []
    with state.split_between_processes(plan["batches"]) as my_batches:
        for number, batch in enumerate(tqdm(my_batches, desc="batches", disable=not state.is_local_main_process)):
            if number == 0 and args.compile and estimates_time(sum(map(len, my_batches))):
                generate_batch(pipe, batch, plan["settings"], False)  # compiles, untimed (`estimates_time`)
            started = time.perf_counter()
            images, previews = generate_batch(pipe, batch, plan["settings"], args.save_steps)
            if number == 0:  # a large run: the estimate from this batch, and the question, before any file
                confirm_run("generate", sum(map(len, my_batches)), len(batch), time.perf_counter() - started, args.yes)
            for position, (job, image) in enumerate(zip(batch, images)):
                if plan["keep"] is not None and (job.prompt_index, job.image_index) not in plan["keep"]:
                    continue
                info = PngInfo()
                info.add_text(METADATA_KEY, json.dumps(dict(
                    common, **asdict(job), batch=[asdict(j) for j in batch], batch_position=position)))
                save_output(lambda path: image.save(path, pnginfo=info), out / job.file_name)
                if args.save_steps:
                    strip = steps_strip(previews, position, image)
                    save_output(strip.save, out / job.file_name.replace(".png", "_steps.png"))
                written.append(dict(file=job.file_name, **asdict(job), rank=state.process_index))
    print(f"hart generate: process {state.process_index} of {state.num_processes} wrote {len(written)} images to {out}")

    everyone = gather_object(written) if state.num_processes > 1 else written
    if state.is_main_process:
        write_manifest(out, plan, everyone, dict(common, num_processes=state.num_processes))
        if args.grid:
            from PIL import Image

            files = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()]
            grid = tile([Image.open(out / f) for f in files], plan["grid_columns"])
            save_output(grid.save, out / "grid.png")
            print(f"hart generate: grid {out / 'grid.png'}")
        print(f"hart generate: {len(everyone)} images in {out} (list: {out / 'manifest.jsonl'})")
    state.wait_for_everyone()
    return 0


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from text", description=(
        f"Generate PNGs that carry their own settings (PNG text chunk {METADATA_KEY!r}). Under "
        "`accelerate launch` the batches are split across processes, all writing into --out."))
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file / --from-png)")
    p.add_argument("--prompts-file", type=PATH, help="one prompt per line, or .jsonl lines with a \"prompt\" field")
    p.add_argument("--from-png", type=PATH, help="regenerate this image from its metadata (pixel-identical on the same "
                                              "device type, dtype and CPU thread count)")
    p.add_argument("-n", "--num-images", type=POSITIVE_INT, default=1, help="images per prompt (default 1)")
    add_sampling_arguments(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=4, help="images per forward pass (default 4)")
    add_run_arguments(p, "outputs")
    p.add_argument("--grid", action="store_true", help="also write grid.png with all images")
    p.add_argument("--save-steps", action="store_true", help="also write NAME_steps.png: the coarse-to-fine previews")
    add_model_arguments(p, required=False)
    add_device_arguments(p)
    p.set_defaults(run=run_generate)


# ---- hart convert ---------------------------------------------------------------------------------

def convert_official(model: str, text_encoder: str, out: Path, dtype: str = "fp32", use_ema: bool = True) -> Path:
    """Save an official release (+ text encoder) in this package's layout, and check that it reloads."""
    import torch
    from hart import HARTPipeline

    check_output_folder(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out: {out} is not empty; choose a new folder")
    if (Path(model) / "model_index.json").is_file():
        raise UsageError(f"--model: {model} is already in this package's layout (model_index.json)")
    pipe = load_pipeline(model, text_encoder, dtype=dtype, use_ema=use_ema)
    pipe.save_pretrained(out)
    reloaded = HARTPipeline.from_pretrained(out)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            raise RuntimeError(f"{out}: the saved {name} does not reload identically")
    return out


def run_convert(args) -> int:
    out = convert_official(args.model, args.text_encoder, Path(args.out), args.dtype, use_ema=not args.no_ema)
    print(f"hart convert: wrote {out} (load it with HARTPipeline.from_pretrained or `hart generate --model {out}`)")
    return 0


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert an official release to this package's pipeline layout")
    add_model_arguments(p, required=True)
    p.add_argument("--out", type=PATH, required=True, help="new folder for the converted pipeline")
    p.add_argument("--dtype", choices=TORCH_DTYPES, default="fp32", help="saved weights dtype (default fp32)")
    p.add_argument("--no-ema", action="store_true", help="use llm/ weights even where ema_model.bin exists")
    p.set_defaults(run=run_convert)


# ---- entry point ----------------------------------------------------------------------------------

SUBCOMMANDS = (add_generate_command, add_inpaint_command, add_outpaint_command, add_vary_command,
               add_convert_command, add_benchmark_command, add_app_command)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hart", description="HART text-to-image.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (argparse errors included, no SystemExit)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not hasattr(args, "passthrough"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or argparse's own usage errors (already printed)
        return int(e.code or 0)
    if extra:  # a command that hands its options to another program's parser (`hart app`)
        args.passthrough = extra
    try:
        return args.run(args)
    except Exception as e:
        from hart.loading import CheckpointError  # here, not at the top: `hart --help` stays quick

        if not isinstance(e, (UsageError, CheckpointError)) or debug_requested():
            raise
        print(f"hart {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
