"""`hart benchmark` and `hart app`: the sub-commands around generation."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hart.cli_args import (DEFAULT_PRUNE_KEEP, NON_NEGATIVE_INT, PATH, POSITIVE_INT, UsageError, add_device_arguments,
                           check_output_folder, checked, device_and_dtype, save_output)


# ---- hart benchmark -------------------------------------------------------------------------------

def run_benchmark(args) -> int:
    from hart import benchmark as bench
    from hart.benchmark_report import format_summary, write_chart

    check_output_folder(Path(args.out))
    _, device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        result = bench.run_benchmark(args.config, dtype, str(device), args.batch_size or [1], args.warmup, args.iters,
                                     random_text_features=args.random_text_features, compile_model=args.compile,
                                     compare=args.compare, int8=args.int8,
                                     prune=args.prune, compact_text=args.compact_text, bf16_cache=args.bf16_cache)
    except bench.BenchmarkError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    save_output(lambda path: path.write_text(json.dumps(result, indent=2) + "\n"), out / "benchmark.json")
    save_output(lambda path: write_chart(result, path), out / "benchmark.png")
    print(format_summary(result))
    print(f"hart benchmark: wrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")
    return 0


def add_benchmark_command(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="time generation stage by stage (random weights of the released sizes)",
                              description="Latency, images/s, per-stage times, peak memory, FLOPs and the fraction of "
                                          "the machine's matmul peak (measured in the same run). Writes "
                                          "OUT/benchmark.json and OUT/benchmark.png.")
    p.add_argument("--config", default="hart-0.7b-1024",
                   help="hart-0.7b-1024 (default), hart-0.7b-512, medium, tiny (random weights), or bundled")
    add_device_arguments(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, action="append",
                   help="images per call; repeat for several (default 1)")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=1,
                   help="untimed calls first (default 1)")
    p.add_argument("--iters", type=POSITIVE_INT, default=3, help="timed calls; the median is reported (default 3)")
    p.add_argument("--random-text-features", action="store_true",
                   help="skip the text model: random text features of the right shape")
    p.add_argument("--prune", nargs="?", const=DEFAULT_PRUNE_KEEP, default=1.0, metavar="KEEP",
                   type=checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                   help=f"token pruning: the fraction kept at the largest scale, doubling at each scale before while "
                        f"under 1 (bare: {DEFAULT_PRUNE_KEEP:g})")
    p.add_argument("--compact-text", action=argparse.BooleanOptionalAction, default=True,
                   help="exact text-key compaction (hart/text_keys.py; default on)")
    p.add_argument("--bf16-cache", action="store_true", help="the attention and pruning caches in bf16 (memory)")
    p.add_argument("--compare", action="store_true",
                   help="three runs in one process: plain, exact (text-key compaction, compiled unless --no-compile; "
                        "in an fp32 run on a CPU with native bf16 the diffusion head and decoder in bf16) and fast "
                        "(exact + a bare --prune, + int8 where the CPU has no native bf16); speedups over plain")
    p.add_argument("--out", type=PATH, default="benchmark", help="output folder (default ./benchmark)")
    p.set_defaults(run=run_benchmark)


# ---- hart app --------------------------------------------------------------------------------------

def add_app_command(subparsers) -> None:
    p = subparsers.add_parser("app", add_help=False, help="start the Gradio web demo (options: hart app --help)",
                              description="Same as `python -m hart.app`; every option is passed through.")

    def run_app(args) -> int:
        from hart.app.__main__ import main as app_main

        try:
            return app_main(args.passthrough)
        except SystemExit as e:  # the app's own --help and usage errors
            return int(e.code or 0)

    p.set_defaults(run=run_app, passthrough=[])
