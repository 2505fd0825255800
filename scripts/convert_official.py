"""Convert an official HART release (llm/ + tokenizer/) and its text encoder into this package's layout.

    python scripts/convert_official.py --model hart-0.7b-1024px --text-encoder Qwen2-VL-1.5B-Instruct \
        --out hart-0.7b-1024px-pipeline [--dtype bf16] [--no-ema]

Same as `hart convert ...` (this script only forwards its arguments to it).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
