"""Write a shapes-world fine-tuning folder, or the fixed ShapesEval prompt set.

    python scripts/make_shapes_dataset.py --out data/shapes -n 20000 --seed 0
    python scripts/make_shapes_dataset.py --eval-prompts hart/eval/shapes_prompts.jsonl

The folder holds `00000.png`, ... and `metadata.jsonl` (`{"file_name": ..., "text": caption}` per line),
the same for a given seed. The prompt set is always built from `EVAL_SEED`, so rewriting it
reproduces the committed file.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart.data.shapes_dataset import dumps_prompts, make_eval_prompts, write_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="folder to write the (image, caption) pairs into")
    target.add_argument("--eval-prompts", type=Path, metavar="FILE",
                        help="write the evaluation prompt set (JSON lines) instead")
    parser.add_argument("-n", type=int, default=10000, help="number of images (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the dataset (default 0)")
    args = parser.parse_args(argv)
    if args.eval_prompts is not None:
        records = make_eval_prompts()
        args.eval_prompts.write_text(dumps_prompts(records), encoding="utf-8")
        print(f"wrote {len(records)} prompts to {args.eval_prompts}")
    else:
        if args.n < 1:
            parser.error("-n must be at least 1")
        write_dataset(args.out, args.n, args.seed)
        print(f"wrote {args.n} images and metadata.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
