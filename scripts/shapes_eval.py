"""Score generated shapes-world images with ShapesEval.

    python scripts/shapes_eval.py --images outputs/shapes [--prompts hart/eval/shapes_prompts.jsonl] [--out scores.json]

Naming contract: generate one or more images for each prompt of the prompt file (its line number
from 0, also its `index` field) and name each image by that index as five digits, then either the
extension or `_` and anything: `00012.png`, `00012_0.png`, `00012_seed3.jpg`. Every image is scored
separately; prompts without an image are listed as missing and left out of the scores. Any size is
accepted (images are resized to 128 x 128). Other image names are an error; non-image files are ignored.

Prints the accuracy per category and overall (the mean of the categories) and writes them, with
every image's checks, as JSON (default: `shapes_eval.json` in the images folder).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart.eval.shapes_eval import PROMPTS_PATH, evaluate_folder, load_prompts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of images named by prompt index")
    parser.add_argument("--prompts", type=Path, default=PROMPTS_PATH, help="prompt set (default: the bundled one)")
    parser.add_argument("--out", type=Path, help="JSON report (default: IMAGES/shapes_eval.json)")
    args = parser.parse_args(argv)
    try:
        report = evaluate_folder(args.images, load_prompts(args.prompts))
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if not report["results"]:
        parser.error(f"no images named by prompt index in {args.images}")
    for category, accuracy in report["scores"].items():
        n = report["images"].get(category, sum(report["images"].values()))
        print(f"{category:20s} {accuracy:6.3f}  ({n} images)")
    if report["missing"]:
        print(f"warning: {len(report['missing'])} prompts have no image and are not scored")
    out = args.out or args.images / "shapes_eval.json"
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
