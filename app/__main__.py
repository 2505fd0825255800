"""`hart app [--model DIR]` (or `python -m hart.app`): serve the HART Gradio demo on http://127.0.0.1:7860.

Without `--model` the bundled shapes-world model is served. The model comes from the command line only (the same loader as `hart generate`); the page never
names or chooses files.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from hart.cli_args import add_device_arguments, add_model_arguments
from hart.limits import MAX_IMAGES_PER_REQUEST


def _whole(low: int, high: float = float("inf")):
    """An argparse `type=` for a whole number in [low, high]."""
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            bounds = f"from {low} to {high}" if high < float("inf") else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}")
        return int(text)
    return parse


def build_parser(prog: str = "hart app") -> argparse.ArgumentParser:
    """The options; `prog` is the command named in usage and error lines (`hart app` runs `main` directly)."""
    p = argparse.ArgumentParser(prog=prog, description="HART text-to-image web demo (Gradio).")
    add_model_arguments(p, required=False)
    add_device_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_whole(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (goes online)")
    p.add_argument("--concurrency", type=_whole(1), default=1,
                   help="generations running at once (default 1: one at a time on the device)")
    p.add_argument("--max-queue", type=_whole(1), default=20,
                   help="requests allowed to wait; more are refused with 'queue is full' (default 20)")
    p.add_argument("--max-images", type=_whole(1), default=MAX_IMAGES_PER_REQUEST,
                   help=f"most images per request (default {MAX_IMAGES_PER_REQUEST})")
    p.add_argument("--safety-model", help="local ShieldGemma folder: refuse prompts it flags (default: off)")
    return p


def main(argv: Optional[List[str]] = None, prog: str = "hart app") -> int:
    args = build_parser(prog).parse_args(argv)  # before the heavy imports: --help stays quick
    from hart.cli_args import UsageError, device_and_dtype, load_pipeline, resolve_model
    from hart.loading import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up checks, one line each
    try:
        _, device, dtype = device_and_dtype(args.device, args.dtype)
        safety_checker = None
        if args.safety_model:
            from hart.app.safety import ShieldGemmaChecker

            safety_checker = ShieldGemmaChecker(args.safety_model, device=str(device))
        pipe = load_pipeline(resolve_model(args.model), args.text_encoder, device, dtype, int8=args.int8,
                             compile_model=bool(args.compile))
        if args.compile:  # compile now rather than in the first visitor's request
            import torch

            print(f"{prog}: compiling the model with one warm-up image (a minute or more on a CPU)", flush=True)
            pipe("warm-up", output_type="latent", generator=torch.Generator().manual_seed(0))
        from hart.app.demo import build_demo

        demo = build_demo(pipe, max_images=args.max_images, concurrency=args.concurrency,
                          max_queue=args.max_queue, safety_checker=safety_checker)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:  # ValueError: a bad examples.json
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    _, local_url, share_url = demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                                          prevent_thread_lock=True, quiet=True)
    print(f"HART demo on {local_url}" + (f" and {share_url}" if share_url else "") + " (Ctrl+C stops it)", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m hart.app"))
