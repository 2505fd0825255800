"""Write a shapes-world fine-tuning folder, or one of the fixed ShapesEval prompt sets.

    python scripts/make_shapes_dataset.py --out data/shapes -n 20000 --seed 0 [--grammar-variants 4]
    python scripts/make_shapes_dataset.py --eval-prompts hart/eval/shapes_prompts.jsonl
    python scripts/make_shapes_dataset.py --heldout-prompts hart/eval/shapes_prompts_heldout.jsonl

The folder holds `00000.png`, ... and `metadata.jsonl` (`{"file_name": ..., "text": caption}` per line),
the same for a given seed; with `--grammar-variants K`, K captions of the caption grammar per image
(`00000_0.png` ...). The prompt sets are always built from fixed seeds, so rewriting them reproduces
the committed files.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart.data.shapes_dataset import dumps_prompts, make_eval_prompts, make_heldout_prompts, write_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="folder to write the (image, caption) pairs into")
    target.add_argument("--eval-prompts", type=Path, metavar="FILE",
                        help="write the evaluation prompt set (JSON lines) instead")
    target.add_argument("--heldout-prompts", type=Path, metavar="FILE",
                        help="write the evaluation prompt set worded with held-out wordings instead")
    parser.add_argument("-n", type=int, default=10000, help="number of images (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the dataset (default 0)")
    parser.add_argument("--grammar-variants", type=int, default=0, metavar="K",
                        help="K captions per image from the caption grammar (default 0: the fixed templates)")
    args = parser.parse_args(argv)
    prompts = args.eval_prompts or args.heldout_prompts
    if prompts is not None:
        records = make_eval_prompts() if args.eval_prompts else make_heldout_prompts()
        prompts.write_text(dumps_prompts(records), encoding="utf-8")
        print(f"wrote {len(records)} prompts to {prompts}")
    else:
        if args.n < 1:
            parser.error("-n must be at least 1")
        if args.grammar_variants < 0:
            parser.error("--grammar-variants must be 0 or more")
        write_dataset(args.out, args.n, args.seed, grammar_variants=args.grammar_variants)
        print(f"wrote {args.n} images and metadata.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
