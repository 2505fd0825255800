"""Write a small captioned folder of a concept the bundled shapes-world model has never seen.

    python scripts/make_concept_dataset.py --shape star --colour green --out stars [-n 48] [--seed 0]

Each image holds one star (or ring) of that colour, large unless `--sizes` says otherwise, somewhere on
the world's grey background; captions read like "a green star" or "a green star in the top left". Colours: the
world's eight, or pink, teal and brown, which the world has never shown. The folder is what
`scripts/finetune.py --data_dir` reads; docs/training.md uses it in its tutorial.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart.data.concepts import CONCEPT_COLOURS, CONCEPT_SHAPES, write_concept_dataset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=CONCEPT_SHAPES, required=True)
    parser.add_argument("--colour", choices=tuple(CONCEPT_COLOURS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("-n", type=int, default=48, help="number of images (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", nargs="+", choices=("large", "small"), default=["large"],
                        help="object sizes (default: large; the bundled tokenizer blurs small stars)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be at least 1, got {args.n}")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: give a new folder")
    write_concept_dataset(args.out, args.shape, args.colour, args.n, args.seed, args.sizes)
    print(f"wrote {args.n} images of a {args.colour} {args.shape} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
